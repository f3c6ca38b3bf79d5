"""Second-order minimisation: the one Newton loop that fits models (small p: the matrix is formed).

:func:`gauss_newton_sum` forms ``sum_i J_i^T H_out,i J_i`` as one matrix product (``A^T A`` with
``A_i = H_out,i^{1/2} J_i``), which is much cheaper than ``torch.func.hessian`` of the whole objective; for a
linear model under cross-entropy it *is* the Hessian, so Newton with it converges quadratically.
:func:`minimise` is Newton (or Gauss-Newton) with a Levenberg-Marquardt shift where the matrix is not
positive definite and Armijo backtracking; :func:`fit_newton` runs it on a model + task with the exact Hessian.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from influent.curvature.exact import exact_hessian
from influent.gradients import ParameterSpace, full_gradient, full_objective, unsqueeze_example
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


class Minimum(NamedTuple):
    """Where :func:`minimise` stopped: flat parameters, Newton iterations, gradient norm, objective value."""

    theta: torch.Tensor
    iterations: int
    grad_norm: float
    objective: float


def minimise(
    fn: Callable[[torch.Tensor], torch.Tensor | float],
    theta: torch.Tensor,
    curvature: Callable[[torch.Tensor], torch.Tensor],
    tol: float,
    max_iter: int,
    gradient_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Minimum:
    """Minimise ``fn`` from ``theta`` with steps ``-(C + mu I)^-1 grad`` (``C = curvature(theta)``).

    The one (Gauss-)Newton loop of the package: the head's training (:func:`fit_newton`), its closed-form
    refits (:func:`influent.models.refit.fit_head`), the retraining ground truth
    (:class:`~influent.models.training.NewtonTrainer`) and the PBRF all run it. ``mu = 0`` unless ``C`` is not
    positive definite (then ``mu = 1.1 |lambda_min| + 1e-12``, a Levenberg-Marquardt shift). Each step is
    backtracked (halving, at most 40 times) to the Armijo condition
    ``fn(theta - t step) <= fn(theta) - 1e-4 t grad^T step``; where ``fn`` is flat to rounding the full step is
    taken if it halves the gradient norm. Stops when ``||grad|| <= tol``, after ``max_iter`` iterations, or
    when no step decreases ``fn`` at floating-point precision.

    Args:
        fn: the objective of the flat parameters (a scalar tensor or float).
        theta: start ``[p]``.
        curvature: ``theta -> [p, p]`` Hessian or Gauss-Newton matrix of ``fn``.
        tol: gradient-norm tolerance (Euclidean).
        max_iter: iteration cap.
        gradient_fn: ``theta -> [p]`` gradient of ``fn`` (default: autograd of ``fn``).
    """
    grad = gradient_fn if gradient_fn is not None else (lambda t: gradient(fn, t))
    theta = theta.detach()
    with torch.no_grad():
        f = float(fn(theta))
    g = grad(theta)
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
            if flat and float(grad(cand).norm()) < 0.5 * float(g.norm()):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        theta, f = cand.detach(), f_cand
        g = grad(theta)
    return Minimum(theta, it, float(g.norm()), f)


@dataclass
class TrainReport:
    """How the optimisation ended: gradient norm of the objective, Newton iterations, seconds, objective, and
    whether the gradient norm reached the promised tolerance (False: stopped at the iteration cap or where no
    step decreased the objective, above the tolerance, or non-finite)."""

    grad_norm: float
    iterations: int
    seconds: float
    objective: float
    converged: bool = True


def fit_newton(
    model: nn.Module, task: Task, batch: Batch, tol: float = 1e-10, max_iter: int = 100
) -> TrainReport:
    """Minimise the task's objective over the tracked parameters by Newton (:func:`minimise`), from the
    model's current parameters, with the exact Hessian.

    For convex objectives with a formable Hessian (the logistic head). Stops when the gradient's
    Euclidean norm is below ``tol``; the model is updated in place.
    """
    start = time.perf_counter()
    space = ParameterSpace(model, task)
    result = minimise(
        lambda t: full_objective(space, t, batch),
        space.flat(),
        lambda t: exact_hessian(space, batch, t),
        tol,
        max_iter,
        gradient_fn=lambda t: full_gradient(space, t, batch),
    )
    space.load(result.theta)
    return TrainReport(result.grad_norm, result.iterations, time.perf_counter() - start, result.objective,
                       converged=result.grad_norm <= tol)
