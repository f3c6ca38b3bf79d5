"""A labelled text corpus with stable, content-derived example ids.

An example's id is a hash of its normalised text (:func:`text_id`), so the same review gets the same id
in every run, on every machine, whatever order the file lists it in. Python's salted ``hash()`` is
never used.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from influent.store import fingerprint

_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """The form of ``text`` that ids are computed from: NFKC, lowercased, whitespace collapsed, stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_id(text: str) -> str:
    """Stable id of a text: first 16 hex characters of the SHA-256 of :func:`normalise_text` (UTF-8).

    Texts that differ only in case, Unicode compatibility form or whitespace share an id (and are
    treated as duplicates by the loaders). The id serves de-duplication and the split files only: the
    embedding cache keys the exact text (:func:`influent.models.encoder.content_id`), since the tokenizer
    sees case and width.
    """
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()[:16]


@dataclass
class Corpus:
    """Labelled texts for classification.

    Attributes:
        ids: stable example ids (:func:`text_id` of each text), unique within the corpus.
        texts: the raw texts, in corpus order.
        labels: class index of each text, ``int64`` array of shape ``[N]`` with values in ``0..K-1``.
        label_names: human-readable name of each class index (length ``K``).
        source: description of where the corpus came from (informational; not part of the fingerprint).
        dropped: rows the loader dropped, by reason (``no_text``, ``no_label``, ``duplicate``; informational).
        rows: each example's row in its source, 1-based among the data rows (a file's header not counted),
            for messages that name rows; None when unknown. Not part of the fingerprint.
    """

    ids: list[str]
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    source: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    rows: list[int] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.ids) == len(self.texts) == len(self.labels)):
            raise ValueError(
                f"ids, texts and labels differ in length: {len(self.ids)}, {len(self.texts)}, {len(self.labels)}"
            )
        if self.rows is not None and len(self.rows) != len(self.ids):
            raise ValueError(f"rows has {len(self.rows)} entries for {len(self.ids)} examples")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (length of :attr:`label_names`)."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Corpus:
        """The examples at ``indices`` (positions in this corpus), in that order; label names kept."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Corpus(
            ids=[self.ids[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx].copy(),
            label_names=list(self.label_names),
            source=f"{self.source}[subset of {len(idx)}]",
            rows=None if self.rows is None else [self.rows[i] for i in idx],
        )

    def fingerprint(self) -> str:
        """16-hex digest of ids, labels and label names (order-sensitive); identifies the corpus contents."""
        return fingerprint(list(self.ids), self.labels.tolist(), list(self.label_names))
