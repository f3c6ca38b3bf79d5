"""Exact curvature matrices for models small enough to form them (p up to a few thousand).

Both include the L2 term of the objective: ``H = (1/n) sum_i d^2 l_i / dtheta^2 + l2 * I``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev, vmap

from influent.gradients import ParameterSpace, unsqueeze_example
from influent.task import Batch, iter_chunks


def exact_hessian(space: ParameterSpace, batch: Batch, theta: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """Hessian ``[p, p]`` of the training objective (mean loss + (l2/2)||theta||^2) at ``theta``."""
    theta = space.flat() if theta is None else theta.detach()
    n = space.task.batch_size(batch)
    H = torch.zeros(space.dim, space.dim, dtype=theta.dtype)
    for _, part in iter_chunks(batch, n, chunk):
        H += hessian(lambda t, b=part: space.losses(t, b).sum())(theta)
    H /= n
    H += space.task.l2 * torch.eye(space.dim, dtype=theta.dtype)
    return 0.5 * (H + H.T)


def gauss_newton(space: ParameterSpace, batch: Batch, theta: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Gauss-Newton matrix ``(1/n) sum_i J_i^T H_out,i J_i + l2 I`` (PSD), ``[p, p]``.

    ``J_i`` is the Jacobian of example i's model output w.r.t. the tracked parameters and ``H_out,i`` the
    Hessian of its loss w.r.t. that output. For cross-entropy this equals the true Fisher.
    """
    theta = space.flat() if theta is None else theta.detach()
    task = space.task
    n = task.batch_size(batch)

    wrapper = _OutputModule(space.model, task)

    def output(t, example):
        params = {f"model.{k}": v for k, v in space.unflatten(t).items()}
        return functional_call(wrapper, params, (unsqueeze_example(example),))[0]

    def out_loss(out, example):
        return task.output_loss(out.unsqueeze(0), unsqueeze_example(example))[0]

    G = torch.zeros(space.dim, space.dim, dtype=theta.dtype)
    for _, part in iter_chunks(batch, n, chunk):
        outs = vmap(output, in_dims=(None, 0))(theta, part)  # [B, C]
        J = vmap(jacrev(output), in_dims=(None, 0))(theta, part)  # [B, C, p]
        Hout = vmap(hessian(out_loss))(outs, part)  # [B, C, C]
        G += torch.einsum("bcp,bcd,bdq->pq", J, Hout, J)
    G /= n
    G += task.l2 * torch.eye(space.dim, dtype=theta.dtype)
    return 0.5 * (G + G.T)


class HessianOperator:
    """Matrix-free products ``H V`` with the Hessian of the training objective (Pearlmutter's trick).

    The gradient's autograd graph is built once (per data chunk) and each product is one backward pass
    through it, so repeated products (CG, LiSSA) cost no new forward pass.

    Args:
        space: parameter space of the model.
        batch: the training data (all of it, or a minibatch for stochastic products).
        theta: the point of expansion (default: the model's current parameters).
        chunk: examples per retained graph.
    """

    def __init__(self, space: ParameterSpace, batch: Batch, theta: torch.Tensor | None = None, chunk: int = 4096):
        self.space = space
        self.theta = (space.flat() if theta is None else theta.detach()).clone().requires_grad_(True)
        self.dim = space.dim
        n = space.task.batch_size(batch)
        self._grads = []
        for _, part in iter_chunks(batch, n, chunk):
            loss = space.losses(self.theta, part).sum() / n
            (g,) = torch.autograd.grad(loss, self.theta, create_graph=True)
            self._grads.append(g)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``[p]`` or ``[p, k]`` (columns are independent vectors)."""
        single = V.dim() == 1
        V = V.unsqueeze(1) if single else V
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            hv = self.space.task.l2 * v
            for g in self._grads:
                (part,) = torch.autograd.grad(g, self.theta, v, retain_graph=True)
                hv = hv + part
            cols.append(hv)
        HV = torch.stack(cols, dim=1)
        return HV[:, 0] if single else HV


class _OutputModule(torch.nn.Module):
    def __init__(self, model, task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch):
        return self.task.model_output(self.model, batch)
