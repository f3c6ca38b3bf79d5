"""The ``influent`` command.

A user mistake ends with one line ``influent: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from influent.errors import UserError


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=None,
                   help="corpus: a CSV/TSV/JSONL/Parquet file, 'hf:NAME' for a Hugging Face dataset, "
                        "or omit for the bundled Rotten Tomatoes snippets")
    g.add_argument("--text-column", default="text", help="text column of --data (default: text)")
    g.add_argument("--label-column", default="label", help="label column of --data (default: label)")
    g.add_argument("--hf-split", default="train", help="split of an hf: dataset (default: train)")
    g.add_argument("--encoder", default=None,
                   help="Hugging Face encoder name or local path (default: packaged all-MiniLM-L6-v2)")
    g.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens kept per text (default 128 for the head, 64 for the fine-tuned model)")
    g.add_argument("--l2", type=float, default=None, help="ridge coefficient of the head (default 1e-3)")
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--seed", type=int, default=0, help="seeds the split and everything random")
    g.add_argument("--cache-dir", default=None,
                   help="cache root (default $INFLUENT_CACHE_DIR or ~/.cache/influent)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _head_setup(args: argparse.Namespace, retrain: bool = False):
    from influent.models.encoder import DEFAULT_ENCODER
    from influent.pipeline import DEFAULT_L2, prepare_head

    if not 0.0 < args.test_fraction < 1.0:
        raise UserError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    max_length = 128 if args.max_length is None else args.max_length
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    l2 = DEFAULT_L2 if args.l2 is None else args.l2
    if l2 <= 0:
        raise UserError(f"--l2 must be positive (the head's objective must be strongly convex), got {l2}")
    return prepare_head(
        args.data, text_column=args.text_column, label_column=args.label_column, hf_split=args.hf_split,
        encoder=args.encoder or DEFAULT_ENCODER, pooling=args.pooling, max_length=max_length, l2=l2,
        seed=args.seed, test_fraction=args.test_fraction, cache_dir=args.cache_dir,
        progress=not args.quiet, retrain=retrain,
    )


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuned classifier (--model finetuned)")
    g.add_argument("--last-k", type=int, default=2,
                   help="fine-tune the last K encoder layers + head (default 2; -1 = all layers)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--train-size", type=int, default=None,
                   help="fine-tune on a seeded stratified slice of this many training examples (default all)")


def _add_curvature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("curvature of the fine-tuned classifier")
    g.add_argument("--strategy", choices=["ekfac", "kfac", "diagonal", "identity"], default="ekfac")
    g.add_argument("--modules", default="trainable",
                   help="tracked nn.Linear modules: trainable (default), all, mlp, or a name regex")
    g.add_argument("--fisher", choices=["empirical", "true"], default="empirical")
    g.add_argument("--query-rank", type=int, default=None, help="low-rank query compression (rank)")
    g.add_argument("--train-cache", action="store_true",
                   help="keep the training examples' token factors beside the model (about 4 MB per snippet "
                        "for MiniLM at 28 tokens), so later explain runs skip the passes over the training data")
    g.add_argument("--train-cache-max-gb", type=float, default=16.0,
                   help="do not write a training token cache larger than this (default 16 GiB)")


def _finetuned_setup(args: argparse.Namespace, retrain: bool = False):
    from influent.pipeline import prepare_finetuned

    if not 0.0 < args.test_fraction < 1.0:
        raise UserError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.train_size is not None and args.train_size < 2:
        raise UserError(f"--train-size must be at least 2, got {args.train_size}")
    max_length = 64 if args.max_length is None else args.max_length
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    return prepare_finetuned(
        args.data, text_column=args.text_column, label_column=args.label_column, hf_split=args.hf_split,
        encoder=args.encoder, last_k=None if args.last_k < 0 else args.last_k, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=max_length, train_size=args.train_size, seed=args.seed,
        test_fraction=args.test_fraction, cache_dir=args.cache_dir, progress=not args.quiet, retrain=retrain,
    )


def _gib_to_bytes(gib: float) -> int:
    if not gib > 0:
        raise UserError(f"--train-cache-max-gb must be > 0, got {gib}")
    return int(gib * 2**30)


# --- commands ----------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "finetuned":
        ft = _finetuned_setup(args, retrain=args.retrain)
        m = ft.metrics
        print(f"fine-tuned {ft.settings['encoder']} (last {ft.settings['last_k']} layers, "
              f"{ft.settings['epochs']} epoch(s)) on {m['n_train']} examples in {m['seconds']:.0f} s; "
              f"test accuracy {m['test_accuracy']:.4f} on {m['n_test']}; saved in {ft.folder}")
        return 0
    setup = _head_setup(args, retrain=args.retrain)
    info = setup.info
    print(f"head trained on {info['n_train']} examples ({info['newton_iterations']} Newton steps, "
          f"gradient norm {info['grad_norm']:.2e}); test accuracy {info['test_accuracy']:.4f} "
          f"on {info['n_test']}; saved in {setup.folder}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from influent.explain import Query, explain_finetuned, explain_head, format_explanation

    if (args.text is None) == (args.test_index is None):
        raise UserError("give exactly one of --text or --test-index")
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty")
    cache_max_bytes = _gib_to_bytes(args.train_cache_max_gb) if args.model == "finetuned" else None
    setup = _finetuned_setup(args) if args.model == "finetuned" else _head_setup(args)
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
    if args.model == "finetuned":
        result = explain_finetuned(
            setup, [Query(text, None, label, gold)], top=args.top, strategy=args.strategy, modules=args.modules,
            fisher=args.fisher, damping=args.damping, query_rank=args.query_rank, seed=args.seed,
            train_cache=args.train_cache, train_cache_max_bytes=cache_max_bytes,
            progress=not args.quiet,
        )[0]
    else:
        features = setup.test_x[args.test_index] if args.test_index is not None else setup.embed([text])[0]
        result = explain_head(setup, [Query(text, features, label, gold)], top=args.top, solver=args.solver,
                              damping=args.damping or 0.0)[0]
    if args.json:
        print(json.dumps(result))
    else:
        print(format_explanation(result))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from influent.evaluation.validate import run_validate

    extra = {}
    if args.model == "finetuned":
        extra = {"text_column": args.text_column, "label_column": args.label_column, "encoder": args.encoder}
    result = run_validate(
        args.model, strategies=args.strategy, solvers=args.solver, examples=args.examples, subsets=args.subsets,
        queries=args.queries, epochs=args.epochs, fine_tune_last=args.fine_tune_last,
        train_size=args.train_size, damping=args.damping, out=args.out, seed=args.seed,
        cache_dir=args.cache_dir, progress=not args.quiet,
        setup=_head_setup(args) if args.model == "head" else None, data=args.data, **extra,
    )
    out = Path(args.out)
    print((out / "validate.md").read_text() if (out / "validate.md").exists() else json.dumps(result)[:2000])
    print(f"\nTables: {out / 'validate.md'}, {out / 'validate.json'}; scatter plots: {out}/scatter-*.png")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from influent.defenses.audit import run_audit

    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    result = run_audit(
        args.data, out=args.out, rankers=args.rankers, primary=args.primary, queries_from=args.queries_from,
        trigger=args.trigger, query_file=args.queries, text_column=args.text_column,
        label_column=args.label_column, encoder=args.encoder, l2=args.l2, damping=args.damping or 0.0,
        seed=args.seed, folds=args.folds, top=args.top, cache_dir=args.cache_dir, progress=not args.quiet,
    )
    print(f"ranked {result['n']} training examples by {result['primary']} (most suspicious first); "
          f"written to {result['csv']} and {result['json']}")
    return 0


# --- attack ------------------------------------------------------------------------------------------------
# The attacks that read each option, so a flag given to the wrong kind is an error, not silently ignored.
_TRIGGERED = ("trigger", "concealed")
_ATTACK_OPTIONS = {
    "budgets": ("label-flip",), "rounds_per_budget": ("label-flip",), "objective": ("label-flip",),
    "targets": ("label-flip", "perturb"), "ks": ("perturb",), "eps": ("perturb",), "steps": ("perturb",),
    "sizes": _TRIGGERED, "trigger": _TRIGGERED, "source": _TRIGGERED, "target": _TRIGGERED, "n_eval": _TRIGGERED,
    "damping": ("label-flip", "perturb", "trigger", "concealed"),
    "train_size": ("concealed",), "epochs": ("concealed",), "n_adv": ("concealed",), "curvature": ("concealed",),
    "candidates": ("concealed",), "last_k": ("concealed",),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_attack_args(args: argparse.Namespace) -> dict:
    """Validate the attack flags before any model work; return run_attack's keyword options (None = default)."""
    from influent.attacks.run import KINDS

    if args.kind not in KINDS:
        raise UserError(f"unknown attack {args.kind!r}; choose from {', '.join(KINDS)}")
    for name, kinds in _ATTACK_OPTIONS.items():
        if getattr(args, name) is not None and args.kind not in kinds:
            raise UserError(f"{_flag(name)} applies to {' and '.join(kinds)}, not to {args.kind}")
    if args.seeds is not None and (not args.seeds or min(args.seeds) < 0):
        raise UserError(f"--seeds needs one or more non-negative integers, got {args.seeds}")
    if args.damping is not None and args.damping < 0:
        raise UserError(f"--damping must be non-negative, got {args.damping}")
    if args.budgets is not None and (not args.budgets or not all(0.0 < b < 1.0 for b in args.budgets)):
        raise UserError(f"--budgets needs one or more fractions strictly between 0 and 1, got {args.budgets}")
    for name, low in (("targets", 1 if args.kind == "perturb" else 0), ("rounds_per_budget", 1), ("steps", 1),
                      ("n_eval", 1), ("train_size", 2), ("epochs", 1), ("n_adv", 1), ("candidates", 1),
                      ("last_k", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"{_flag(name)} must be at least {low}, got {value}")
    for name, what in (("ks", "poisoned-example counts"), ("sizes", "poison counts")):
        values = getattr(args, name)
        if values is not None and (not values or min(values) < 1):
            raise UserError(f"{_flag(name)} needs one or more {what} of at least 1, got {values}")
    if args.eps is not None and args.eps <= 0:
        raise UserError(f"--eps must be positive (relative L2 radius), got {args.eps}")
    if args.trigger is not None and not args.trigger.strip():
        raise UserError("--trigger is empty")
    return {name: getattr(args, name) for name, kinds in _ATTACK_OPTIONS.items() if args.kind in kinds
            and getattr(args, name) is not None}


def _check_attack_data(args: argparse.Namespace, setup, options: dict) -> None:
    """Checks that need the prepared data: held-out size, poison counts, trigger classes."""
    n_train, n_heldout = len(setup.train_idx), len(setup.test_idx)
    if n_heldout < 4:
        raise UserError(f"the held-out split has {n_heldout} examples; an attack needs at least 4 "
                        "(use more data or a larger --test-fraction)")
    most = max(options.get("ks") or (1, 5))
    if args.kind == "perturb" and most > n_train:
        raise UserError(f"--ks asks for up to {most} poisons but there are {n_train} training examples")
    if args.kind == "trigger":
        names = list(setup.corpus.label_names)
        for flag, value in (("--source", args.source), ("--target", args.target)):
            known = int(value) < len(names) if value is not None and value.isdigit() else value in names
            if value is not None and not known:
                raise UserError(f"{flag} {value!r} is not a class; classes: {', '.join(names)} "
                                f"(or indices 0..{len(names) - 1})")
        from influent.attacks.experiment import from_setup
        from influent.attacks.trigger import DEFAULT_SIZES, resolve_classes

        try:
            source, _ = resolve_classes(from_setup(setup), args.source, args.target)
        except ValueError as err:
            raise UserError(f"--source/--target: {err}") from None
        available = int((setup.train_y == source).sum())
        wanted = max(options.get("sizes") or DEFAULT_SIZES)
        if wanted > available:
            raise UserError(f"--sizes asks for {wanted} poisons but only {available} training examples are of "
                            f"the source class {names[source]!r}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def attack_markdown(result: dict) -> str:
    """Markdown table of ``result['summary']``: one row per group, each value as mean ± sd over its runs."""
    summary = result["summary"]
    keys, values = [], []
    for row in summary:
        for col in row:
            if col.endswith("_mean"):
                if col[:-5] not in values:
                    values.append(col[:-5])
            elif not col.endswith("_sd") and col != "runs" and col not in keys:
                keys.append(col)
    lines = [
        f"# influent attack {result['kind']}",
        "",
        (f"Attack seeds {', '.join(map(str, result['seeds']))}; split seed {result.get('split_seed', '-')}. "
         "Each value is mean ± sd over the runs of its row; accuracies are on clean held-out labels, "
         "rates in [0, 1]."),
        "",
        "| " + " | ".join([*keys, "runs", *values]) + " |",
        "|" + "---|" * (len(keys) + 1 + len(values)),
    ]
    for row in summary:
        cells = [_cell(row.get(k)) for k in keys] + [str(row["runs"])]
        for v in values:
            m, sd = row.get(f"{v}_mean"), row.get(f"{v}_sd")
            cells.append("" if m is None else f"{m:.4f} ± {sd:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_attack(args: argparse.Namespace) -> int:
    from influent.attacks.run import run_attack

    options = _check_attack_args(args)
    seeds = (0, 1, 2) if args.seeds is None else args.seeds
    common = {"seeds": seeds, "out": args.out, "progress": not args.quiet}
    if args.kind == "concealed":  # not an attack on the head: run_attack takes the data options itself
        result = run_attack(args.kind, args.data, encoder=args.encoder, split_seed=args.seed,
                            cache_dir=args.cache_dir, text_column=args.text_column,
                            label_column=args.label_column, **common, **options)
    else:
        setup = _head_setup(args)
        _check_attack_data(args, setup, options)
        result = run_attack(args.kind, setup=setup, **common, **options)
    out = Path(args.out)
    table = attack_markdown(result)
    md = out / f"attack_{args.kind}.md"
    tmp = out / f".{md.name}.tmp"  # atomic, like every other write
    tmp.write_text(table)
    tmp.replace(md)
    print(table)
    print(f"{len(result['rows'])} runs written to {out / f'attack_{args.kind}.json'}; table in {md}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from influent.explain import Query, explain_head, format_explanation
    from influent.store import write_json

    start = time.perf_counter()
    out = Path(args.out)
    print("influent demo: frozen all-MiniLM-L6-v2 + L2 logistic regression on Rotten Tomatoes snippets")
    setup = _head_setup(args)
    info = setup.info
    print(f"  train {info['n_train']} / test {info['n_test']} (split seed {args.seed}); head gradient norm "
          f"{info['grad_norm']:.1e}; test accuracy {info['test_accuracy']:.4f}")
    picks = [0, 1, 2]
    queries = [Query(setup.corpus.texts[setup.test_idx[i]], setup.test_x[i], None, int(setup.test_y[i]))
               for i in picks]
    results = explain_head(setup, queries, top=args.top)
    for i, r in zip(picks, results):
        print(f"\n=== test review {i} ===")
        print(format_explanation(r))
    write_json(out / "demo_explanations.json", {"model": info, "explanations": results})
    print(f"\nOutputs: {out / 'demo_explanations.json'}; model and caches under {setup.folder.parent.parent}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influent",
        description="Influence functions for NLP models: which training examples made the model say this?",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or load) a model on a corpus and report held-out accuracy")
    p.add_argument("--model", choices=["head", "finetuned"], default="head",
                   help="head: frozen encoder + logistic regression; finetuned: transformer classifier")
    p.add_argument("--retrain", action="store_true", help="ignore a saved model with the same settings")
    _add_data_options(p)
    _add_finetune_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("explain", help="the training examples that most helped and hurt a prediction")
    p.add_argument("--text", help="a review to explain")
    p.add_argument("--test-index", type=int, help="explain the I-th review of the held-out split")
    p.add_argument("--label", help="explain the loss of this class (default: the predicted class)")
    p.add_argument("--top", type=int, default=5, help="proponents and opponents shown (default 5)")
    p.add_argument("--model", choices=["head", "finetuned"], default="head")
    p.add_argument("--solver", choices=["exact", "cg", "lissa"], default="exact", help="head only")
    p.add_argument("--damping", type=float, default=None,
                   help="added to the curvature's diagonal (default: 0 for the head; 0.1 x the mean "
                        "eigenvalue per module for the fine-tuned model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_data_options(p)
    _add_finetune_options(p)
    _add_curvature_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("validate", help="influence against leave-one-out (cold/warm), PBRF and the LDS")
    p.add_argument("--model", choices=["head", "finetuned"], default="head")
    p.add_argument("--strategy", nargs="+", default=["identity", "diagonal", "kfac", "ekfac"],
                   help="curvature strategies compared (fine-tuned model)")
    p.add_argument("--solver", nargs="+", default=["exact", "cg", "lissa"], help="solvers compared (head)")
    p.add_argument("--examples", type=int, default=30, help="training examples removed (top/bottom/random)")
    p.add_argument("--subsets", type=int, default=50, help="random half-size subsets for the LDS (0 skips)")
    p.add_argument("--queries", type=int, default=5, help="held-out queries")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of each retrain (fine-tuned)")
    p.add_argument("--fine-tune-last", type=int, default=1, help="layers fine-tuned (fine-tuned model)")
    p.add_argument("--train-size", type=int, default=None, help="seeded stratified training slice")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--out", default="influent-out/validate", help="output folder")
    _add_data_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("audit", help="rank every training example by how suspicious it is (CSV + JSON)")
    p.add_argument("--out", default="influent-out/audit", help="output folder")
    p.add_argument("--rankers", nargs="+", default=None, help="rankers to compute (default: all)")
    p.add_argument("--primary", default=None, help="ranker that orders the list")
    p.add_argument("--queries-from", choices=["validation", "misclassified", "none"], default="validation")
    p.add_argument("--trigger", default=None, help="suspected trigger phrase (queries contain it)")
    p.add_argument("--queries", default=None, help="a file of the user's own labelled queries")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold baselines")
    p.add_argument("--top", type=int, default=None, help="write only the top N rows")
    _add_data_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("attack", help="poison the head's training data and measure the damage on clean labels",
                       description="Run a poisoning attack on the frozen-encoder head over several seeds. Writes "
                                   "attack_KIND.json (every run + summary) and attack_KIND.md (summary table) "
                                   "in --out and prints the table.")
    p.add_argument("kind", metavar="KIND",
                   help="label-flip | perturb | trigger (frozen-encoder head) | concealed (fine-tuned model)")
    p.add_argument("--seeds", type=int, nargs="*", default=None, metavar="S",
                   help="attack seeds, a list (default 0 1 2); each re-divides the held-out split into the "
                        "attacker's validation half and the scoring half and re-draws targets and poisons")
    p.add_argument("--split-seed", dest="seed", type=int, default=argparse.SUPPRESS,
                   help="the train/held-out split seed (same as --seed; default 0)")
    p.add_argument("--damping", type=float, default=None, help="added to the Hessian's diagonal (default 0)")
    p.add_argument("--out", default="influent-out/attack", help="output folder (default influent-out/attack)")
    g = p.add_argument_group("label-flip")
    g.add_argument("--budgets", type=float, nargs="*", default=None,
                   help="flip budgets as fractions of the training set, each in (0, 1) "
                        "(default 0.005 0.01 0.03 0.05)")
    g.add_argument("--targets", type=int, default=None,
                   help="targeted reviews per seed (label-flip: default 5, 0 = untargeted only; "
                        "perturb: default 5)")
    g.add_argument("--rounds-per-budget", type=int, default=None,
                   help="greedy rounds per budget step, retraining between rounds (default 1)")
    g.add_argument("--objective", choices=["correct", "loss"], default=None,
                   help="untargeted surrogate on the validation half: loss of the reviews the clean model gets "
                        "right (correct, default) or of every review (loss)")
    g = p.add_argument_group("perturb")
    g.add_argument("--ks", type=int, nargs="*", default=None,
                   help="numbers of perturbed training examples per target (default 1 5)")
    g.add_argument("--eps", type=float, default=None,
                   help="L2 radius of each perturbation relative to the example's feature norm (default 0.5)")
    g.add_argument("--steps", type=int, default=None, help="projected ascent steps, retraining after each (default 3)")
    g = p.add_argument_group("trigger (and concealed)")
    g.add_argument("--sizes", type=int, nargs="*", default=None,
                   help="numbers N of poisoned training examples (default 10 25 50 100)")
    g.add_argument("--trigger", default=None, help="trigger phrase inserted into the poisons (default 'james bond')")
    g.add_argument("--source", default=None,
                   help="class (name or index) whose reviews are poisoned (default negative/rotten, else 0)")
    g.add_argument("--target", default=None,
                   help="class (name or index) the poisons are relabelled to (default positive/fresh, else 1)")
    g.add_argument("--n-eval", type=int, default=None,
                   help="triggered source-class held-out reviews scored per seed (default 300; concealed 200)")
    g = p.add_argument_group("concealed (fine-tuned classifier; Wallace et al. 2021)")
    g.add_argument("--train-size", type=int, default=None,
                   help="stratified training slice the victim is fine-tuned on (default 1000)")
    g.add_argument("--epochs", type=int, default=None, help="victim's AdamW epochs (default 3)")
    g.add_argument("--last-k", type=int, default=None, help="fine-tuned encoder layers (default 1)")
    g.add_argument("--n-adv", type=int, default=None,
                   help="triggered validation reviews in the attacker's objective, and as many disjoint ones as "
                        "the audit's queries (default 50)")
    g.add_argument("--curvature", choices=["ekfac", "kfac", "diagonal", "identity"], default=None,
                   help="attacker's curvature: ekfac = influence (default), identity = one-step unroll")
    g.add_argument("--candidates", type=int, default=None,
                   help="HotFlip candidates re-scored per position (default 40)")
    _add_data_options(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("demo", help="the main job on the bundled data: train, evaluate, explain")
    p.add_argument("--out", default="influent-out", help="output folder (default influent-out)")
    p.add_argument("--top", type=int, default=3)
    _add_data_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: no weight-loading bars or warnings from transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        print(f"influent: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("influent: interrupted; cached work is kept and will be reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
