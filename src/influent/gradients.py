"""Per-example gradients and the training objective, as functions of one flat parameter vector.

Everything here works for any ``nn.Module`` + :class:`~influent.task.Task`: the model is called through
``torch.func.functional_call`` with the tracked parameters replaced, and per-example gradients come from
``torch.func.vmap`` over ``torch.func.grad`` (no Python loop over examples).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influent.errors import UserError
from influent.task import Batch, Task, iter_chunks, map_batch


class ParameterSpace:
    """The tracked parameters of a model as one flat vector (order: ``named_parameters``).

    Args:
        model: the network.
        task: says which parameters are tracked.
    """

    def __init__(self, model: nn.Module, task: Task):
        self.model = model
        self.task = task
        tracked = task.tracked_parameters(model)
        if not tracked:
            raise UserError("the task tracks no parameters")
        self.names = list(tracked)
        self.shapes = [tracked[n].shape for n in self.names]
        self.sizes = [tracked[n].numel() for n in self.names]
        self.dim = sum(self.sizes)
        self._wrapper = _LossModule(model, task)

    def flat(self) -> torch.Tensor:
        """Current tracked parameters as a detached flat vector ``[p]``."""
        tracked = self.task.tracked_parameters(self.model)
        return torch.cat([tracked[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[p]`` into ``{name: tensor}`` with the parameters' shapes."""
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = theta[start : start + size].view(shape)
            start += size
        return out

    def load(self, theta: torch.Tensor) -> None:
        """Write a flat vector back into the model's tracked parameters (in place)."""
        tracked = self.task.tracked_parameters(self.model)
        with torch.no_grad():
            for name, value in self.unflatten(theta).items():
                tracked[name].copy_(value)

    # --- functional losses -------------------------------------------------------------------------------
    def losses(self, theta: torch.Tensor, batch: Batch, kind: str = "loss") -> torch.Tensor:
        """Per-example losses (``kind='loss'``) or query measurements (``'measure'``) at ``theta``, ``[B]``."""
        params = {f"model.{k}": v for k, v in self.unflatten(theta).items()}
        return functional_call(self._wrapper, params, (batch, kind))

    def example_loss(self, theta: torch.Tensor, example: Batch, kind: str = "loss") -> torch.Tensor:
        """Scalar loss of one example given without its batch dimension (for ``vmap``)."""
        return self.losses(theta, unsqueeze_example(example), kind)[0]

    def per_example_grads(
        self, batch: Batch, theta: torch.Tensor | None = None, kind: str = "loss", chunk: int = 2048
    ) -> torch.Tensor:
        """Gradients of each example's loss (or measurement) w.r.t. the tracked parameters, ``[B, p]``.

        Regularisation is not included (it is not per-example). Computed with ``vmap(grad(...))``.
        """
        theta = self.flat() if theta is None else theta
        g = vmap(grad(self.example_loss), in_dims=(None, 0, None))
        n = self.task.batch_size(batch)
        return torch.cat([g(theta, part, kind) for _, part in iter_chunks(batch, n, chunk)], dim=0)

    def loss_values(self, batch: Batch, theta: torch.Tensor | None = None, kind: str = "loss") -> torch.Tensor:
        """Per-example losses or measurements ``[B]`` at ``theta`` (default: current parameters)."""
        theta = self.flat() if theta is None else theta
        with torch.no_grad():
            return self.losses(theta, batch, kind)


def full_objective(space: ParameterSpace, theta: torch.Tensor, batch: Batch, chunk: int = 4096) -> torch.Tensor:
    """Training objective over all of ``batch``: mean loss + (l2/2)||theta||^2 (differentiable)."""
    n = space.task.batch_size(batch)
    total = sum(space.losses(theta, part).sum() for _, part in iter_chunks(batch, n, chunk))
    return total / n + 0.5 * space.task.l2 * theta.pow(2).sum()


def full_gradient(space: ParameterSpace, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Gradient ``[p]`` of :func:`full_objective` at ``theta``."""
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(full_objective(space, theta, batch), theta)
    return g.detach()


class _LossModule(nn.Module):
    """Wraps model + task so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Batch, kind: str) -> torch.Tensor:
        if kind == "loss":
            return self.task.per_example_loss(self.model, batch)
        if kind == "measure":
            return self.task.query_measurement(self.model, batch)
        raise ValueError(f"unknown kind {kind!r}")


def unsqueeze_example(example: Batch) -> Batch:
    """Add a leading batch dimension of size 1 to every tensor of one example."""
    return map_batch(lambda t: t.unsqueeze(0), example)

