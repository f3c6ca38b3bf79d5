"""Curvature strategies as classes: each owns its fitting passes and its inverse (kronfluence's
``factor/config.py`` in spirit).

A strategy fits, per tracked ``nn.Linear`` module ``m``, a curvature block ``F_m`` of the training
objective (mean loss over n examples) and says how to apply ``(F_m + d_m I)^-1``:

- :class:`Identity`: ``F_m = I``; no pass.
- :class:`Diagonal`: ``F_m = diag(mean_i G_i ** 2)``, ``G_i`` the per-example gradient ``[d_out, d_in+1]``.
- :class:`Kfac`: ``F_m = A ⊗ S`` with ``A = mean over tokens of a a^T`` (activations with a ones column)
  and ``S = (1/n) sum_i sum_t g_it g_it^T`` (output gradients of each example's loss); preconditioning in
  the eigenbasis ``(Q_A, Q_S)`` with eigenvalues ``outer(lambda_S, lambda_A)``. For one token per example
  these are the textbook K-FAC factors; for sequences the scale of Grosse et al. (2023),
  ``E[G G^T] ~ T * A_tok ⊗ S_tok``.
- :class:`Ekfac`: K-FAC's eigenbasis, eigenvalues replaced by the second moment of the projected per-example
  gradients, ``Lambda = mean_i (Q_S^T G_i Q_A) ** 2`` (George et al. 2018; Grosse et al. 2023).

A strategy stores its tensors under the names of :mod:`influent.curvature.keys`. A new strategy is one
subclass of :class:`Strategy` with :func:`register_strategy`; nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from influent import store
from influent.curvature import keys
from influent.curvature.eigh import EighOnce
from influent.curvature.linear_grads import GradBuffers, squared_grads_sum
from influent.curvature.passes import (
    FitContext,
    GramSums,
    blas_threads,
    read_checkpoint,
    real_rows,
    rotate_rows,
)
from influent.errors import NumericalError, UserError

Tensors = dict[str, torch.Tensor]
Fitted = tuple[Tensors, dict[str, float]]  # (stored tensors, damping per module before l2)

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``FactorConfig(strategy=cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> tuple[str, ...]:
    """Names of the registered strategies, in registration order."""
    return tuple(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``.

    Raises:
        UserError: (field ``strategy``) when no strategy has that name.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UserError(f"strategy: expected one of {', '.join(_REGISTRY)}, got {name!r}", field="strategy")
    return cls()


class Strategy(ABC):
    """One way to approximate and invert each tracked module's curvature block.

    Class attributes:
        name: registry name (``FactorConfig.strategy``).
        rotated: preconditioning happens in a Kronecker eigenbasis ``(Q_A, Q_S)`` stored as
            :data:`~influent.curvature.keys.EIGVEC_A` / :data:`~influent.curvature.keys.EIGVEC_S`.
        has_passes: the fit runs passes over the data (worth re-forming batches by length for).
        token_factors_in_fit: the fit's last pass computes the training examples' token factors in the
            final eigenbasis (so an empirical-Fisher fit can write the training token cache).
    """

    name: ClassVar[str]
    rotated: ClassVar[bool] = False
    has_passes: ClassVar[bool] = True
    token_factors_in_fit: ClassVar[bool] = False

    @abstractmethod
    def fit(self, ctx: FitContext) -> Fitted:
        """Run the passes; return the stored tensors and the damping of each module (before ``l2``)."""

    @abstractmethod
    def inverse_scale(self, tensors: Tensors, name: str, damping: float) -> torch.Tensor:
        """``1 / (eigenvalue or diagonal + damping)`` of module ``name`` in its basis (float64; a scalar
        or ``[d_out, d_in(+1)]``)."""


def squared_gradient_sums(shapes: dict[str, tuple[int, int]], what: str) -> Tensors:
    """Zeroed partial sums of a pass that adds up squared per-example gradients: per module a
    ``[d_out, d_in(+1)]`` sum stored as ``what`` and an example counter (float64)."""
    sums = {keys.tensor_key(k, what): torch.zeros(v, dtype=torch.float64) for k, v in shapes.items()}
    sums.update({keys.tensor_key(k, keys.N_EXAMPLES): torch.zeros((), dtype=torch.float64) for k in shapes})
    return sums


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise :class:`~influent.errors.NumericalError` unless every entry of fitted tensor ``t`` is finite."""
    if not torch.isfinite(t).all():
        raise NumericalError(f"{name}: fitted curvature has non-finite entries (NaN/inf in gradients?)")


@register_strategy
class Identity(Strategy):
    """``F_m = I``: scores are gradient dot products divided by ``1 + damping``."""

    name = "identity"
    has_passes = False

    def fit(self, ctx: FitContext) -> Fitted:
        tensors = {keys.tensor_key(m, keys.UNIT): torch.ones(1) for m in ctx.modules}
        return tensors, {m: ctx.damping_for(1.0) for m in ctx.modules}

    def inverse_scale(self, tensors: Tensors, name: str, damping: float) -> torch.Tensor:
        return torch.tensor(1.0 / (1.0 + damping), dtype=torch.float64)


@register_strategy
class Diagonal(Strategy):
    """``F_m = diag(mean_i G_i ** 2)``: one pass of squared per-example gradients."""

    name = "diagonal"

    def fit(self, ctx: FitContext) -> Fitted:
        buffers = GradBuffers()

        def init():
            return squared_gradient_sums(ctx.shapes, keys.DIAG_SUM)

        def update(sums, name, a, g, tokens, rows):
            d = squared_grads_sum(a, g, buffers)
            sums[keys.tensor_key(name, keys.DIAG_SUM)] += d.to(device="cpu", dtype=torch.float64)

        sums = ctx.run_pass("diagonal", init, update)
        tensors, damping = {}, {}
        for name in ctx.modules:
            diag = sums[keys.tensor_key(name, keys.DIAG_SUM)] / sums[keys.tensor_key(name, keys.N_EXAMPLES)]
            check_finite(diag, name)
            tensors[keys.tensor_key(name, keys.DIAG)] = diag
            damping[name] = ctx.damping_for(float(diag.mean()))
        return tensors, damping

    def inverse_scale(self, tensors: Tensors, name: str, damping: float) -> torch.Tensor:
        return 1.0 / (tensors[keys.tensor_key(name, keys.DIAG)].double() + damping)


EIGEN_FILE = "eigen.safetensors"


@register_strategy
class Kfac(Strategy):
    """``F_m = A ⊗ S``: a covariance pass, then the eigendecompositions of ``A`` and ``S``."""

    name = "kfac"
    rotated = True

    def fit(self, ctx: FitContext) -> Fitted:
        eig = self.eigenbasis(ctx)
        damping = {}
        for name in ctx.modules:
            mean = float(eig[keys.tensor_key(name, keys.EIGVAL_A)].mean())
            mean *= float(eig[keys.tensor_key(name, keys.EIGVAL_S)].mean())
            damping[name] = ctx.damping_for(mean)
        return eig, damping

    def inverse_scale(self, tensors: Tensors, name: str, damping: float) -> torch.Tensor:
        lam = torch.outer(
            tensors[keys.tensor_key(name, keys.EIGVAL_S)], tensors[keys.tensor_key(name, keys.EIGVAL_A)]
        )
        return 1.0 / (lam.double() + damping)

    def eigenbasis(self, ctx: FitContext, keep: bool = False) -> Tensors:
        """Eigenvalues and eigenvectors of each module's ``A`` and ``S`` (saved as ``eigen.safetensors``).

        ``keep``: the covariance pass keeps its captures in ``ctx.memory`` (for a later pass to replay).
        """
        eigen_file = ctx.file(EIGEN_FILE)
        eig = read_checkpoint(eigen_file, "factor checkpoint")
        if eig is not None and all(keys.tensor_key(m, keys.EIGVEC_S) in eig for m in ctx.modules):
            return eig
        ctx.discard_checkpoints(keep="covariance")  # later stages' sums were taken in the old basis
        init, update, _, flush = self._covariance_pass(ctx)
        with blas_threads(torch.get_num_threads()):
            sums = ctx.run_pass("covariance", init, update, keep=keep, flush=flush)
        eigh_once = EighOnce()
        eig = {}
        for name in ctx.modules:
            a_cov = sums[keys.tensor_key(name, keys.A_SUM)] / sums[
                keys.tensor_key(name, keys.N_TOKENS)
            ].clamp_min(1)
            s_cov = sums[keys.tensor_key(name, keys.S_SUM)] / sums[
                keys.tensor_key(name, keys.N_EXAMPLES)
            ].clamp_min(1)
            eig[keys.tensor_key(name, keys.EIGVAL_A)], va = eigh_once(a_cov, f"{name} activation covariance")
            eig[keys.tensor_key(name, keys.EIGVAL_S)], vs = eigh_once(s_cov, f"{name} gradient covariance")
            eig[keys.tensor_key(name, keys.EIGVEC_A)] = va.to(ctx.vector_dtype)
            eig[keys.tensor_key(name, keys.EIGVEC_S)] = vs.to(ctx.vector_dtype)
        if eigen_file is not None:
            store.write_tensors(eigen_file, eig)
            ctx.file("stage-covariance.safetensors").unlink(missing_ok=True)
        return eig

    @staticmethod
    def _covariance_pass(ctx: FitContext):
        """``(init, update, None, flush)`` of the pass summing ``a a^T`` over real tokens and ``g g^T`` per
        module (through :class:`~influent.curvature.passes.GramSums`)."""

        def init():
            s = {}
            for k, (do, di) in ctx.shapes.items():
                s[keys.tensor_key(k, keys.A_SUM)] = torch.zeros(di, di, dtype=torch.float64)
                s[keys.tensor_key(k, keys.S_SUM)] = torch.zeros(do, do, dtype=torch.float64)
                s[keys.tensor_key(k, keys.N_TOKENS)] = torch.zeros((), dtype=torch.float64)
                s[keys.tensor_key(k, keys.N_EXAMPLES)] = torch.zeros((), dtype=torch.float64)
            return s

        grams = GramSums()  # activations shared by consecutive modules (gate/up, query/key/value): one product

        def update(sums, name, a, g, tokens, rows):
            grams.add(keys.tensor_key(name, keys.A_SUM), real_rows(a, rows), source=a)
            grams.add(keys.tensor_key(name, keys.S_SUM), real_rows(g, rows))
            sums[keys.tensor_key(name, keys.N_TOKENS)] += tokens

        return init, update, None, grams.flush


@register_strategy
class Ekfac(Kfac):
    """K-FAC's eigenbasis with eigenvalues corrected over the projected per-example gradients.

    The correction is a second pass over the data, or, when ``ctx.memory`` kept the covariance pass's
    captures, computed from them with no second forward/backward (the same tensors, so the same
    eigenvalues); either way ``ctx.memory`` ends up holding the tokens in the final eigenbasis.
    """

    name = "ekfac"
    token_factors_in_fit = True

    def fit(self, ctx: FitContext) -> Fitted:
        eig = self.eigenbasis(ctx, keep=True)
        rotated: set[int] = set()  # batches whose tokens ctx.memory holds in the final eigenbasis
        sums = ctx.run_pass("lambda", *self._lambda_pass(ctx, eig, rotated), replay=True)
        if ctx.memory is not None and len(rotated) != len(ctx.batches):
            ctx.memory.clear()  # a resumed or shared pass: some held tokens are raw captures, or none
        tensors, damping = dict(eig), {}
        for name in ctx.modules:
            lam = sums[keys.tensor_key(name, keys.LAMBDA_SUM)] / sums[
                keys.tensor_key(name, keys.N_EXAMPLES)
            ].clamp_min(1)
            check_finite(lam, name)
            tensors[keys.tensor_key(name, keys.LAMBDA)] = lam
            damping[name] = ctx.damping_for(float(lam.mean()))
        return tensors, damping

    def inverse_scale(self, tensors: Tensors, name: str, damping: float) -> torch.Tensor:
        return 1.0 / (tensors[keys.tensor_key(name, keys.LAMBDA)].double() + damping)

    @staticmethod
    def _lambda_pass(ctx: FitContext, eig: Tensors, rotated: set[int]):
        """``(init, update, after_batch)`` of the pass summing ``(Q_S^T G_i Q_A) ** 2``; the rotated
        tokens of each batch go to ``ctx.tokens`` (the training token cache) and ``ctx.memory`` when
        there are, and the batch's index to ``rotated``."""
        buffers = GradBuffers()
        bases: dict = {}
        last: dict = {}  # the previous module's activations, basis and rotated activations
        batch_tokens: list = []  # this batch's rotated (name, a, g), for the token caches

        def basis(name, what, like):
            key = (name, what, like.dtype, like.device)
            if key not in bases:
                bases[key] = eig[keys.tensor_key(name, what)].to(device=like.device, dtype=like.dtype)
            return bases[key]

        def init():
            return squared_gradient_sums(ctx.shapes, keys.LAMBDA_SUM)

        def update(sums, name, a, g, tokens, rows):
            qa = basis(name, keys.EIGVEC_A, a)
            if last.get("a") is a and torch.equal(last["qa"], qa):
                ar = last["ar"]  # same activations and basis as the previous module (query/key/value)
            else:
                ar = rotate_rows(a, qa, rows)
                last.update(a=a, qa=qa, ar=ar)
            gr = rotate_rows(g, basis(name, keys.EIGVEC_S, g), rows)
            if ctx.tokens is not None or ctx.memory is not None:
                batch_tokens.append((name, ar, gr))
            lam = squared_grads_sum(ar, gr, buffers)
            sums[keys.tensor_key(name, keys.LAMBDA_SUM)] += lam.to(device="cpu", dtype=torch.float64)

        def after_batch(index: int) -> None:
            if ctx.tokens is not None:
                ctx.tokens.write(index, batch_tokens)
            if ctx.memory is not None:
                ctx.memory.write(index, batch_tokens)  # replaces the raw captures it replayed
                rotated.add(index)
            batch_tokens.clear()

        return init, update, after_batch
