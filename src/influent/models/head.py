"""L2-regularised logistic regression on frozen text embeddings, trained to the optimum.

Binary problems use one logit (sigmoid, ``d + 1`` parameters); K > 2 classes use a softmax over K logits.
Objective (the one influence differentiates): ``mean_i CE(z_i) + (l2/2) ||theta||^2`` over weights and bias.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influent.curvature.exact import exact_hessian
from influent.gradients import ParameterSpace, full_gradient, full_objective
from influent.store import read_json, read_tensors, write_json, write_tensors
from influent.task import Batch, Task


class LogisticHead(nn.Module):
    """Linear logits over embeddings: ``[B, d] -> [B, 1]`` (binary) or ``[B, K]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        self.num_classes = num_classes
        self.linear = nn.Linear(dim, 1 if num_classes == 2 else num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, K]``."""
        logits = self(x)
        if self.num_classes == 2:
            p1 = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p1, p1], dim=1)
        return logits.softmax(dim=1)


class HeadTask(Task):
    """Cross-entropy of a :class:`LogisticHead`; a batch is ``(features [B, d], labels [B])``.

    Args:
        l2: ridge coefficient lambda of the objective.
    """

    def __init__(self, l2: float):
        self.l2 = float(l2)

    def model_output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0])

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch[1]
        if outputs.shape[-1] == 1:
            return F.binary_cross_entropy_with_logits(outputs[:, 0], labels.to(outputs.dtype), reduction="none")
        return F.cross_entropy(outputs, labels, reduction="none")

    def perturbable_input(self, batch: Batch) -> torch.Tensor:
        return batch[0]

    def replace_input(self, batch: Batch, features: torch.Tensor) -> Batch:
        return (features, batch[1])


@dataclass
class TrainReport:
    """How the optimisation ended: gradient norm of the objective, Newton iterations, seconds."""

    grad_norm: float
    iterations: int
    seconds: float
    objective: float


def fit_newton(
    model: nn.Module, task: Task, batch: Batch, tol: float = 1e-10, max_iter: int = 100
) -> TrainReport:
    """Minimise the task's objective over the tracked parameters by damped Newton with backtracking.

    For convex objectives with a formable Hessian (the logistic head). Stops when the gradient's
    Euclidean norm is below ``tol``; the model is updated in place.
    """
    start = time.perf_counter()
    space = ParameterSpace(model, task)
    theta = space.flat()
    f = float(full_objective(space, theta, batch))
    g = full_gradient(space, theta, batch)
    it = 0
    while float(g.norm()) > tol and it < max_iter:
        it += 1
        H = exact_hessian(space, batch, theta)
        step = torch.linalg.solve(H, g)
        t = 1.0
        while True:
            cand = theta - t * step
            f_cand = float(full_objective(space, cand, batch))
            if f_cand <= f - 1e-4 * t * float(g @ step) or t < 1e-10:
                break
            t *= 0.5
        theta, f = cand, f_cand
        g = full_gradient(space, theta, batch)
    space.load(theta)
    return TrainReport(float(g.norm()), it, time.perf_counter() - start, f)


def train_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, tol: float = 1e-10
) -> tuple[LogisticHead, HeadTask, TrainReport]:
    """Train a float64 :class:`LogisticHead` to the optimum of the L2-regularised objective."""
    x = features.double()
    model = LogisticHead(x.shape[1], num_classes).double()
    nn.init.zeros_(model.linear.weight)
    nn.init.zeros_(model.linear.bias)
    task = HeadTask(l2)
    report = fit_newton(model, task, (x, labels.long()), tol=tol)
    return model, task, report


def accuracy(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class equals the label."""
    with torch.no_grad():
        pred = model.probabilities(features.to(next(model.parameters()).dtype)).argmax(1)
    return float((pred == labels).double().mean())


def save_head(model: LogisticHead, task: HeadTask, folder: str | Path, info: dict) -> None:
    """Write ``head.safetensors`` and ``head.json`` (settings + ``info``) into ``folder`` atomically."""
    folder = Path(folder)
    write_tensors(folder / "head.safetensors", dict(model.state_dict()))
    config = {"dim": model.linear.in_features, "num_classes": model.num_classes, "l2": task.l2, **info}
    write_json(folder / "head.json", config)


def load_head(folder: str | Path) -> tuple[LogisticHead, HeadTask, dict]:
    """Load a head saved by :func:`save_head`; returns model, task and the saved JSON."""
    folder = Path(folder)
    config = read_json(folder / "head.json")
    model = LogisticHead(config["dim"], config["num_classes"]).double()
    model.load_state_dict(read_tensors(folder / "head.safetensors"))
    return model, HeadTask(config["l2"]), config
