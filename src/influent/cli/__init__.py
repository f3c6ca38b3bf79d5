"""The ``influent`` command: one module per command family, the parser and ``main`` here.

A user mistake ends with one line ``influent: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from influent.cli.attack import add_attack_parser
from influent.cli.audit import add_audit_parser
from influent.cli.demo import add_demo_parser
from influent.cli.explain import add_explain_parser, add_train_parser
from influent.cli.validate import add_validate_parser
from influent.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influent",
        description="Influence functions for NLP models: which training examples made the model say this?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_explain_parser, add_validate_parser, add_audit_parser, add_attack_parser,
                add_demo_parser):
        add(sub)
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
