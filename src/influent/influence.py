"""The influence protocol and its exact implementation: pairwise scores, self-influence, ``I_up,params``,
``I_pert,loss``.

:class:`InfluenceMethod` is the one interface every consumer (explain, audit rankers, validate, attacks)
talks to. :class:`ExactInfluence` (this module) forms or applies the exact Hessian / Gauss-Newton matrix
and solves directly, by CG or by LiSSA; :class:`~influent.factored_influence.FactoredInfluence` uses
identity / diagonal / K-FAC / EK-FAC curvature over linear modules for models too large for that.

Conventions (Koh & Liang 2017; see README):

* ``score(z_train, z_query) = g_query^T (H + damping I)^-1 g_train`` with ``g`` per-example gradients of
  the loss (training example) and of the query measurement (query). Positive = proponent (up-weighting
  ``z_train`` lowers the query loss), negative = opponent. ``score = -I_up,loss``.
* ``loss_change = score / n``: first-order change of the query measurement when ``z_train`` is removed
  from the n training examples and the model is retrained to the optimum.
* ``I_up,params(z) = -(H + damping I)^-1 g_z``: d theta / d epsilon for up-weighting z by epsilon.
* ``I_pert,loss(z, z_query) = -g_query^T (H + damping I)^-1 grad_x grad_theta l(z)``, shape of z's input
  features; moving z's features by delta changes the query loss by about ``I_pert . delta / n``.

Queries are preconditioned once per batch (the s_test trick): one solve with Q right-hand sides, then a
matrix product with the cached training gradients.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.func import grad, vmap

from influent.curvature.exact import HessianOperator, exact_hessian, gauss_newton
from influent.curvature.solvers import DirectSolver, Solution, conjugate_gradient, lissa
from influent.errors import UserError
from influent.gradients import ParameterSpace, unsqueeze_example
from influent.task import Batch, Task, slice_batch

Queries = Batch | Sequence[Batch]
"""Query data: one batch, or a ``list`` of batches (a list at the top level always means several batches)."""


def as_batches(queries: Queries) -> list[Batch]:
    """``queries`` as a list of batches (a top-level ``list`` is a list of batches, anything else one batch)."""
    return list(queries) if isinstance(queries, list) else [queries]


class InfluenceMethod(ABC):
    """What every influence implementation offers; consumers use nothing else.

    Sign and units (DESIGN.md): ``score(z_train, z_query) = g_query^T (C + damping)^-1 g_train`` with ``C``
    the method's curvature, ``g_train`` the gradient of the training loss and ``g_query`` that of the
    query measurement (``task.query_measurement``). Positive = proponent (up-weighting ``z_train``
    lowers the query measurement); ``loss_change = score / n_train`` is the predicted change of the
    query measurement (nats for a loss) when ``z_train`` is removed and the model retrained.

    The training data is given when the method is built; :meth:`fit` prepares the curvature (idempotent;
    every scoring method calls it first).
    """

    @property
    @abstractmethod
    def n_train(self) -> int:
        """Number of training examples ``n``."""

    @abstractmethod
    def fit(self) -> InfluenceMethod:
        """Fit (or load) the curvature over the training data; returns ``self``. Idempotent."""

    @abstractmethod
    def pairwise_scores(self, queries: Queries) -> torch.Tensor:
        """Scores ``[Q, n]`` (float64): ``g_q^T (C + damping)^-1 g_train``; positive = proponent."""

    @abstractmethod
    def self_scores(self) -> torch.Tensor:
        """Self-influence ``g_i^T (C + damping)^-1 g_i`` of every training example, ``[n]`` float64 (>= 0)."""

    @abstractmethod
    def query_self_scores(self, queries: Queries) -> torch.Tensor:
        """``g_q^T (C + damping)^-1 g_q`` of each query's measurement gradient, ``[Q]`` float64 (>= 0)."""

    @abstractmethod
    def train_losses(self) -> torch.Tensor:
        """Per-example training loss ``l(z_i)`` at the model's parameters, ``[n]`` float64 (nats, no L2 term).

        Needs no curvature (does not fit). Used by the audit rankers (``loss``, ``loo_loss``).
        """

    @abstractmethod
    def train_gradients(self) -> torch.Tensor:
        """Per-example training-loss gradients over the tracked parameters, ``[n, p]`` float64.

        Materialises ``n x p`` numbers: for small models (the head; the spectral-signature ranker). Large
        models reach the same dot products through an identity-curvature method's scores instead.
        """

    def loss_change(self, scores: torch.Tensor) -> torch.Tensor:
        """Predicted change of the query measurement when the training example is removed: ``score / n``."""
        return scores / float(self.n_train)

    @abstractmethod
    def describe(self) -> dict:
        """JSON-ready settings and diagnostics of the method (curvature, damping, solver residual, ...)."""

CURVATURES = ("hessian", "gauss_newton", "identity")
"""``identity``: ``C = I`` (so ``score = g_q^T g_train / (1 + damping)``): plain gradient dot products (TracIn)."""
SOLVERS = ("exact", "cg", "lissa")


@dataclass
class SolverOptions:
    """Settings of the iterative solvers.

    Attributes:
        cg_tol: CG stops when every column's relative residual is below this.
        cg_max_iter: CG iteration cap.
        lissa_depth: LiSSA recursion depth.
        lissa_scale: LiSSA scale (None: 1.1 x the largest eigenvalue from power iteration).
        lissa_repeats: LiSSA repetitions averaged.
        lissa_batch_size: minibatch size of LiSSA's Hessian products (None: full batch, deterministic).
        seed: seeds LiSSA's minibatch sampling.
    """

    cg_tol: float = 1e-10
    cg_max_iter: int = 1000
    lissa_depth: int = 5000
    lissa_scale: float | None = None
    lissa_repeats: int = 1
    lissa_batch_size: int | None = None
    seed: int = 0


@dataclass
class ExactInfluence(InfluenceMethod):
    """Influence of training examples on queries for a model small enough to differentiate twice.

    Args:
        model: the trained network (at, or near, the optimum of the training objective).
        task: how losses and measurements are computed (holds the L2 coefficient).
        train_batch: all training examples as one batch pytree.
        curvature: ``'hessian'`` (exact Hessian of the objective) or ``'gauss_newton'`` (PSD).
        solver: ``'exact'`` (Cholesky / eigh), ``'cg'`` or ``'lissa'``.
        damping: added to the curvature's diagonal (absolute).
        options: iterative solver settings.
    """

    model: torch.nn.Module
    task: Task
    train_batch: Batch
    curvature: str = "hessian"
    solver: str = "exact"
    damping: float = 0.0
    options: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise UserError(
                f"unknown curvature {self.curvature!r}; choose from {', '.join(CURVATURES)}", field="curvature"
            )
        if self.solver not in SOLVERS:
            raise UserError(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}", field="solver")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}", field="damping")
        self.space = ParameterSpace(self.model, self.task)
        self.theta = self.space.flat()
        self.n = self.task.batch_size(self.train_batch)
        if self.n == 0:
            raise UserError("no training examples")
        self._train_grads: torch.Tensor | None = None
        self._matrix: torch.Tensor | None = None
        self._direct: DirectSolver | None = None
        self._operator: HessianOperator | None = None
        self.last_solution: Solution | None = None

    # --- building blocks ---------------------------------------------------------------------------------
    @property
    def train_grads(self) -> torch.Tensor:
        """Per-example training-loss gradients ``[n, p]`` (computed once)."""
        if self._train_grads is None:
            self._train_grads = self.space.per_example_grads(self.train_batch, self.theta, "loss")
        return self._train_grads

    @property
    def curvature_matrix(self) -> torch.Tensor:
        """The formed curvature ``[p, p]`` (including L2, excluding damping)."""
        if self._matrix is None:
            if self.curvature == "identity":
                self._matrix = torch.eye(self.space.dim, dtype=self.theta.dtype)
            else:
                build = exact_hessian if self.curvature == "hessian" else gauss_newton
                self._matrix = build(self.space, self.train_batch, self.theta)
        return self._matrix

    def _matvec(self):
        if self.curvature == "hessian" and self.solver != "exact":
            if self._operator is None:
                self._operator = HessianOperator(self.space, self.train_batch, self.theta)
            return self._operator.matvec
        M = self.curvature_matrix
        return lambda V: M @ V

    def inverse_hvp(self, B: torch.Tensor) -> Solution:
        """``(H + damping I)^-1 B`` for ``B`` of shape ``[p]`` or ``[p, k]`` with the chosen solver."""
        B = B.to(self.theta.dtype)
        if self.solver == "exact":
            if self._direct is None:
                self._direct = DirectSolver(self.curvature_matrix, self.damping)
            sol = self._direct.solve(B)
        elif self.solver == "cg":
            sol = conjugate_gradient(self._matvec(), B, self.damping, self.options.cg_tol, self.options.cg_max_iter)
        else:
            sol = lissa(
                self._matvec(),
                B,
                self.damping,
                scale=self.options.lissa_scale,
                depth=self.options.lissa_depth,
                repeats=self.options.lissa_repeats,
                minibatch_matvec=self._minibatch_matvec(),
                seed=self.options.seed,
            )
        self.last_solution = sol
        return sol

    def _minibatch_matvec(self):
        size = self.options.lissa_batch_size
        if size is None or size >= self.n:
            return None

        def mv(V: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(self.n, (size,), generator=gen)
            return HessianOperator(self.space, slice_batch(self.train_batch, idx), self.theta).matvec(V)

        return mv

    def query_grads(self, query_batch: Batch) -> torch.Tensor:
        """Gradients ``[Q, p]`` of each query's measurement."""
        return self.space.per_example_grads(query_batch, self.theta, "measure")

    # --- the protocol --------------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return self.n

    def fit(self) -> ExactInfluence:
        """Form the curvature (or, for CG / LiSSA on the Hessian, nothing: products are matrix-free)."""
        if self.solver == "exact" or self.curvature != "hessian":
            _ = self.curvature_matrix
        return self

    def pairwise_scores(self, queries: Queries) -> torch.Tensor:
        """Scores ``[Q, n]``: ``g_q^T (H + damping I)^-1 g_train`` (positive = proponent)."""
        G = self._query_grads(queries)
        s_test = self.inverse_hvp(G.T).x  # [p, Q], one solve for all queries
        return (self.train_grads @ s_test).T

    def query_self_scores(self, queries: Queries) -> torch.Tensor:
        """``g_q^T (H + damping I)^-1 g_q`` for each query, ``[Q]``."""
        G = self._query_grads(queries)
        return (G * self.inverse_hvp(G.T).x.T).sum(1)

    def describe(self) -> dict:
        sol = self.last_solution
        return {
            "method": "exact",
            "curvature": self.curvature,
            "solver": self.solver,
            "damping": self.damping,
            "residual": None if sol is None else sol.residual,
            "iterations": None if sol is None else sol.iterations,
            "converged": None if sol is None else sol.converged,
        }

    def _query_grads(self, queries: Queries) -> torch.Tensor:
        return torch.cat([self.query_grads(b) for b in as_batches(queries)])

    def self_scores(self) -> torch.Tensor:
        """Self-influence ``g_i^T (H + damping I)^-1 g_i`` for every training example, ``[n]`` (>= 0)."""
        G = self.train_grads
        return (G * self.inverse_hvp(G.T).x.T).sum(1)

    def train_losses(self) -> torch.Tensor:
        """Per-example training loss ``[n]`` (nats) at the model's parameters."""
        return self.space.loss_values(self.train_batch, self.theta).double()

    def train_gradients(self) -> torch.Tensor:
        """Per-example training-loss gradients ``[n, p]`` (the cached :attr:`train_grads`)."""
        return self.train_grads.double()

    def params_influence(self, batch: Batch) -> torch.Tensor:
        """``I_up,params = -(H + damping I)^-1 g_z`` for each example of ``batch``, ``[B, p]``."""
        G = self.space.per_example_grads(batch, self.theta, "loss")
        return -self.inverse_hvp(G.T).x.T

    def mean_query_scores(self, queries: Queries, examples: Batch | None = None) -> torch.Tensor:
        """Score of each example on the *mean* query measurement, ``[B]``: ``s^T g_z`` with
        ``s = (H + damping I)^-1 mean_q g_q`` (one solve, the s_test of an averaged objective).

        Args:
            queries: the queries whose measurements are averaged (the objective).
            examples: examples whose training-loss gradient ``g_z`` is taken at the fitted parameters, e.g.
                training examples with other labels (the curvature stays that of the training data);
                None: the training examples themselves (then this is the row mean of
                :meth:`pairwise_scores`).

        Positive = up-weighting ``z`` lowers the mean query measurement; ``loss_change`` of a difference of
        two such scores is the predicted change of the objective when one example replaces the other.
        """
        s_test = self.inverse_hvp(self._query_grads(queries).mean(0)).x  # [p]
        G = self.train_grads if examples is None else self.space.per_example_grads(examples, self.theta, "loss")
        return G @ s_test

    def pert_influence(self, query_batch: Batch, train_subset: Batch) -> torch.Tensor:
        """``I_pert,loss`` ``[Q, T, *x_shape]`` of each query against each training example's input features.

        Moving training example t's features by ``delta`` changes query q's loss by about
        ``(I_pert[q, t] * delta).sum() / n``.
        """
        s_test = self.inverse_hvp(self.query_grads(query_batch).T).x.T  # [Q, p]
        task, space, theta = self.task, self.space, self.theta

        def directional(x, s, example):
            ex = task.replace_input(unsqueeze_example(example), x.unsqueeze(0))
            g = grad(lambda t: space.losses(t, ex).sum())(theta)
            return (g * s).sum()

        def one(s, example):
            x = task.perturbable_input(unsqueeze_example(example))[0]
            return -grad(directional)(x, s, example)

        per_train = vmap(one, in_dims=(None, 0))
        return vmap(lambda s: per_train(s, train_subset))(s_test)
