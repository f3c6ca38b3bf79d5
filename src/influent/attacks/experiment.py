"""The data an attack or audit experiment runs on: a training set, a validation half, an evaluation half.

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
class HeadExperiment:
    """Frozen features + labels for training, validation and evaluation of a logistic head.

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

    def with_training(self, x: torch.Tensor, y: torch.Tensor) -> HeadExperiment:
        """The same experiment with a different (e.g. poisoned) training set."""
        return replace(self, train_x=x, train_y=y)


def split_heldout(n_heldout: int, seed: int, val_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Seeded division of ``range(n_heldout)`` into validation and evaluation positions."""
    perm = np.random.default_rng(seed).permutation(n_heldout)
    cut = round(val_fraction * n_heldout)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def from_setup(setup, seed: int = 0, val_fraction: float = 0.5) -> HeadExperiment:
    """A :class:`HeadExperiment` from a :class:`~influent.pipeline.HeadSetup` (val/eval split by ``seed``)."""
    val, ev = split_heldout(len(setup.test_idx), seed, val_fraction)
    texts = setup.corpus.texts
    ids = setup.corpus.ids
    tr_texts = [texts[i] for i in setup.train_idx]
    te_texts = [texts[i] for i in setup.test_idx]
    return HeadExperiment(
        train_x=setup.train_x.double(),
        train_y=setup.train_y.long(),
        val_x=setup.test_x[val].double(),
        val_y=setup.test_y[val].long(),
        eval_x=setup.test_x[ev].double(),
        eval_y=setup.test_y[ev].long(),
        num_classes=len(setup.corpus.label_names),
        l2=float(setup.task.l2),
        seed=seed,
        train_texts=tr_texts,
        val_texts=[te_texts[i] for i in val],
        eval_texts=[te_texts[i] for i in ev],
        embed=setup.embed,
        label_names=list(setup.corpus.label_names),
        train_ids=[ids[i] for i in setup.train_idx],
    )


def synthetic_experiment(
    n: int = 2000, d: int = 16, num_classes: int = 2, l2: float = 1e-3, noise: float = 1.0, seed: int = 0
) -> HeadExperiment:
    """A linearly separable-with-noise problem for tests (no texts)."""
    gen = torch.Generator().manual_seed(seed)
    total = n + n // 2
    w = torch.randn(d, num_classes, generator=gen, dtype=torch.float64)
    x = torch.randn(total, d, generator=gen, dtype=torch.float64)
    y = (
        x @ w * (2 / d**0.5) + noise * torch.randn(total, num_classes, generator=gen, dtype=torch.float64)
    ).argmax(1)
    val, ev = split_heldout(total - n, seed)
    hx, hy = x[n:], y[n:]
    return HeadExperiment(x[:n], y[:n], hx[val], hy[val], hx[ev], hy[ev], num_classes, l2, seed)
