"""Fast exact retraining of the logistic head on modified data (poisoned, flipped, pruned).

Attacks and defences retrain the head many times (greedy rounds, k-fold, removal of the top k). The
generic :func:`influent.models.head.train_head` forms the Hessian with ``torch.func`` (tens of seconds
for 10k examples); here the gradient and Hessian of the same objective

    J(theta) = mean_i CE(z_i) + (l2 / 2) ||theta||^2      (weights and bias)

are written in closed form, so a Newton solve takes well under a second. The optimum is the same one
(checked in ``tests/test_attacks.py``), and the result is an ordinary :class:`LogisticHead`.
"""

from __future__ import annotations

import numpy as np
import torch

from influent.models.head import HeadTask, LogisticHead


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


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
) -> tuple[LogisticHead, HeadTask]:
    """Train a float64 :class:`LogisticHead` to the optimum of its L2-regularised objective by Newton.

    Args:
        features: ``[n, d]`` inputs (cast to float64).
        labels: ``[n]`` class indices.
        num_classes: K (2 gives the single-logit binary head).
        l2: ridge coefficient lambda (per parameter, weights and bias).
        weights: optional per-example weights ``[n]`` (mean loss becomes ``sum w_i l_i / n``).
        init: warm start (e.g. the model before a few labels changed).
        tol: stop when the gradient norm of the objective is below this.
        max_iter: Newton iteration cap.
    """
    X = _augment(features.double())
    y = torch.as_tensor(labels, dtype=torch.long)
    n, d1 = X.shape
    binary = num_classes == 2
    C = 1 if binary else num_classes
    Y = torch.nn.functional.one_hot(y, num_classes).double()
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    if init is not None:
        W = (
            torch.cat([init.linear.weight.detach(), init.linear.bias.detach()[:, None]], dim=1)
            .double()
            .clone()
        )
    else:
        W = torch.zeros(C, d1, dtype=torch.float64)
    eye = torch.eye(C * d1, dtype=torch.float64)

    def grad_hess(W):
        Z = X @ W.T
        if binary:
            p = torch.sigmoid(Z[:, 0])
            r = (p - Y[:, 1]) * w
            g = (X.T @ r / n)[None, :] + l2 * W
            s = p * (1 - p) * w
            H = (X.T * s) @ X / n + l2 * eye
            return g.reshape(-1), H
        P = Z.softmax(1)
        R = (P - Y) * w[:, None]
        g = R.T @ X / n + l2 * W  # [C, d1]
        H = torch.zeros(C, d1, C, d1, dtype=torch.float64)
        for a in range(C):
            for b in range(a, C):
                s = (P[:, a] * (float(a == b) - P[:, b])) * w
                block = (X.T * s) @ X / n
                H[a, :, b, :] = block
                H[b, :, a, :] = block
        return g.reshape(-1), H.reshape(C * d1, C * d1) + l2 * eye

    def objective(W):
        Z = X @ W.T
        if binary:
            z = Z[:, 0]
            loss = torch.nn.functional.softplus(z) - Y[:, 1] * z
        else:
            loss = torch.logsumexp(Z, dim=1) - (Z * Y).sum(1)
        return float((loss * w).mean() + 0.5 * l2 * W.pow(2).sum())

    f = objective(W)
    for _ in range(max_iter):
        g, H = grad_hess(W)
        if float(g.norm()) < tol:
            break
        step = torch.linalg.solve(H, g).reshape(C, d1)
        t = 1.0
        while True:
            cand = W - t * step
            fc = objective(cand)
            if fc <= f - 1e-4 * t * float(g @ step.reshape(-1)) or t < 1e-10:
                break
            t *= 0.5
        W, f = cand, fc
    model = LogisticHead(features.shape[1], num_classes).double()
    with torch.no_grad():
        model.linear.weight.copy_(W[:, :-1])
        model.linear.bias.copy_(W[:, -1])
    return model, HeadTask(l2)


def predict(model: LogisticHead, features: torch.Tensor) -> torch.Tensor:
    """Most probable class of each row, ``[n]`` int64."""
    with torch.no_grad():
        return model.probabilities(features.double()).argmax(1)


def probabilities(model: LogisticHead, features: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[n, K]`` (float64)."""
    with torch.no_grad():
        return model.probabilities(features.double())


def per_example_loss(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example ``[n]`` (nats)."""
    with torch.no_grad():
        return HeadTask(0.0).per_example_loss(model, (features.double(), torch.as_tensor(labels).long()))


def accuracy(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose predicted class equals ``labels``."""
    return float((predict(model, features) == torch.as_tensor(labels)).double().mean())
