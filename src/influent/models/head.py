"""L2-regularised logistic regression on frozen text embeddings, trained to the optimum.

Binary problems use one logit (sigmoid, ``d + 1`` parameters); K > 2 classes use a softmax over K logits.
Objective (the one influence differentiates): ``mean_i CE(z_i) + (l2/2) ||theta||^2`` over weights and bias.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influent.models.classifier import fraction_correct
from influent.models.newton import TrainReport, fit_newton
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


def probabilities(model: LogisticHead, features: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[n, K]`` (float64)."""
    with torch.no_grad():
        return model.probabilities(features.double())


def predict(model: LogisticHead, features: torch.Tensor) -> torch.Tensor:
    """Most probable class of each row, ``[n]`` int64."""
    return probabilities(model, features).argmax(1)


def per_example_loss(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example ``[n]`` (nats; no L2 term)."""
    with torch.no_grad():
        return HeadTask(0.0).per_example_loss(model, (features.double(), torch.as_tensor(labels).long()))


def accuracy(model: LogisticHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose most probable class equals ``labels``."""
    return fraction_correct(predict(model, features), labels)


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
