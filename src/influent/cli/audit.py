"""``influent audit``: every training example ranked by how suspicious it is (CSV + JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from influent.cli.common import add_data_options, check_data_args, check_output_dir
from influent.cli.report import add_report_option, check_report_path, maybe_write_report


def cmd_audit(args: argparse.Namespace) -> int:
    from influent.defenses.audit import run_audit
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
    add_report_option(p)
    add_data_options(p, embedding_options=False)  # the audit embeds with the encoder's defaults
    p.set_defaults(func=cmd_audit)
