"""The data an attack or audit experiment runs on: the head's record (:class:`~influent.models.head_data.HeadData`).

``HeadExperiment`` is that record under its attacks name; :func:`from_setup` builds it from a
:class:`~influent.pipeline.HeadSetup` and :func:`synthetic_experiment` makes one for tests.
"""

from __future__ import annotations

import torch

from influent.models.head_data import HeadData, split_heldout

HeadExperiment = HeadData
"""The head's record (:class:`~influent.models.head_data.HeadData`) under the name the attacks use."""

__all__ = ["HeadExperiment", "from_setup", "split_heldout", "synthetic_experiment"]


def from_setup(setup, seed: int = 0, val_fraction: float = 0.5) -> HeadExperiment:
    """:meth:`HeadSetup.head_data <influent.pipeline.HeadSetup.head_data>` (val/eval split by ``seed``)."""
    return setup.head_data(seed, val_fraction)


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
