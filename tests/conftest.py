"""Shared fixtures: a tiny BERT encoder built in code and a small labelled corpus on disk."""

from __future__ import annotations

import random

import pytest
import torch

POSITIVE = ["good", "great", "fun", "moving", "witty", "charming", "superb", "delightful"]
NEGATIVE = ["bad", "awful", "boring", "dull", "tedious", "clumsy", "weak", "messy"]
FILLER = ["the", "a", "movie", "film", "is", "was", "very", "plot", "actor", "story", "and", "but", "it", "this"]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """Folder with a randomly initialised 2-layer BERT (hidden 32) and its word-piece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-encoder")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]))
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config)
    # 128 positions, so the default max_length (128) fits; positions 0..63 and every other weight are the
    # ones the 64-position model always had (same figures), positions 64..127 drawn from their own seed.
    state = model.state_dict()
    extra = 0.02 * torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(64))
    key = "embeddings.position_embeddings.weight"
    state[key] = torch.cat([state[key], extra])
    state.pop("embeddings.position_ids", None)
    with torch.random.fork_rng():
        wide = BertModel(BertConfig(**{**config.to_dict(), "max_position_embeddings": 128}))
    wide.load_state_dict(state, strict=False)
    wide.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` short synthetic reviews ``(text, 'pos'|'neg')``, the sentiment words deciding the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    return rows


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory):
    """A CSV of 80 synthetic reviews with columns ``review`` and ``sentiment``."""
    import csv

    path = tmp_path_factory.mktemp("corpus") / "reviews.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        writer.writerows(make_reviews(80))
    return path


@pytest.fixture()
def data_args(tiny_encoder_dir, reviews_csv, tmp_path):
    """The CLI's data and model options for the tiny encoder and the review CSV, with a fresh cache."""
    return ["--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(tmp_path / "cache"), "--quiet"]


@pytest.fixture()
def base_args(data_args):
    """:func:`data_args` with the head's ridge coefficient of the CLI tests."""
    return [*data_args, "--l2", "0.01"]
