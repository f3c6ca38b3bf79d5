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
    BertModel(config).save_pretrained(folder)
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
