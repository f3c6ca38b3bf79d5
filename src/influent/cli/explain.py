"""``influent train`` and ``influent explain``: fit a model, then the training examples behind a prediction."""

from __future__ import annotations

import argparse
import json

from influent.cli.common import (
    add_curvature_options,
    add_data_options,
    add_finetune_options,
    check_curvature_args,
    check_data_args,
    check_finetune_args,
    checked,
    finetuned_setup,
    gib_to_bytes,
    head_setup,
    refuse_unread,
    warn,
)
from influent.cli.index import add_index_options, explain_from_index
from influent.cli.report import add_report_option, check_report_path, maybe_write_report
from influent.cli.trace import add_lm_options, cmd_train_lm
from influent.errors import UserError

RANK_CHOICES = ("influence", "relatif", "cosine")
"""``--rank`` choices besides ``both``: the names of :data:`influent.rankings.RANKINGS` (kept here so ``--help``
needs no torch)."""
DEFAULT_RANKS = {"head": "relatif", "finetuned": "influence"}
"""``--rank`` default per ``--model``: :data:`influent.explain.DEFAULT_RANKINGS` (kept here for ``--help``)."""
DEFAULT_RANK = DEFAULT_RANKS["head"]


def dropped_note(corpus) -> str:
    """``"; dropped 3 rows (2 without a label, 1 duplicate text)"`` or ``""`` when the loader kept every row."""
    words = {"no_label": "without a label", "no_text": "without a text", "duplicate": "duplicate text"}
    parts = [f"{n} {words.get(k, k)}" for k, n in getattr(corpus, "dropped", {}).items() if n]
    total = sum(getattr(corpus, "dropped", {}).values())
    return f"; dropped {total} row{'s' * (total != 1)} of the data ({', '.join(parts)})" if total else ""


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "lm":
        return cmd_train_lm(args)
    if args.model == "finetuned":
        check_finetune_args(args)
        refuse_unread(args)
        ft = finetuned_setup(args, retrain=args.retrain)
        m = ft.metrics
        print(f"fine-tuned {ft.settings['encoder']} (last {ft.settings['last_k']} layers, "
              f"{ft.settings['epochs']} epoch(s)) on {m['n_train']} examples in {m['seconds']:.0f} s; "
              f"test accuracy {m['test_accuracy']:.4f} on {m['n_test']}; saved in {ft.folder}"
              f"{dropped_note(ft.corpus)}")
        return 0
    refuse_unread(args)
    setup = head_setup(args, retrain=args.retrain)
    info = setup.info
    print(f"head trained on {info['n_train']} examples ({info['newton_iterations']} Newton steps, "
          f"gradient norm {info['grad_norm']:.2e}); test accuracy {info['test_accuracy']:.4f} "
          f"on {info['n_test']}; saved in {setup.folder}{dropped_note(setup.corpus)}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from influent.explain import Query, explain_rankings, format_explanation, format_side_by_side

    if (args.text is None) == (args.test_index is None):
        raise UserError("give exactly one of --text or --test-index")
    checked("top", args.top, low=1, integer=True)
    if args.damping is not None:
        checked("damping", args.damping, low=0)
    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty")
    check_report_path(args)
    if args.model == "finetuned":
        check_finetune_args(args)
        check_curvature_args(args)
    else:
        check_data_args(args)
    refuse_unread(args)
    cache_max_bytes = gib_to_bytes(args.train_cache_max_gb) if args.model == "finetuned" else None
    setup = finetuned_setup(args) if args.model == "finetuned" else head_setup(args)
    names = setup.corpus.label_names
    label = None
    if args.label is not None:
        if args.label not in names:
            raise UserError(f"--label {args.label!r} is not a class; classes: {', '.join(names)}")
        label = names.index(args.label)
    if args.test_index is not None:
        n_test = len(setup.test_idx)
        if not 0 <= args.test_index < n_test:
            raise UserError(f"--test-index {args.test_index} is out of range: the test split has {n_test} examples")
        row = int(setup.test_idx[args.test_index])
        text, gold = setup.corpus.texts[row], int(setup.corpus.labels[row])
    else:
        text, gold = args.text, None
    rank, pair, note = resolve_rank(args)
    if args.index is not None:
        if pair:
            raise UserError("--rank both compares two rankings of the exact scores; without --index, or pick one")
        args.rank = rank
        result = explain_from_index(args, setup, Query(text, None, label, gold))
        if result is not None:
            maybe_write_report(args, result, "explain")
            print(json.dumps(result) if args.json else format_explanation(result))
        return 0
    if args.model == "finetuned":
        method = setup.influence(args.strategy, args.modules, args.fisher, args.damping, query_rank=args.query_rank,
                                 seed=args.seed, train_cache=args.train_cache, train_cache_max_bytes=cache_max_bytes,
                                 progress=not args.quiet)
    else:
        method = setup.influence(solver=args.solver, damping=args.damping or 0.0)
    features = setup.held_out_features(args.test_index) if args.test_index is not None else None
    query = Query(text, features, label, gold)
    results = explain_rankings(method, setup, [query], pair or (rank,), top=args.top)[0]
    result = results[pair[0] if pair else rank]
    solve = result.get("solver") or {}
    if solve.get("converged") is False:
        warn(f"the {solve.get('method')} solve did not converge ({solve.get('iterations')} iterations, relative "
             f"residual {solve.get('residual'):.3g}); scores are approximate (try --solver exact)")
    maybe_write_report(args, result, "explain")  # with both: the most relevant ranking's
    if pair and args.json:
        print(json.dumps({"rankings": list(pair), "note": note, "explanations": results}))
    elif pair:
        print(format_side_by_side(results[pair[0]], results[pair[1]], note))
    elif args.json:
        print(json.dumps(result))
    else:
        print(format_explanation(result))
    return 0


def resolve_rank(args: argparse.Namespace) -> tuple[str, tuple[str, str] | None, str]:
    """``(ranking, pair, note)`` for ``--rank``: the model kind's default when not given; ``pair`` = (most
    relevant, most faithful) of the kind's table when the ranking is ``both`` (asked for, or the default
    where no ranking passes the identical-class test), else None; ``note`` says why both are shown."""
    from influent.explain import DEFAULT_RANKINGS, SIDE_BY_SIDE

    rank = args.rank or DEFAULT_RANKINGS[args.model]
    if rank != "both":
        return rank, None, ""
    pair = SIDE_BY_SIDE[args.model]
    if args.rank is None:
        note = (f"No ranking passes the identical-class test on the {args.model} model's table (top-10 "
                f"proponents sharing the predicted class >= 0.95; README, 'Which ranking'): the most relevant "
                f"({pair[0]}) and the most faithful ({pair[1]}) side by side.")
    else:
        note = (f"The most relevant ranking ({pair[0]}) and the most faithful ({pair[1]}) on the "
                f"{args.model} model's table (README, 'Which ranking'), side by side.")
    return pair[0], pair, note


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train (or load) a model on a corpus and report held-out accuracy")
    p.add_argument("--model", choices=["head", "finetuned", "lm"], default="head",
                   help="head: frozen encoder + logistic regression; finetuned: transformer classifier; "
                        "lm: causal language model")
    p.add_argument("--retrain", action="store_true", help="ignore a saved model with the same settings")
    add_data_options(p)
    add_finetune_options(p)
    add_lm_options(p)
    p.set_defaults(func=cmd_train, command_parser=p)


def add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="the training examples that most helped and hurt a prediction")
    p.add_argument("--text", help="a review to explain")
    p.add_argument("--test-index", type=int, help="explain the I-th review of the held-out split")
    p.add_argument("--label", help="explain the loss of this class (default: the predicted class)")
    p.add_argument("--top", type=int, default=5, help="proponents and opponents shown (default 5)")
    defaults = ", ".join(f"{v} for --model {k}" for k, v in DEFAULT_RANKS.items())
    p.add_argument("--rank", choices=(*RANK_CHOICES, "both"), default=None,
                   help="order of the training examples: influence (raw score), relatif (score / sqrt of the "
                        "example's self-influence), cosine (H^-1-cosine of the two gradients), or both: the "
                        "most relevant and the most faithful ranking of the model kind's table side by side; "
                        f"default: the rule's choice on that table ({defaults}; see README, 'Which ranking')")
    p.add_argument("--model", choices=["head", "finetuned"], default="head")
    p.add_argument("--solver", choices=["exact", "cg", "lissa"], default="exact", help="head only")
    p.add_argument("--damping", type=float, default=None,
                   help="added to the curvature's diagonal (default: 0 for the head; 0.1 x the mean "
                        "eigenvalue per module for the fine-tuned model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_report_option(p)
    add_data_options(p)
    add_finetune_options(p)
    add_curvature_options(p)
    add_index_options(p, build=False)
    p.set_defaults(func=cmd_explain, command_parser=p)
