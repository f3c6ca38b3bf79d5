"""Retraining procedures used as ground truth: how a model is re-fitted on a subset of its training data.

A :class:`Trainer` re-fits the tracked parameters of a model (a flat vector, see
:class:`~influent.gradients.ParameterSpace`) on a training batch, starting from a given flat vector. Two
starts matter (Bae et al. 2022):

* **cold**: from the original initialisation with the original seed and settings (what "leave-one-out
  retraining" means in Koh & Liang and Basu et al.);
* **warm**: from the trained parameters ``theta_s`` (removes the dependence on the optimisation path).

:class:`NewtonTrainer` is exact for convex objectives with a formable Hessian (the logistic head; cold
start = the zero initialisation the head is trained from). :class:`MinibatchTrainer` replays a
minibatch optimiser (Adam or SGD) with a fixed seed for networks. Any callable with the same signature
can be used instead (e.g. a model's own fine-tuning loop).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from influent.curvature.exact import exact_hessian
from influent.errors import UserError
from influent.gradients import ParameterSpace, full_gradient, full_objective
from influent.models.newton import gauss_newton_sum, minimise
from influent.task import Batch, Task, slice_batch


class Trainer(Protocol):
    """Re-fits a model's tracked parameters.

    Attributes:
        init_theta: the original initialisation (flat ``[p]``) used for cold starts.
        settings: JSON-serialisable description of the procedure (part of every cache key).
    """

    init_theta: torch.Tensor
    settings: dict

    def fit(self, train_batch: Batch, keep: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Train on the rows ``keep`` (sorted int64 indices) of ``train_batch`` from the flat parameters ``start``.

        Returns the new flat parameters and an info dict (at least ``grad_norm`` and ``seconds``).
        """
        ...


@dataclass
class NewtonTrainer:
    """(Gauss-)Newton to a gradient-norm tolerance (convex objectives, p up to a few thousand).

    Args:
        model: the model (not modified: a copy is trained).
        task: its task (the objective includes ``task.l2``).
        init_theta: the cold-start point (None: zeros, as :func:`~influent.models.head.train_head` uses).
        curvature: ``'gauss_newton'`` (one matrix product per step; equals the Hessian for a linear model
            under cross-entropy) or ``'hessian'`` (``torch.func.hessian`` of the objective).
        tol: stop when ``||grad J|| < tol``.
        max_iter: iteration cap.
    """

    model: nn.Module
    task: Task
    init_theta: torch.Tensor | None = None
    curvature: str = "gauss_newton"
    tol: float = 1e-10
    max_iter: int = 100

    def __post_init__(self):
        if self.curvature not in ("gauss_newton", "hessian"):
            raise UserError(f"unknown curvature {self.curvature!r}; choose gauss_newton or hessian", field="curvature")
        self._space = ParameterSpace(copy.deepcopy(self.model), self.task)
        if self.init_theta is None:
            self.init_theta = torch.zeros_like(self._space.flat())
        self.settings = {
            "trainer": "newton",
            "curvature": self.curvature,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "l2": self.task.l2,
        }

    def fit(self, train_batch: Batch, keep: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        space = self._space
        batch = slice_batch(train_batch, keep)
        n = self.task.batch_size(batch)
        eye = torch.eye(space.dim, dtype=start.dtype)

        def objective(t):
            return full_objective(space, t, batch)

        if self.curvature == "gauss_newton":

            def curvature(t):
                return gauss_newton_sum(space, batch, t) / n + self.task.l2 * eye
        else:

            def curvature(t):
                return exact_hessian(space, batch, t)

        theta, it, gnorm, _ = minimise(objective, start.detach().clone(), curvature, self.tol, self.max_iter)
        return theta, {"grad_norm": gnorm, "iterations": it, "seconds": time.perf_counter() - t0}


@dataclass
class MinibatchTrainer:
    """Replays a seeded minibatch optimiser over the flat tracked parameters (any model + task).

    The objective is the task's: mean per-example loss + ``(l2/2)||theta||^2`` (AdamW's decoupled
    ``weight_decay`` is applied by the optimiser, outside the objective). The shuffling order, the dropout
    masks and everything else depend only on ``seed``, so a cold-start retrain without an example differs from
    the original run only by that example's absence: the full index set is permuted and the removed rows
    dropped, so the remaining examples keep their relative order.

    Args:
        model: the model (not modified; a copy is trained).
        task: its task.
        init_theta: the original initialisation ``[p]`` (cold start).
        epochs: passes over the data.
        lr: learning rate.
        batch_size: minibatch size.
        optimizer: ``'adam'``, ``'adamw'`` or ``'sgd'``.
        weight_decay: AdamW's decoupled weight decay.
        dropout: train in ``train()`` mode (dropout on, seeded) as fine-tuning does; else ``eval()`` mode.
        seed: seeds the shuffling and dropout.
    """

    model: nn.Module
    task: Task
    init_theta: torch.Tensor
    epochs: int = 5
    lr: float = 1e-2
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 0.0
    dropout: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose adam, adamw or sgd", field="optimizer")
        self._space = ParameterSpace(copy.deepcopy(self.model), self.task)
        self.settings = {
            "trainer": "minibatch",
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "dropout": self.dropout,
            "seed": self.seed,
            "l2": self.task.l2,
        }

    def _optimizer(self, theta: torch.Tensor) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW([theta], lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam([theta], lr=self.lr)
        return torch.optim.SGD([theta], lr=self.lr)

    def fit(self, train_batch: Batch, keep: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        space = self._space
        n_full = self.task.batch_size(train_batch)
        kept = torch.zeros(n_full, dtype=torch.bool)
        kept[keep] = True
        theta = start.detach().clone().requires_grad_(True)
        opt = self._optimizer(theta)
        gen = torch.Generator().manual_seed(self.seed)
        space.model.train(self.dropout)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for _ in range(self.epochs):
                    # permute the full index set, then drop removed rows: the rest keep their relative order
                    order = torch.randperm(n_full, generator=gen)
                    order = order[kept[order]]
                    for s in range(0, len(order), self.batch_size):
                        part = slice_batch(train_batch, order[s : s + self.batch_size])
                        loss = space.losses(theta, part).mean()
                        if self.task.l2:
                            loss = loss + 0.5 * self.task.l2 * theta.pow(2).sum()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
        finally:
            space.model.eval()
        theta = theta.detach()
        batch = slice_batch(train_batch, keep)
        gnorm = float(full_gradient(space, theta, batch).norm())
        with torch.no_grad():
            obj = float(full_objective(space, theta, batch))
        return theta, {"grad_norm": gnorm, "objective": obj, "seconds": time.perf_counter() - t0}
