"""``influent report FILE.json``: one self-contained HTML page from any influent JSON output; and the
``--report PATH`` option that explain, trace, audit, validate and attack share."""

from __future__ import annotations

import argparse
import sys

from influent.cli.common import check_output_dir


def add_report_option(p: argparse.ArgumentParser) -> None:
    """``--report PATH``: also write the HTML report of this command's output."""
    p.add_argument("--report", default=None, metavar="PATH",
                   help="also write a self-contained HTML report of the output (plots, tables, the data)")


def check_report_path(args: argparse.Namespace) -> None:
    """Refuse an unwritable ``--report`` before any work."""
    from pathlib import Path

    if getattr(args, "report", None):
        check_output_dir(Path(args.report).expanduser().parent, "report")


def maybe_write_report(args: argparse.Namespace, data: dict, kind: str) -> None:
    """Write the report of ``data`` to ``--report`` when it was given, and say where (stderr under ``--json``)."""
    if not getattr(args, "report", None):
        return
    from influent.report.build import write_report

    path = write_report(data, args.report, kind)
    # under --json stdout holds only the JSON object, so the note goes to stderr
    print(f"report: {path}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def cmd_report(args: argparse.Namespace) -> int:
    from influent.report.build import report_from_file

    path, kind = report_from_file(args.input, args.out)
    print(f"{kind} report written to {path}")
    return 0


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of an explain/trace/audit/validate/attack JSON file")
    p.add_argument("input", metavar="FILE.json",
                   help="explain --json output, demo_explanations.json, trace --json output, ranking.json, "
                        "validate.json or attack_KIND.json (the kind is read from its contents)")
    p.add_argument("--out", default=None, help="HTML file to write (default: FILE.html beside the input)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_report)
