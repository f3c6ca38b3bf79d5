"""The proximal Bregman response function (PBRF, Bae et al. 2022): what influence functions estimate.

For trained parameters ``theta_s``, a training example ``z_m`` and a down-weighting ``eps``, the PBRF is

    theta(eps) = argmin_theta  (1/n) sum_i D_L(f(theta, x_i), f(theta_s, x_i); y_i)
                               + eps * L(f(theta, x_m); y_m)
                               + ((l2 + damping) / 2) ||theta - theta_s||^2

where ``f`` is the network output (``Task.model_output``), ``L`` the loss on outputs (``Task.output_loss``)
and ``D_L(y, y_s) = L(y) - L(y_s) - grad_y L(y_s)^T (y - y_s)`` its Bregman divergence. The ``l2`` part is
the Bregman divergence of the objective's own ridge term ``(l2/2)||theta||^2``, so the PBRF's curvature at
``theta_s`` is exactly the engine's Gauss-Newton matrix ``G + l2 I`` plus ``damping I``. Removing ``z_m`` is
``eps = -1/n``; to first order ``theta(eps) - theta_s = -eps (G + l2 I + damping I)^-1 grad L_m``, hence the
query change ``~ -eps * score`` (= ``score / n`` for removal) with the Gauss-Newton, damped engine.

Unlike leave-one-out retraining, the PBRF does not need ``theta_s`` to be a minimum of the training loss
and does not depend on the optimiser's path: it isolates the linearisation error of the influence estimate.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from influent.errors import NumericalError, UserError
from influent.gradients import ParameterSpace
from influent.models.newton import functional_outputs, gauss_newton_sum, gradient, minimise
from influent.task import Batch, Task, iter_chunks, slice_batch

PBRF_METHODS = ("gauss_newton", "newton", "lbfgs", "sgd")


class PBRF:
    """The PBRF objective of one trained model and its solver.

    Args:
        model: the trained network (its current tracked parameters are ``theta_s``).
        task: defines ``model_output`` and ``output_loss`` (and ``l2``).
        train_batch: all n training examples.
        damping: the proximity coefficient added to ``l2`` (use the influence engine's damping).
        chunk: examples per forward pass.
    """

    def __init__(
        self, model: nn.Module, task: Task, train_batch: Batch, damping: float = 0.0, chunk: int = 2048
    ):
        self.space = ParameterSpace(model, task)
        self.task = task
        self.batch = train_batch
        self.damping = float(damping)
        self.chunk = chunk
        self.n = task.batch_size(train_batch)
        self.theta_s = self.space.flat()
        self._outputs = functional_outputs(self.space)
        with torch.no_grad():
            outs = [self.outputs(self.theta_s, part) for _, part in iter_chunks(train_batch, self.n, chunk)]
        self.out_s = torch.cat(outs, 0)
        y = self.out_s.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            losses = torch.cat(
                [task.output_loss(y[s : s + part_n], part) for s, part_n, part in self._chunks(train_batch)]
            )
            (dloss,) = torch.autograd.grad(losses.sum(), y)
        self.loss_s = losses.detach()
        self.dloss_s = dloss.detach()
        if not (torch.isfinite(self.out_s).all() and torch.isfinite(self.dloss_s).all()):
            raise NumericalError("non-finite outputs or output-loss gradients at the trained parameters")

    def _chunks(self, batch: Batch):
        for s, part in iter_chunks(batch, self.n, self.chunk):
            yield s, self.task.batch_size(part), part

    def outputs(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Network outputs at flat parameters ``theta``."""
        return self._outputs(theta, batch)

    def bregman(self, theta: torch.Tensor) -> torch.Tensor:
        """``(1/n) sum_i D_L(f(theta, x_i), f(theta_s, x_i))`` (>= 0 for a loss convex in the outputs)."""
        total = theta.new_zeros(())
        for s, m, part in self._chunks(self.batch):
            out = self.outputs(theta, part)
            diff = (out - self.out_s[s : s + m]).reshape(m, -1)
            lin = (self.dloss_s[s : s + m].reshape(m, -1) * diff).sum(1)
            total = total + (self.task.output_loss(out, part) - self.loss_s[s : s + m] - lin).sum()
        return total / self.n

    def bregman_rows(self, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean Bregman divergence over the training rows ``rows`` (a minibatch estimate of :meth:`bregman`)."""
        part = slice_batch(self.batch, rows)
        out = self.outputs(theta, part)
        m = out.shape[0]
        lin = (self.dloss_s[rows].reshape(m, -1) * (out - self.out_s[rows]).reshape(m, -1)).sum(1)
        return (self.task.output_loss(out, part) - self.loss_s[rows] - lin).mean()

    def objective(self, theta: torch.Tensor, removed: Batch, eps: float) -> torch.Tensor:
        """PBRF objective at ``theta`` for the example(s) ``removed`` (a batch; their losses are summed)."""
        prox = 0.5 * (self.task.l2 + self.damping) * (theta - self.theta_s).pow(2).sum()
        return self.bregman(theta) + eps * self.space.losses(theta, removed).sum() + prox

    def step_size(self, batch_size: int = 64, seed: int = 0, iters: int = 10) -> float:
        """``1 / lambda_max`` of the PBRF Hessian at ``theta_s`` (power iteration on a minibatch; cached)."""
        if getattr(self, "_lr", None) is None:
            from influent.curvature.solvers import top_eigenvalue

            gen = torch.Generator().manual_seed(seed)
            rows = torch.randperm(self.n, generator=gen)[:batch_size]
            shift = self.task.l2 + self.damping

            def f(t):
                return self.bregman_rows(t, rows)

            def matvec(V):
                cols = []
                for j in range(V.shape[1]):
                    _, hv = torch.func.jvp(torch.func.grad(f), (self.theta_s,), (V[:, j],))
                    cols.append(hv + shift * V[:, j])
                return torch.stack(cols, 1)

            self._lr = 1.0 / max(top_eigenvalue(matvec, self.space.dim, self.theta_s.dtype, iters, seed), 1e-12)
        return self._lr

    def _sgd(self, removed: Batch, eps: float, epochs: int, lr: float | None, batch_size: int, seed: int):
        lr = self.step_size(seed=seed) if lr is None else lr
        theta = self.theta_s.clone().requires_grad_(True)
        opt = torch.optim.SGD([theta], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        shift = self.task.l2 + self.damping
        steps = 0
        for _ in range(epochs):
            order = torch.randperm(self.n, generator=gen)
            for s in range(0, self.n, batch_size):
                rows = order[s : s + batch_size]
                loss = self.bregman_rows(theta, rows) + eps * self.space.losses(theta, removed).sum()
                loss = loss + 0.5 * shift * (theta - self.theta_s).pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        return theta.detach(), steps

    def hessian_fn(self, removed: Batch, eps: float):
        """``theta -> exact Hessian of the objective`` (``torch.func.hessian``; small p)."""
        return lambda t: _sym(torch.func.hessian(lambda u: self.objective(u, removed, eps))(t.detach()))

    def gauss_newton_fn(self, removed: Batch, eps: float):
        """``theta -> (1/n) sum_i GN_i + eps GN_removed + (l2 + damping) I`` (exact Hessian for a linear model)."""
        eye = torch.eye(self.space.dim, dtype=self.theta_s.dtype)
        shift = self.task.l2 + self.damping

        def curvature(t):
            G = gauss_newton_sum(self.space, self.batch, t, chunk=self.chunk) / self.n
            return G + eps * gauss_newton_sum(self.space, removed, t) + shift * eye

        return curvature

    def solve(
        self,
        index: int | list[int],
        eps: float | None = None,
        method: str = "gauss_newton",
        tol: float = 1e-10,
        max_iter: int = 100,
        *,
        epochs: int = 1,
        lr: float | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> tuple[torch.Tensor, dict]:
        """Minimise the PBRF objective for training example(s) ``index``.

        Args:
            index: row(s) of the training batch that are down-weighted.
            eps: weight of their loss; None = ``-1/n`` (removal).
            method: ``'gauss_newton'`` (forms the objective's Gauss-Newton matrix, exact for a linear model;
                small p), ``'newton'`` (forms the exact Hessian with ``torch.func.hessian``; Levenberg-Marquardt
                shift where indefinite) or ``'lbfgs'`` (full-batch L-BFGS, strong-Wolfe line search; any p).
                All three minimise the same objective with its exact gradient. ``'sgd'``: ``epochs`` passes
                of minibatch SGD from ``theta_s`` with step ``lr`` (None: ``1 / lambda_max`` of the objective's
                Hessian on a minibatch, by power iteration) -- an approximate solve for networks (every
                minibatch's Bregman gradient vanishes at ``theta_s``, so with ``eps = 0`` it stays there;
                SGD, unlike Adam, moves in proportion to the small ``eps`` gradient).
            tol: stop when the objective's gradient norm is below ``tol``.
            max_iter: iteration cap.

        Returns:
            ``(theta, info)`` with ``info`` holding ``grad_norm``, ``iterations``, ``seconds``, ``objective``.
        """
        if method not in PBRF_METHODS:
            raise UserError(f"unknown PBRF method {method!r}; choose from {', '.join(PBRF_METHODS)}", field="pbrf_method")
        idx = torch.as_tensor([index] if isinstance(index, int) else list(index), dtype=torch.long)
        removed = slice_batch(self.batch, idx)
        eps = -1.0 / self.n if eps is None else float(eps)
        fn = lambda t: self.objective(t, removed, eps)
        start = time.perf_counter()
        if method == "lbfgs":
            theta = _lbfgs(fn, self.theta_s.clone(), tol, max_iter)
            it = -1
            g = gradient(fn, theta)
        elif method == "sgd":
            theta, it = self._sgd(removed, eps, epochs, lr, batch_size, seed)
            g = gradient(fn, theta)
        else:
            curvature = (
                self.hessian_fn(removed, eps) if method == "newton" else self.gauss_newton_fn(removed, eps)
            )
            theta, it = minimise(fn, self.theta_s.clone(), curvature, tol, max_iter)[:2]
            g = gradient(fn, theta)
        if not torch.isfinite(theta).all():
            raise NumericalError("PBRF solve produced non-finite parameters; increase damping")
        with torch.no_grad():
            obj = float(fn(theta))
        info = {
            "grad_norm": float(g.norm()),
            "iterations": it,
            "seconds": time.perf_counter() - start,
            "objective": obj,
            "eps": eps,
            "method": method,
        }
        return theta.detach(), info


def _sym(H: torch.Tensor) -> torch.Tensor:
    return 0.5 * (H + H.T)


def _lbfgs(fn, theta: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = fn(theta)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return theta.detach()
