"""Seeded, stratified train/test splits that are saved to disk and reused, and the stratified training slice.

A split is stored as the example ids of its two sides, so it survives a re-ordered corpus file and can
be read (and edited) by a person. Once written, the saved split wins over recomputation; it is checked
on every load (checksum, ids in the corpus, no overlap, no empty side).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influent.data.corpus import Corpus
from influent.errors import CacheCorruptError, UserError
from influent.store import CHECKSUM_KEY, read_json, write_json

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Indices (positions in the corpus, sorted ``int64`` arrays) of the train and test sides.

    Attributes:
        train_idx: training example positions.
        test_idx: held-out example positions.
        path: the JSON file the split was saved to / read from (``None`` if never saved).
    """

    train_idx: np.ndarray
    test_idx: np.ndarray
    path: Path | None = None


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"test fraction must be strictly between 0 and 1, got {test_fraction}")


def stratified_split(
    corpus: Corpus, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``corpus`` into train and test positions, stratified by label.

    Each class contributes ``round(test_fraction * n_class)`` examples to the test side, but at least one
    to each side when the class has two or more examples. Deterministic given ``seed`` (a numpy
    ``Generator``) and the corpus order.

    Returns:
        ``(train_idx, test_idx)``: sorted, disjoint ``int64`` arrays covering ``0..len(corpus)-1``.
    """
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(max(corpus.num_classes, int(corpus.labels.max(initial=-1)) + 1)):
        members = np.flatnonzero(corpus.labels == label)
        if members.size == 0:
            continue
        members = rng.permutation(members)
        n_test = round(test_fraction * members.size)
        if members.size >= 2:
            n_test = min(max(n_test, 1), members.size - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    train_idx = np.sort(np.concatenate(train)).astype(np.int64) if train else np.zeros(0, np.int64)
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    if len(test_idx) == 0:  # every class has a single example: nothing can be held out
        raise UserError(f"{corpus.source or 'corpus'}: {len(corpus)} examples are too few for a held-out split "
                        "(each class needs at least 2)")
    return train_idx, test_idx


def stratified_sample(labels: np.ndarray, size: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``size`` distinct positions of ``labels`` with the label proportions of ``labels`` (seeded, sorted).

    The one training-slice sampler (``train``, ``validate`` and the attacks draw ``train_size`` through it, so
    the same seed gives the same slice). Class ``c`` with ``n_c`` of the ``n`` labels contributes
    ``min(n_c, max(1, round(size * n_c / n)))`` positions drawn without replacement by a numpy ``Generator``
    seeded with ``seed``; when rounding makes the total exceed ``size``, the sorted draw is cut to ``size``.
    ``size >= n`` returns every position.

    Args:
        labels: ``[n]`` integer class labels.
        size: how many positions to draw (>= 1).
        seed: seeds the draw; a ``Generator`` is drawn from (and advanced) as is, for callers that take
            more from the same stream.

    Returns:
        Sorted ``int64`` positions into ``labels``, at most ``size`` of them.

    Raises:
        UserError: ``size`` below 1 (field ``train_size``).
    """
    if int(size) < 1:
        raise UserError(f"the training slice needs at least 1 example, got {size}", field="train_size")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    classes, counts = np.unique(labels, return_counts=True)
    for c, cnt in zip(classes, counts):
        k = max(1, round(size * cnt / len(labels)))
        chosen.append(rng.choice(np.flatnonzero(labels == c), min(k, cnt), replace=False))
    if not chosen:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(chosen))[:size].astype(np.int64)


def split_path(corpus: Corpus, cache_dir: str | Path, test_fraction: float, seed: int) -> Path:
    """Where the split of ``corpus`` for ``(seed, test_fraction)`` is saved under ``cache_dir``."""
    return Path(cache_dir) / "splits" / f"{corpus.fingerprint()}-seed{seed}-test{float(test_fraction):g}.json"


def _saved_split_problem(saved, corpus: Corpus) -> str | None:
    """Why a saved split cannot be used for ``corpus`` (None if it can): structure, ids, overlap, sides."""
    if not isinstance(saved, dict):
        return "it is not an object with train_ids and test_ids"
    train_ids, test_ids = saved.get("train_ids"), saved.get("test_ids")
    if not isinstance(train_ids, list) or not isinstance(test_ids, list):
        return "it has no train_ids / test_ids lists"
    if not all(isinstance(i, str) for i in train_ids + test_ids):
        return "its ids are not all strings"
    if not train_ids or not test_ids:
        return f"its {'train' if not train_ids else 'test'} side is empty"
    position = {id_: i for i, id_ in enumerate(corpus.ids)}
    missing = [i for i in train_ids + test_ids if i not in position]
    if missing:
        return f"it lists {len(missing)} ids not in the corpus (e.g. {missing[0]})"
    overlap = set(train_ids) & set(test_ids)
    if overlap:
        return f"{len(overlap)} ids are on both sides (e.g. {min(overlap)})"
    if len(set(train_ids)) != len(train_ids) or len(set(test_ids)) != len(test_ids):
        return "it lists an id twice"
    return None


def _read_saved_split(path: Path, corpus: Corpus) -> tuple[list[str], list[str]] | None:
    """The ``(train_ids, test_ids)`` of a saved split, or None when the file is damaged (warned: recompute).

    A file whose checksum fails but whose content is a valid split of ``corpus`` was edited by hand: it is
    used (with a one-line warning) and saved again with its checksum. A split that is not valid for the
    corpus (ids missing, an overlap, an empty side) is a UserError, whether edited or damaged.
    """
    try:
        saved, edited = read_json(path), False
    except CacheCorruptError as exc:
        try:
            saved, edited = json.loads(path.read_text(encoding="utf-8")), True
        except (OSError, UnicodeDecodeError, ValueError):
            logger.warning("%s; making the seeded split again", exc)
            return None
    if not isinstance(saved, dict) or not {"train_ids", "test_ids"} <= set(saved):
        logger.warning("split file %s is damaged (no train_ids / test_ids); making the seeded split again", path)
        return None
    problem = _saved_split_problem(saved, corpus)
    if problem is not None:
        raise UserError(f"split file {path} cannot be used: {problem}; delete it to make a new split")
    train_ids, test_ids = list(saved["train_ids"]), list(saved["test_ids"])
    if edited:
        logger.warning(
            "split file %s was edited (its checksum differs); using its %d train / %d test ids",
            path, len(train_ids), len(test_ids),
        )
        saved.pop(CHECKSUM_KEY, None)
        _save_split(path, saved)
    return train_ids, test_ids


def _save_split(path: Path, content: dict) -> None:
    try:
        write_json(path, content)
    except OSError as exc:  # a read-only cache still gives the split; it is just not saved
        logger.warning("split file %s could not be saved (%s)", path, exc.strerror or type(exc).__name__)


def load_or_make_split(
    corpus: Corpus, cache_dir: str | Path, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Read the saved split of ``corpus`` or make one with :func:`stratified_split` and save it.

    The file is ``<cache_dir>/splits/<corpus fingerprint>-seed<seed>-test<fraction>.json`` and holds the
    ids of both sides, with a checksum. A saved file is verified and validated: a damaged file is
    remade from the seed (one-line warning); a hand-edited file is used if it is a valid split (see
    :func:`_read_saved_split`).

    Raises:
        UserError: the saved split is not valid for the corpus (ids not in it, an id on both sides, an
            empty side), or the corpus is too small to give both sides an example (field ``data``).
    """
    _check_fraction(test_fraction)
    path = split_path(corpus, cache_dir, test_fraction, seed)
    saved = _read_saved_split(path, corpus) if path.exists() else None
    if saved is not None:
        position = {id_: i for i, id_ in enumerate(corpus.ids)}
        train_idx = np.array([position[i] for i in saved[0]], dtype=np.int64)
        test_idx = np.array([position[i] for i in saved[1]], dtype=np.int64)
        return Split(train_idx=train_idx, test_idx=test_idx, path=path)

    train_idx, test_idx = stratified_split(corpus, test_fraction, seed)
    if train_idx.size == 0 or test_idx.size == 0:
        raise UserError(
            f"too few examples to split: {len(corpus)} examples leave the {'train' if not train_idx.size else 'test'} "
            f"side empty at test fraction {float(test_fraction):g} (a class needs 2 examples to give one to "
            "each side)",
            field="data",
        )
    _save_split(
        path,
        {
            "corpus_fingerprint": corpus.fingerprint(),
            "source": corpus.source,
            "seed": seed,
            "test_fraction": float(test_fraction),
            "train_ids": [corpus.ids[i] for i in train_idx],
            "test_ids": [corpus.ids[i] for i in test_idx],
        },
    )
    return Split(train_idx=train_idx, test_idx=test_idx, path=path)
