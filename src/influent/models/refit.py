"""Fast exact retraining of the logistic head on modified data (poisoned, flipped, pruned, re-weighted).

Attacks and defences retrain the head many times (greedy rounds, k-fold, removal of the top k). The
generic :func:`influent.models.head.train_head` forms the Hessian with ``torch.func`` (tens of seconds
for 10k examples); here the gradient and Hessian of the same objective

    J(theta) = mean_i w_i CE(z_i) + (l2 / 2) ||theta||^2      (weights and bias; w_i = 1 by default)

are written in closed form and handed to the package's one Newton loop
(:func:`influent.models.newton.minimise`), so a solve takes well under a second. The optimum is the same
one (checked in ``tests/test_attacks.py``), and the result is an ordinary :class:`LogisticHead`.
"""

from __future__ import annotations

import numpy as np
import torch

from influent.models.head import HeadTask, LogisticHead
from influent.models.newton import minimise


class _HeadObjective:
    """``J``, its gradient and its Hessian over the flat parameters ``[C * (d + 1)]`` (rows of ``[W | b]``)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, w: torch.Tensor):
        self.X, self.l2, self.w = X, l2, w
        self.n, self.d1 = X.shape
        self.binary = num_classes == 2
        self.C = 1 if self.binary else num_classes
        self.Y = torch.nn.functional.one_hot(y, num_classes).double()
        self.eye = torch.eye(self.C * self.d1, dtype=torch.float64)

    def value(self, theta: torch.Tensor) -> float:
        W = theta.reshape(self.C, self.d1)
        Z = self.X @ W.T
        if self.binary:
            z = Z[:, 0]
            loss = torch.nn.functional.softplus(z) - self.Y[:, 1] * z
        else:
            loss = torch.logsumexp(Z, dim=1) - (Z * self.Y).sum(1)
        return float((loss * self.w).mean() + 0.5 * self.l2 * W.pow(2).sum())

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        W = theta.reshape(self.C, self.d1)
        Z = self.X @ W.T
        if self.binary:
            r = (torch.sigmoid(Z[:, 0]) - self.Y[:, 1]) * self.w
            return ((self.X.T @ r / self.n)[None, :] + self.l2 * W).reshape(-1)
        R = (Z.softmax(1) - self.Y) * self.w[:, None]
        return (R.T @ self.X / self.n + self.l2 * W).reshape(-1)

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        W = theta.reshape(self.C, self.d1)
        Z = self.X @ W.T
        X, n, C, d1 = self.X, self.n, self.C, self.d1
        if self.binary:
            p = torch.sigmoid(Z[:, 0])
            return (X.T * (p * (1 - p) * self.w)) @ X / n + self.l2 * self.eye
        P = Z.softmax(1)
        H = torch.zeros(C, d1, C, d1, dtype=torch.float64)
        for a in range(C):
            for b in range(a, C):
                block = (X.T * ((P[:, a] * (float(a == b) - P[:, b])) * self.w)) @ X / n
                H[a, :, b, :] = block
                H[b, :, a, :] = block
        return H.reshape(C * d1, C * d1) + self.l2 * self.eye


def fit_head(
    features: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    l2: float,
    *,
    weights: torch.Tensor | None = None,
    init: LogisticHead | None = None,
    tol: float = 1e-9,
    max_iter: int = 50,
    curvature: torch.Tensor | None = None,
) -> tuple[LogisticHead, HeadTask]:
    """Train a float64 :class:`LogisticHead` to the optimum of its L2-regularised objective by Newton.

    Args:
        features: ``[n, d]`` inputs (cast to float64).
        labels: ``[n]`` class indices.
        num_classes: K (2 gives the single-logit binary head).
        l2: ridge coefficient lambda (per parameter, weights and bias).
        weights: optional per-example weights ``[n]`` (mean loss becomes ``sum w_i l_i / n``).
        init: warm start (e.g. the model before a few labels changed); default zeros.
        tol: stop when the gradient norm of the objective is at most this (0: run ``max_iter`` iterations).
        max_iter: Newton iteration cap.
        curvature: a fixed positive-definite matrix ``[C (d + 1), C (d + 1)]`` used at every step instead of the
            Hessian at the iterate (e.g. :func:`head_hessian` of the trained head, for refits that start at its
            optimum after removing a few rows). The gradient is exact, so the optimum is the same; each step
            skips the ``O(n d^2)`` Hessian and convergence is linear with rate about the relative change of
            the Hessian (a few steps for small removals).
    """
    X = torch.cat([features.double(), features.new_ones(features.shape[0], 1).double()], dim=1)
    y = torch.as_tensor(labels, dtype=torch.long)
    w = torch.ones(X.shape[0], dtype=torch.float64) if weights is None else weights.double()
    objective = _HeadObjective(X, y, num_classes, l2, w)
    if init is not None:
        start = torch.cat([init.linear.weight.detach(), init.linear.bias.detach()[:, None]], dim=1).double()
    else:
        start = torch.zeros(objective.C, objective.d1, dtype=torch.float64)
    hessian = objective.hessian if curvature is None else (lambda theta: curvature)
    theta = minimise(
        objective.value, start.reshape(-1).clone(), hessian, tol, max_iter,
        gradient_fn=objective.gradient,
    ).theta.reshape(objective.C, objective.d1)
    model = LogisticHead(features.shape[1], num_classes).double()
    with torch.no_grad():
        model.linear.weight.copy_(theta[:, :-1])
        model.linear.bias.copy_(theta[:, -1])
    return model, HeadTask(l2)


def head_hessian(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor | np.ndarray, l2: float) -> torch.Tensor:
    """Hessian ``[C (d + 1), C (d + 1)]`` of :func:`fit_head`'s objective at ``model``'s parameters, in its layout
    (rows of ``[W | b]`` flattened; the ``curvature`` argument of :func:`fit_head`)."""
    X = torch.cat([features.double(), features.new_ones(features.shape[0], 1).double()], dim=1)
    y = torch.as_tensor(labels, dtype=torch.long)
    objective = _HeadObjective(X, y, model.num_classes, l2, torch.ones(X.shape[0], dtype=torch.float64))
    theta = torch.cat([model.linear.weight.detach(), model.linear.bias.detach()[:, None]], dim=1).double()
    return objective.hessian(theta.reshape(-1))
