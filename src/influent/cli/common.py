"""Options every command shares (data, model, fine-tuning, curvature), their checks, and the model set-ups.

Library code names the *field* a mistake is about (``damping``); :func:`flag` turns it into the flag the user
typed (``--damping``) and :func:`user_message` rewrites a :class:`~influent.errors.UserError` for the command
line. Every check here runs before any model work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from influent.checks import check_number
from influent.errors import UserError

# Library fields whose flag is not the field's own name.
FIELD_FLAGS = {"strategies": "--strategy", "solvers": "--solver", "query_file": "--queries", "kind": "KIND",
               "split_seed": "--split-seed", "input": "FILE.json"}


def flag(field: str) -> str:
    """The command-line flag of a library field: ``train_size`` -> ``--train-size``."""
    return FIELD_FLAGS.get(field) or "--" + field.replace("_", "-")


def user_message(err: UserError) -> str:
    """The error's one line, its field spelt as the flag (``damping must be ...`` -> ``--damping must be ...``)."""
    text = " ".join(str(err).split())
    field = getattr(err, "field", None)
    if not field:
        return text
    rest = text[len(field):]
    if text.startswith(field) and not (rest[:1].isalnum() or rest[:1] == "_"):
        return flag(field) + rest
    return f"{flag(field)}: {text}"


def warn(message: str) -> None:
    """One line ``influent: warning: ...`` on stderr (the run goes on; the JSON records the same fact)."""
    print(f"influent: warning: {' '.join(message.split())}", file=sys.stderr)


def checked(field: str, value, **bounds):
    """``value`` after :func:`~influent.checks.check_number` (a CLI-side check that names the flag)."""
    check_number(field, value, **bounds)
    return value


# What each model kind does not read, per command (``--model head`` / ``--model finetuned``).
_FINETUNE = ("last_k", "epochs", "lr", "batch_size", "train_size")
_CURVATURE = ("strategy", "modules", "fisher", "query_rank", "train_cache", "train_cache_max_gb")
UNREAD = {
    ("train", "head"): _FINETUNE,
    ("train", "finetuned"): ("l2", "pooling"),
    ("explain", "head"): _FINETUNE + _CURVATURE,
    ("explain", "finetuned"): ("l2", "pooling", "solver"),
    ("validate", "head"): ("strategy", "epochs", "fine_tune_last"),
    ("validate", "finetuned"): ("solver", "l2", "pooling", "max_length", "test_fraction", "hf_split"),
}
_MODEL_NAMES = {"head": "the frozen-encoder head", "finetuned": "the fine-tuned classifier"}


def refuse_unread(args: argparse.Namespace) -> None:
    """An option the chosen ``--model`` does not read, given another value than its default, is a mistake."""
    parser = getattr(args, "command_parser", None)
    for name in UNREAD.get((args.command, args.model), ()) if parser is not None else ():
        if getattr(args, name) != parser.get_default(name):
            raise UserError(f"{flag(name)} does not apply to {_MODEL_NAMES[args.model]} (--model {args.model})")


def check_output_dir(path: str | os.PathLike | None, field: str, must_write: bool = True) -> None:
    """``path`` is a folder (or can be made one) that this process can write to, else a one-line error.

    With ``must_write=False`` an existing read-only folder passes (a shared read-only cache serves reads).
    """
    if path is None:
        return
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{field} {str(folder)!r} is a file, not a folder", field=field)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{field} {str(folder)!r} cannot be created: {str(existing)!r} is a file", field=field)
    if (existing != folder or must_write) and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{field} {str(folder)!r} is not writable (no write permission on {str(existing)!r})",
                        field=field)


def check_data_args(args: argparse.Namespace) -> None:
    """The data options every command shares: seed, held-out share, l2, max length, cache folder."""
    checked("seed", args.seed, low=0, integer=True)
    if getattr(args, "test_fraction", None) is not None:
        checked("test_fraction", args.test_fraction, low=0, high=1, low_open=True, high_open=True)
    if getattr(args, "max_length", None) is not None:
        checked("max_length", args.max_length, low=2, integer=True)
    if args.l2 is not None:
        checked("l2", args.l2, low=0, low_open=True)
    check_output_dir(args.cache_dir, "cache_dir", must_write=False)


def add_data_options(p: argparse.ArgumentParser, embedding_options: bool = True) -> None:
    """The data and model flags; without ``embedding_options`` no ``--hf-split``, ``--pooling``,
    ``--max-length`` or ``--test-fraction`` (for a command that cannot honour them)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=None,
                   help="corpus: a CSV/TSV/JSONL/Parquet file, 'hf:NAME' for a Hugging Face dataset, "
                        "or omit for the bundled Rotten Tomatoes snippets")
    g.add_argument("--text-column", default="text", help="text column of --data (default: text)")
    g.add_argument("--label-column", default="label", help="label column of --data (default: label)")
    if embedding_options:
        g.add_argument("--hf-split", default="train", help="split of an hf: dataset (default: train)")
    g.add_argument("--encoder", default=None,
                   help="Hugging Face encoder name or local path (default: packaged all-MiniLM-L6-v2)")
    if embedding_options:
        g.add_argument("--pooling", choices=["mean", "cls"], default="mean")
        g.add_argument("--max-length", type=int, default=None,
                       help="tokens kept per text (default 128 for the head, 64 for the fine-tuned model)")
    g.add_argument("--l2", type=float, default=None, help="ridge coefficient of the head (default 1e-3)")
    if embedding_options:
        g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--seed", type=int, default=0, help="seeds the split and everything random")
    g.add_argument("--cache-dir", default=None,
                   help="cache root (default $INFLUENT_CACHE_DIR or ~/.cache/influent)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def head_setup(args: argparse.Namespace, retrain: bool = False):
    """Train (or load) the frozen-encoder head the data options describe."""
    from influent.models.encoder import DEFAULT_ENCODER
    from influent.pipeline import DEFAULT_L2, prepare_head

    check_data_args(args)
    max_length = 128 if args.max_length is None else args.max_length
    l2 = DEFAULT_L2 if args.l2 is None else args.l2
    setup = prepare_head(
        args.data, text_column=args.text_column, label_column=args.label_column, hf_split=args.hf_split,
        encoder=args.encoder or DEFAULT_ENCODER, pooling=args.pooling, max_length=max_length, l2=l2,
        seed=args.seed, test_fraction=args.test_fraction, cache_dir=args.cache_dir,
        progress=not args.quiet, retrain=retrain,
    )
    info = setup.info
    if info.get("converged") is False:
        warn(f"the head's Newton training stopped after {info.get('newton_iterations')} steps with gradient norm "
             f"{info.get('grad_norm'):.3g}, above its tolerance: scores assume an optimum (try a larger --l2)")
    return setup


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuned classifier (--model finetuned)")
    g.add_argument("--last-k", type=int, default=2,
                   help="fine-tune the last K encoder layers + head (default 2; -1 = all layers)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--train-size", type=int, default=None,
                   help="fine-tune on a seeded stratified slice of this many training examples (default all)")


def add_curvature_options(p: argparse.ArgumentParser) -> None:
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


def finetuned_setup(args: argparse.Namespace, retrain: bool = False):
    """Fine-tune (or load) the transformer classifier the data and fine-tuning options describe."""
    from influent.pipeline import prepare_finetuned

    check_finetune_args(args)
    max_length = 64 if args.max_length is None else args.max_length
    return prepare_finetuned(
        args.data, text_column=args.text_column, label_column=args.label_column, hf_split=args.hf_split,
        encoder=args.encoder, last_k=None if args.last_k < 0 else args.last_k, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=max_length, train_size=args.train_size, seed=args.seed,
        test_fraction=args.test_fraction, cache_dir=args.cache_dir, progress=not args.quiet, retrain=retrain,
    )


def check_finetune_args(args: argparse.Namespace) -> None:
    """The data options and the fine-tuning options (epochs, batch size, learning rate, slice, layers)."""
    check_data_args(args)
    checked("epochs", args.epochs, low=1, integer=True)
    checked("batch_size", args.batch_size, low=1, integer=True)
    checked("lr", args.lr, low=0, low_open=True)
    checked("last_k", args.last_k, low=-1, integer=True)
    if args.train_size is not None:
        checked("train_size", args.train_size, low=2, integer=True)


def check_curvature_args(args: argparse.Namespace) -> None:
    """The fine-tuned model's curvature options (query rank, token-cache limit)."""
    if args.query_rank is not None:
        checked("query_rank", args.query_rank, low=1, integer=True)
    checked("train_cache_max_gb", args.train_cache_max_gb, low=0, low_open=True)


def gib_to_bytes(gib: float) -> int:
    """``gib`` GiB (a finite number > 0) in bytes."""
    return int(checked("train_cache_max_gb", gib, low=0, low_open=True) * 2**30)
