"""The head's data: a training set, a validation half, an evaluation half of frozen features.

The held-out split of :func:`influent.pipeline.prepare_head` is divided (seeded) into

* ``val``: what the attacker may optimise against and what the defender may query (clean labels);
* ``eval``: used only to score (clean accuracy, attack success). Nothing is ever tuned on it.

So every attack is scored on clean held-out labels the attack never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from influent.models.head import LogisticHead, accuracy
from influent.models.refit import fit_head


@dataclass
class HeadData:
    """Frozen features + labels for training, validation and evaluation of a logistic head: the one record
    of the head's data that the attacks and the defences' experiments run on (built from a
    :class:`~influent.pipeline.HeadSetup` by :meth:`~influent.pipeline.HeadSetup.head_data`).

    Attributes:
        train_x, train_y: training features ``[n, d]`` float64 and labels ``[n]`` int64.
        val_x, val_y: validation half of the held-out split.
        eval_x, eval_y: evaluation half (scoring only).
        num_classes: K.
        l2: ridge coefficient of the head's objective.
        seed: the seed that made the val/eval division (and seeds the attack).
        train_texts, val_texts, eval_texts: raw texts (None for synthetic features).
        embed: texts -> float64 features with the same encoder (None for synthetic features).
        label_names: class names.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    l2: float
    seed: int = 0
    train_texts: list[str] | None = None
    val_texts: list[str] | None = None
    eval_texts: list[str] | None = None
    embed: Callable[[list[str]], torch.Tensor] | None = field(default=None, repr=False)
    label_names: list[str] | None = None
    train_ids: list[str] | None = None

    @property
    def n(self) -> int:
        return int(self.train_y.shape[0])

    def fit(
        self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, init: LogisticHead | None = None
    ) -> LogisticHead:
        """Train the head (to the optimum) on ``(x, y)`` (default: the clean training set)."""
        x = self.train_x if x is None else x
        y = self.train_y if y is None else y
        return fit_head(x, y, self.num_classes, self.l2, init=init)[0]

    def clean_accuracy(self, model: LogisticHead) -> float:
        """Accuracy on the evaluation half with its clean labels."""
        return accuracy(model, self.eval_x, self.eval_y)

    def with_training(self, x: torch.Tensor, y: torch.Tensor) -> HeadData:
        """The same experiment with a different (e.g. poisoned) training set."""
        return replace(self, train_x=x, train_y=y)


def split_heldout(n_heldout: int, seed: int, val_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Seeded division of ``range(n_heldout)`` into validation and evaluation positions."""
    perm = np.random.default_rng(seed).permutation(n_heldout)
    cut = round(val_fraction * n_heldout)
    return np.sort(perm[:cut]), np.sort(perm[cut:])
