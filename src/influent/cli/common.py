"""Options every command shares (data, model, fine-tuning, curvature) and the model set-ups they build.

Library code names the *field* a mistake is about (``damping``); :func:`flag` turns it into the flag the user
typed (``--damping``).
"""

from __future__ import annotations

import argparse

from influent.errors import UserError


def flag(field: str) -> str:
    """The command-line flag of a library field: ``train_size`` -> ``--train-size``."""
    return "--" + field.replace("_", "-")


def add_data_options(p: argparse.ArgumentParser) -> None:
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


def head_setup(args: argparse.Namespace, retrain: bool = False):
    """Train (or load) the frozen-encoder head the data options describe."""
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


def gib_to_bytes(gib: float) -> int:
    if not gib > 0:
        raise UserError(f"--train-cache-max-gb must be > 0, got {gib}")
    return int(gib * 2**30)
