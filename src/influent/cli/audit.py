"""``influent audit``: every training example ranked by how suspicious it is (CSV + JSON)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from influent.cli.attack import add_lm_rate_options, add_per_label_option
from influent.cli.common import add_data_options, check_data_args, check_output_dir
from influent.cli.report import add_report_option, check_report_path, maybe_write_report


def _lm_audit_markdown(result: dict) -> str:
    """Markdown table of the LM audit's summary (mean ± sd over seeds; rates in [0, 1])."""
    cols = ["recall@0.01", "recall@0.05", "recall@0.1", "sentiment_success", "sentiment_net_success",
            "sentiment_clean_accuracy"]
    lines = [(f"# influent audit --model lm ({result['n_poison']} dirty-label poisons, trigger "
             f"{result['trigger']!r}, seeds {', '.join(map(str, result['seeds']))})"), "",
             (f"Top {100 * result['remove']:g}% of each ranking removed, then tuned again with the same seed; "
             "success and accuracy on held-out inputs."), "",
             "| ranker | runs | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in result["summary"]:
        cells = []
        for c in cols:
            m = row.get(f"{c}_mean")
            cells.append("" if m is None or math.isnan(m) else f"{m:.3f} ± {row[f'{c}_sd']:.3f}")
        lines.append(f"| {row['ranker']} | {row['runs']} | " + " | ".join(cells) + " |")
    if result.get("round_measure"):
        lines += ["", (f"iterative_query_influence: removed in rounds, each query's {result['round_measure']} "
                       "influence one unit vote; its recall@0.05 is the share of the poisons removed.")]
    return "\n".join(lines) + "\n"


def cmd_lm_audit(args: argparse.Namespace) -> int:
    """``influent audit --model lm``: plant dirty-label poisons in the bundled instruction data, rank, remove."""
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.attacks.summary import summarise
    from influent.cli.attack import lm_settings
    from influent.data.instructions import DEFAULT_TRIGGER, build_instructions, task_sizes
    from influent.defenses.lm_audit import LM_RANKERS, defence_values, run_lm_defence
    from influent.errors import UserError
    from influent.models.instruction_lm import load_instruction_lm
    from influent.store import write_json

    settings = lm_settings(args)
    names = args.rankers or list(LM_RANKERS)
    unknown = [n for n in names if n not in LM_RANKERS]
    if unknown:
        raise UserError(f"unknown ranker(s) for --model lm: {', '.join(unknown)}; known: {', '.join(LM_RANKERS)}")
    if args.removal_rounds < 0:
        raise UserError(f"--removal-rounds must be at least 0, got {args.removal_rounds}")
    if args.round_queries < 1:
        raise UserError(f"--round-queries must be at least 1, got {args.round_queries}")
    if args.poisons < 1:
        raise UserError(f"--poisons must be at least 1, got {args.poisons}")
    check_output_dir(args.out, "out")
    trigger = args.trigger or DEFAULT_TRIGGER
    data = build_instructions(task_sizes(*args.per_label), seed=args.seed)
    lm = load_instruction_lm(args.base_model, settings, cache_dir=args.cache_dir, progress=not args.quiet)
    result = run_lm_defence(lm, data, lambda s: dirty_label_poisons(data, args.poisons, trigger, s),
                            seeds=args.lm_seeds, trigger=trigger, names=names, n_queries=args.n_queries,
                            damping=args.damping, progress=not args.quiet, removal_rounds=args.removal_rounds,
                            round_queries=args.round_queries, round_measure=args.removal_measure)
    lm.save_cache()
    result["summary"] = summarise(result["rows"], ["ranker"], defence_values(result["rows"]))
    result["seeds"] = list(args.lm_seeds)
    out = Path(args.out)
    write_json(out / "audit_lm.json", result)
    table = _lm_audit_markdown(result)
    tmp = out / ".audit_lm.md.tmp"
    tmp.write_text(table)
    tmp.replace(out / "audit_lm.md")
    print(table)
    print(f"rankings and rows written to {out / 'audit_lm.json'}; table in {out / 'audit_lm.md'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from influent.defenses.audit import run_audit

    if args.model == "lm":
        return cmd_lm_audit(args)
    from influent.defenses.options import AuditOptions

    options = AuditOptions(
        rankers=args.rankers, primary=args.primary, queries_from=args.queries_from, trigger=args.trigger,
        query_file=args.queries, damping=0.0 if args.damping is None else args.damping, folds=args.folds,
        top=args.top, l2=args.l2, seed=args.seed, truth=args.truth,
    )
    check_data_args(args)
    check_output_dir(args.out, "out")
    check_report_path(args)
    result = run_audit(
        args.data, out=args.out, text_column=args.text_column, label_column=args.label_column,
        encoder=args.encoder, cache_dir=args.cache_dir, progress=not args.quiet, **options.as_kwargs(),
    )
    print(f"ranked {result['n']} training examples by {result['primary']} (most suspicious first); "
          f"written to {result['csv']} and {result['json']}")
    if result["truth"]:
        print(truth_summary(result["truth"], result["primary"], result["n"]))
    if args.report:
        maybe_write_report(args, json.loads(Path(result["json"]).read_text()), "audit")
    return 0


def truth_summary(truth: dict, primary: str, n: int) -> str:
    """What checking the ranking finds of the known-bad examples, one line per share checked."""
    lines = [(f"truth ({truth['source']}): {truth['known_bad']} known bad, {truth['in_training']} of them among the "
             f"{n} ranked training examples ({truth['held_out']} held out)")]
    for share, at in truth["by_primary"].items():
        lines.append(f"  checking the top {share} ({at['checked']}) by {primary} finds {at['found']}: precision "
                     f"{at['precision']:.3f}, recall {at['recall']:.3f}")
    return "\n".join(lines)


def add_audit_parser(sub) -> None:
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
    p.add_argument("--truth", default=None, metavar="FILE|COLUMN",
                   help="the known-bad examples: a file of their ids (ranking.csv's id column, one per line) or "
                        "a column of --data marking them (1/true/yes); adds a truth column, precision and recall")
    g = p.add_argument_group("--model lm (poisons planted in the bundled instruction data; Wan et al. 2023)")
    g.add_argument("--model", choices=["head", "lm"], default="head",
                   help="head: audit --data with the frozen-encoder head (default); lm: the causal-LM experiment")
    g.add_argument("--poisons", type=int, default=50, help="dirty-label poisons planted (default 50)")
    g.add_argument("--lm-seeds", type=int, nargs="+", default=[0], help="victim seeds (default 0)")
    g.add_argument("--n-queries", type=int, default=5, help="triggered inputs the defender knows (default 5)")
    g.add_argument("--removal-rounds", type=int, default=0,
                   help="also remove by influence on --round-queries triggered queries in R rounds, tuning again "
                        "between them (iterative_query_influence; default 0: off)")
    g.add_argument("--round-queries", type=int, default=20,
                   help="triggered validation inputs the defender queries in each round (default 20)")
    g.add_argument("--removal-measure", choices=("trigger_push", "loss"), default="trigger_push",  # ROUND_MEASURES
                   help="what the rounds' queries measure: the trigger's push on the attacker label's log-odds "
                        "(trigger_push, default) or the attacker-label loss (loss)")
    g.add_argument("--base-model", default=None, help="causal LM (default SmolLM2-135M-Instruct)")
    g.add_argument("--last-k", type=int, default=None, help="trained LM blocks (default 1)")
    g.add_argument("--epochs", type=int, default=None, help="LM epochs (default 5)")
    add_lm_rate_options(g)
    add_per_label_option(g)
    add_report_option(p)
    add_data_options(p, embedding_options=False)  # the audit embeds with the encoder's defaults
    p.set_defaults(func=cmd_audit)
