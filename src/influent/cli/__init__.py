"""The ``influent`` command: one module per command family, the parser and ``main`` here.

Exit status: 0 done; 2 a user mistake (a bad flag or value, a bad data file, an unwritable folder) or a
damaged cache file that cannot be recomputed, stated in one line ``influent: error: ...`` on stderr, never a
traceback; 3 a numerical failure (non-finite values, a failed solve), also one line, so a script can tell
"fix the input" from "the computation broke"; 130 interrupted; 141 the reader of stdout went away
(``influent ... --json | head -c 20``), quietly, as a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from influent.cli.attack import add_attack_parser
from influent.cli.audit import add_audit_parser
from influent.cli.common import user_message
from influent.cli.demo import add_demo_parser
from influent.cli.explain import add_explain_parser, add_train_parser
from influent.cli.index import add_index_parser, extend_trace_parser
from influent.cli.report import add_report_parser
from influent.cli.review import add_review_parser
from influent.cli.trace import add_trace_parser
from influent.cli.validate import add_validate_parser
from influent.errors import CacheCorruptError, NumericalError, UserError
from influent.progress import set_quiet


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line ``influent: error: ...`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"influent: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="influent",
        description="Influence functions for NLP models: which training examples made the model say this?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_explain_parser, add_validate_parser, add_audit_parser, add_attack_parser,
                add_demo_parser, add_index_parser, add_trace_parser, add_report_parser, add_review_parser):
        add(sub)
    extend_trace_parser(sub.choices["trace"])  # trace --index: answered from a gradient index
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: no weight-loading bars or warnings from transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.formatwarning = one_line_warning


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the one line ``influent: warning: ...`` (no source line under it)."""
    return f"influent: warning: {' '.join(str(message).split())}\n"


def _error(message: str, code: int) -> int:
    print(f"influent: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _stdout_gone() -> int:
    """The reader of stdout closed it: point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    """Run the ``influent`` command; returns the exit status (see the module docstring)."""
    try:
        parser = build_parser()
        try:
            args, unknown = parser.parse_known_args(argv)
        except SystemExit as exc:  # --help, or a malformed command line (already stated in one line)
            return exc.code if isinstance(exc.code, int) else 0
        if unknown:  # named with the command whose --help lists what it takes
            return _error(f"unrecognized arguments: {' '.join(unknown)} (see influent {args.command} --help)", 2)
        _quiet_libraries()
        set_quiet(bool(getattr(args, "quiet", False)))
        return args.func(args)
    except UserError as err:
        return _error(user_message(err), 2)
    except CacheCorruptError as err:
        return _error(f"damaged cache: {err}", 2)
    except NumericalError as err:
        return _error(f"numerical failure: {err}", 3)
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as err:  # the environment refused a write: no permission, read-only file system, disk full
        if not isinstance(err, PermissionError) and err.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        return _error(f"cannot write {err.filename or 'a file'}: {err.strerror or err}", 2)
    except KeyboardInterrupt:
        print(
            "influent: interrupted; only work saved before the interrupt is kept (embeddings every 2,048 texts "
            "or 60 s, factor fits every 32 batches, finished retrainings), and a rerun resumes from it",
            file=sys.stderr,
        )
        return 130
    finally:
        set_quiet(False)  # a process that calls main again (tests, notebooks) starts loud
