"""Second-order minimisation used by the retraining ground truths (small p: the matrix is formed).

:func:`gauss_newton_sum` forms ``sum_i J_i^T H_out,i J_i`` as one matrix product (``A^T A`` with
``A_i = H_out,i^{1/2} J_i``), which is much cheaper than ``torch.func.hessian`` of the whole objective; for a
linear model under cross-entropy it *is* the Hessian, so Newton with it converges quadratically.
:func:`minimise` is Newton (or Gauss-Newton) with a Levenberg-Marquardt shift where the matrix is not
positive definite and Armijo backtracking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from influent.gradients import ParameterSpace, unsqueeze_example
from influent.task import Batch, Task, iter_chunks


class _Outputs(nn.Module):
    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.task.model_output(self.model, batch)


def functional_outputs(space: ParameterSpace) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    """``(theta, batch) -> task.model_output`` with the tracked parameters replaced by ``theta``."""
    wrapper = _Outputs(space.model, space.task)

    def outputs(theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        params = {f"model.{k}": v for k, v in space.unflatten(theta).items()}
        return functional_call(wrapper, params, (batch,))

    return outputs


def gauss_newton_sum(
    space: ParameterSpace,
    batch: Batch,
    theta: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """``sum_i w_i J_i^T H_out,i J_i`` ``[p, p]`` (no mean, no L2); ``w`` defaults to ones.

    Args:
        space: parameter space (its task must define ``model_output`` and ``output_loss``).
        batch: examples.
        theta: flat parameters.
        weights: per-example weights ``[B]`` (>= 0 keeps the result PSD).
        chunk: examples per Jacobian block.
    """
    task = space.task
    outputs = functional_outputs(space)
    theta = theta.detach()
    n = task.batch_size(batch)

    def out_one(t, example):
        return outputs(t, unsqueeze_example(example))[0]

    G = torch.zeros(space.dim, space.dim, dtype=theta.dtype)
    for start, part in iter_chunks(batch, n, chunk):
        outs = vmap(out_one, in_dims=(None, 0))(theta, part)  # [B, *S]
        b, shape = outs.shape[0], outs.shape[1:]

        def loss_flat(o, example, shape=shape):
            return task.output_loss(o.view(1, *shape), unsqueeze_example(example))[0]

        J = vmap(jacrev(out_one), in_dims=(None, 0))(theta, part).reshape(b, -1, space.dim)  # [B, C, p]
        Hout = vmap(hessian(loss_flat))(outs.reshape(b, -1), part)  # [B, C, C]
        evals, evecs = torch.linalg.eigh(0.5 * (Hout + Hout.transpose(1, 2)))
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # Hout = root root^T
        A = torch.einsum("bcp,bck->bkp", J, root)  # [B, C, p]
        if weights is not None:
            A = A * weights[start : start + A.shape[0]].to(A.dtype).sqrt().view(-1, 1, 1)
        A = A.reshape(-1, space.dim)
        G += A.T @ A
    return 0.5 * (G + G.T)


def gradient(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """Gradient of the scalar ``fn`` at ``theta`` (detached)."""
    t = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(t), t)
    return g.detach()


def minimise(
    fn: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    curvature: Callable[[torch.Tensor], torch.Tensor],
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, int, float]:
    """Minimise ``fn`` from ``theta`` with steps ``-(C + mu I)^-1 grad`` (``C = curvature(theta)``).

    ``mu = 0`` unless ``C`` is not positive definite. Stops when ``||grad|| <= tol``, after ``max_iter``
    iterations, or when no step decreases ``fn`` at floating-point precision.

    Returns:
        ``(theta, iterations, final gradient norm)``.
    """
    theta = theta.detach()
    with torch.no_grad():
        f = float(fn(theta))
    g = gradient(fn, theta)
    it = 0
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    while float(g.norm()) > tol and it < max_iter:
        it += 1
        C = curvature(theta)
        chol, info = torch.linalg.cholesky_ex(C)
        if int(info) != 0:
            lam_min = float(torch.linalg.eigvalsh(C)[0])
            chol = torch.linalg.cholesky(C + (abs(lam_min) * 1.1 + 1e-12) * eye)
        step = torch.cholesky_solve(g.unsqueeze(1), chol)[:, 0]
        t, accepted = 1.0, False
        for _ in range(40):
            cand = theta - t * step
            with torch.no_grad():
                f_cand = float(fn(cand))
            if f_cand <= f - 1e-4 * t * float(g @ step):
                accepted = True
                break
            # objective flat to rounding: accept the full step if it shrinks the gradient
            flat = t == 1.0 and f_cand <= f + 1e-12 * max(1.0, abs(f))
            if flat and float(gradient(fn, cand).norm()) < 0.5 * float(g.norm()):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        theta, f = cand.detach(), f_cand
        g = gradient(fn, theta)
    return theta, it, float(g.norm())
