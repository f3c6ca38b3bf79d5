"""L2-regularised logistic regression on frozen text embeddings, trained to the optimum.

Binary problems use one logit (sigmoid, ``d + 1`` parameters); K > 2 classes use a softmax over K logits.
Objective (the one influence differentiates): ``mean_i CE(z_i) + (l2/2) ||theta||^2`` over weights and bias.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influent.errors import CacheCorruptError
from influent.models.classifier import fraction_correct
from influent.models.newton import TrainReport, fit_newton
from influent.store import read_json, read_tensors_with_metadata, write_json, write_tensors
from influent.task import Batch, Task

WEIGHTS_CHECKSUM = "weights_sha256"  # head.json's pin of head.safetensors


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
    """Write ``head.safetensors`` and ``head.json`` (settings + ``info``) into ``folder`` atomically.

    ``head.json`` (written last) pins the checksum of ``head.safetensors``, so :func:`load_head` never
    pairs a config with other weights.
    """
    folder = Path(folder)
    sha = write_tensors(folder / "head.safetensors", dict(model.state_dict()))
    config = {"dim": model.linear.in_features, "num_classes": model.num_classes, "l2": task.l2, **info}
    write_json(folder / "head.json", {**config, WEIGHTS_CHECKSUM: sha})


def load_head(folder: str | Path) -> tuple[LogisticHead, HeadTask, dict]:
    """Load and verify a head saved by :func:`save_head`; returns model, task and the saved JSON.

    Raises:
        CacheCorruptError: ``head.json`` or ``head.safetensors`` is damaged, truncated, missing, from
            another save, of the wrong shape or not finite (one line naming the file).
    """
    folder = Path(folder)
    config_path, weights_path = folder / "head.json", folder / "head.safetensors"
    try:
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise CacheCorruptError(f"cache file {config_path} is not an object")
        dim, k, l2 = config.get("dim"), config.get("num_classes"), config.get("l2")
        valid_l2 = isinstance(l2, float | int) and math.isfinite(l2) and l2 >= 0
        if not (isinstance(dim, int) and dim >= 1 and isinstance(k, int) and k >= 2 and valid_l2):
            raise CacheCorruptError(f"cache file {config_path} lacks a valid dim / num_classes / l2")
        state = read_tensors_with_metadata(weights_path, expect_sha256=config.get(WEIGHTS_CHECKSUM))[0]
    except FileNotFoundError as exc:
        missing = Path(exc.filename).name if exc.filename else "a file"
        raise CacheCorruptError(f"head cache {folder} is incomplete ({missing} missing)") from None
    model = LogisticHead(dim, k).double()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if {name: tuple(t.shape) for name, t in state.items()} != expected:
        raise CacheCorruptError(f"cache file {weights_path} holds other tensors than a [{dim}] -> {k} head")
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise CacheCorruptError(f"cache file {weights_path} holds non-finite weights")
    model.load_state_dict({name: t.double() for name, t in state.items()})
    config = {key: value for key, value in config.items() if key != WEIGHTS_CHECKSUM}
    return model, HeadTask(float(l2)), config
