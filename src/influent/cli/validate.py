"""``influent validate``: influence against leave-one-out retraining, the PBRF and the LDS."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from influent.cli.common import add_data_options, check_data_args, check_output_dir, head_setup, refuse_unread
from influent.cli.report import add_report_option, check_report_path, maybe_write_report


def cmd_explain_quality(args: argparse.Namespace) -> int:
    """``validate --explain``: relevance and faithfulness of each explanation ranking (README, 'Which ranking')."""
    from influent.evaluation.explanation_runs import finetuned_explanation_quality, head_explanation_quality
    from influent.evaluation.explanations import markdown_table
    from influent.store import write_json

    out = Path(args.out)
    setup = head_setup(args)
    common = {"seed": args.seed, "records_path": out / "explain_records.jsonl", "progress": not args.quiet}
    if args.model == "head":
        result = head_explanation_quality(setup, args.queries, **common)
    else:
        result = finetuned_explanation_quality(setup, args.queries, train_size=args.train_size or 1000,
                                               last_k=args.fine_tune_last, epochs=args.epochs, **common)
    table = markdown_table(result["summary"])
    write_json(out / "explain_quality.json", result)
    (out / "explain_quality.md").write_text(table + "\n")
    choice = result["choice"]
    print(table)
    print(f"\nDefault by the rule (top-10 same class >= {choice['threshold']}, then largest top-10 loss change): "
          f"{choice['default'] or 'none passes'}")
    print(f"Tables: {out / 'explain_quality.md'}, {out / 'explain_quality.json'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from influent.evaluation.options import ValidateOptions
    from influent.evaluation.validate import run_validate
    from influent.report.fidelity import write_validation

    options = ValidateOptions(
        args.model, strategies=args.strategy, solvers=args.solver, examples=args.examples, subsets=args.subsets,
        queries=args.queries, epochs=args.epochs, fine_tune_last=args.fine_tune_last, train_size=args.train_size,
        damping=args.damping, seed=args.seed,
    )
    check_data_args(args)
    refuse_unread(args)
    check_output_dir(args.out, "out")
    check_report_path(args)
    if args.explain:
        return cmd_explain_quality(args)
    extra = {}
    if args.model == "finetuned":
        extra = {"text_column": args.text_column, "label_column": args.label_column, "encoder": args.encoder}
    result = run_validate(
        args.model, cache_dir=args.cache_dir, progress=not args.quiet,
        setup=head_setup(args) if args.model == "head" else None, data=args.data, **options.as_kwargs(), **extra,
    )
    out = Path(args.out)
    write_validation(result, out)
    print((out / "validate.md").read_text() if (out / "validate.md").exists() else json.dumps(result)[:2000])
    maybe_write_report(args, result, "validate")
    print(f"\nTables: {out / 'validate.md'}, {out / 'validate.json'}; scatter plots: {out}/scatter-*.png")
    return 0


def add_validate_parser(sub) -> None:
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
    p.add_argument("--explain", action="store_true",
                   help="evaluate explanations instead: identical-class relevance and remove-and-retrain "
                        "faithfulness of each ranking over --queries held-out reviews")
    add_report_option(p)
    add_data_options(p)
    p.set_defaults(func=cmd_validate, command_parser=p)
