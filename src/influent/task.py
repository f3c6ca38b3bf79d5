"""What the user supplies to the engine: how a batch becomes losses and query measurements.

The engine never looks inside a batch. A batch is any pytree (tensor, tuple, dict) of tensors whose
leading dimension indexes examples; the engine only slices it along that dimension (``vmap`` for
per-example gradients) and hands it back to the task.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

Batch = Any


class Task:
    """How losses and query measurements are computed for one model.

    Subclasses implement :meth:`per_example_loss`. The training objective the engine differentiates is

        J(theta) = mean_i per_example_loss(z_i) + (l2 / 2) * ||theta_tracked||^2

    so ``l2`` is the ridge coefficient lambda (dimensionless, per parameter). Set ``l2 = 0`` for a model
    trained without weight decay.
    """

    l2: float = 0.0

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each example in ``batch`` (shape ``[B]``, natural log units, no regularisation).

        Default: :meth:`output_loss` of :meth:`model_output`. Override either this or both of those.
        """
        return self.output_loss(self.model_output(model, batch), batch)

    def model_output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The network's output for ``batch`` (e.g. logits ``[B, C]``); needed for Gauss-Newton curvature."""
        raise NotImplementedError(f"{type(self).__name__} does not define model_output")

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[B]`` from :meth:`model_output`'s outputs (convex in the outputs for GN)."""
        raise NotImplementedError(f"{type(self).__name__} does not define output_loss")

    def perturbable_input(self, batch: Batch) -> torch.Tensor:
        """The continuous input features of ``batch`` that ``I_pert,loss`` differentiates against."""
        raise NotImplementedError(f"{type(self).__name__} has no continuous input to perturb")

    def replace_input(self, batch: Batch, features: torch.Tensor) -> Batch:
        """``batch`` with its continuous input features replaced by ``features``."""
        raise NotImplementedError(f"{type(self).__name__} has no continuous input to perturb")

    def query_measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Measurement ``f(z_query)`` whose change influence predicts (shape ``[B]``); default: the loss."""
        return self.per_example_loss(model, batch)

    def tracked_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters influence is computed over; default: every parameter that requires grad."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in ``batch`` (the leading dimension of its first tensor)."""
        return int(_first_tensor(batch).shape[0])


def _first_tensor(batch: Batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return _first_tensor(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _first_tensor(batch[0])
    raise TypeError(f"batch must be a tensor, dict, list or tuple of tensors, got {type(batch).__name__}")


def slice_batch(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Rows ``index`` of every tensor in ``batch`` (the only way the engine touches a batch)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: slice_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, index) for v in batch)
    raise TypeError(f"batch must be a tensor, dict, list or tuple of tensors, got {type(batch).__name__}")


def iter_chunks(batch: Batch, n: int, chunk: int) -> Iterable[tuple[int, Batch]]:
    """Yield ``(start, rows start:start+chunk)`` over a batch of ``n`` examples."""
    for start in range(0, n, chunk):
        yield start, slice_batch(batch, slice(start, min(n, start + chunk)))
