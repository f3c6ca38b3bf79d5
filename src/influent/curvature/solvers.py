"""Inverse-curvature-vector products ``(H + damping I)^-1 B`` by direct solve, CG or LiSSA.

Every solver takes right-hand sides ``B`` of shape ``[p]`` or ``[p, k]`` (columns solved together), returns a
:class:`Solution` with the relative residual ``||(H + damping I) X - B|| / ||B||`` (worst column) so a user
sees how close it got, and raises :class:`~influent.errors.NumericalError` on non-finite output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from influent.errors import NumericalError

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Solution:
    """Result of a solve.

    Attributes:
        x: the solution, same shape as the right-hand side.
        residual: relative residual ``max_j ||A x_j - b_j|| / ||b_j||`` (dimensionless).
        iterations: solver iterations (0 for a direct solve).
        method: ``'exact'``, ``'cg'`` or ``'lissa'``.
        converged: whether the solve met its promise: CG reached its tolerance before its iteration cap,
            LiSSA's relative residual is at most ``LISSA_CONVERGED``, a direct solve always.
    """

    x: torch.Tensor
    residual: float
    iterations: int
    method: str
    converged: bool = True


LISSA_CONVERGED = 1e-3  # relative residual below which a truncated LiSSA series counts as converged


def _as_matrix(B: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (B.unsqueeze(1), True) if B.dim() == 1 else (B, False)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} produced non-finite values; increase damping or check the model")


def relative_residual(matvec: MatVec, X: torch.Tensor, B: torch.Tensor, damping: float) -> float:
    """``max_j ||(A + damping I) x_j - b_j|| / ||b_j||`` for column blocks X, B ``[p, k]``."""
    R = matvec(X) + damping * X - B
    denom = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    return float((R.norm(dim=0) / denom).max())


class DirectSolver:
    """Exact solves with a formed symmetric matrix: Cholesky, falling back to an eigendecomposition.

    Args:
        matrix: symmetric curvature ``[p, p]`` (e.g. the exact Hessian, which already holds the L2 term).
        damping: added to the diagonal (absolute, same units as the curvature).
    """

    def __init__(self, matrix: torch.Tensor, damping: float = 0.0):
        self.matrix = matrix
        self.damping = damping
        A = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
        chol, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0 and torch.isfinite(chol).all():
            self._chol, self._eig = chol, None
        else:
            evals, evecs = torch.linalg.eigh(A.double())
            if not torch.isfinite(evals).all() or evals.min() <= 0:
                raise NumericalError(
                    f"curvature + damping is not positive definite (smallest eigenvalue {float(evals.min()):.3g}); "
                    "increase damping or use Gauss-Newton curvature"
                )
            self._chol, self._eig = None, (evals.to(A.dtype), evecs.to(A.dtype))

    def solve(self, B: torch.Tensor) -> Solution:
        """``(H + damping I)^-1 B``."""
        Bm, single = _as_matrix(B)
        if self._chol is not None:
            X = torch.cholesky_solve(Bm, self._chol)
        else:
            evals, evecs = self._eig
            X = evecs @ ((evecs.T @ Bm) / evals[:, None])
        _check_finite(X, "direct solve")
        res = relative_residual(lambda V: self.matrix @ V, X, Bm, self.damping)
        return Solution(X[:, 0] if single else X, res, 0, "exact")


def conjugate_gradient(
    matvec: MatVec, B: torch.Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: int = 1000
) -> Solution:
    """Conjugate gradients on ``(A + damping I) X = B``, all columns at once (A symmetric PD).

    Args:
        matvec: ``V [p, k] -> A V``.
        B: right-hand sides ``[p]`` or ``[p, k]``.
        damping: added to the diagonal.
        tol: stop when every column's relative residual is below ``tol``.
        max_iter: iteration cap; the achieved residual is returned either way.
    """
    Bm, single = _as_matrix(B)
    X = torch.zeros_like(Bm)
    R = Bm.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    bnorm = Bm.norm(dim=0).clamp_min(torch.finfo(Bm.dtype).tiny)
    it, met = 0, False
    for it in range(1, max_iter + 1):
        AP = matvec(P) + damping * P
        pAp = (P * AP).sum(0)
        alpha = torch.where(pAp > 0, rs / pAp.clamp_min(torch.finfo(Bm.dtype).tiny), torch.zeros_like(rs))
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        if float((rs_new.sqrt() / bnorm).max()) < tol:
            met = True
            break
        P = R + (rs_new / rs.clamp_min(torch.finfo(Bm.dtype).tiny)) * P
        rs = rs_new
    _check_finite(X, "conjugate gradients")
    res = relative_residual(matvec, X, Bm, damping)
    return Solution(X[:, 0] if single else X, res, it, "cg", converged=met or res <= tol)


def top_eigenvalue(matvec: MatVec, dim: int, dtype: torch.dtype, iters: int = 50, seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric PSD operator by power iteration."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, 1, generator=gen, dtype=dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float((v * w).sum())
        v = w / w.norm().clamp_min(torch.finfo(dtype).tiny)
    return lam


def lissa(
    matvec: MatVec,
    B: torch.Tensor,
    damping: float = 0.0,
    scale: float | None = None,
    depth: int = 2000,
    repeats: int = 1,
    minibatch_matvec: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    seed: int = 0,
) -> Solution:
    """LiSSA (Agarwal et al. 2017) as used by Koh & Liang: a truncated Neumann series.

    ``h_0 = b``, ``h_j = b + (I - (A + damping I)/scale) h_{j-1}``; estimate ``h_depth / scale``, averaged over
    ``repeats``. Converges when ``scale`` exceeds the largest eigenvalue of ``A + damping I``; the error shrinks
    like ``(1 - lambda_min/scale)^depth``.

    Args:
        matvec: exact ``V -> A V`` (used for the residual, for the scale estimate and, when
            ``minibatch_matvec`` is None, for the recursion).
        B: right-hand sides.
        damping: added to the diagonal.
        scale: must exceed ``lambda_max(A) + damping``; None = 1.1 x a power-iteration estimate.
        depth: recursion depth.
        repeats: independent repetitions averaged (only useful with stochastic minibatch products).
        minibatch_matvec: ``(V, generator) -> A_batch V`` on a sampled minibatch (stochastic LiSSA).
        seed: seeds the minibatch sampling.
    """
    Bm, single = _as_matrix(B)
    if scale is None:
        scale = 1.1 * (top_eigenvalue(matvec, Bm.shape[0], Bm.dtype) + damping)
    if not (scale > 0 and math.isfinite(scale)):
        raise NumericalError(f"LiSSA scale must be positive and finite, got {scale}")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(Bm)
    for _ in range(repeats):
        h = Bm.clone()
        for _ in range(depth):
            Ah = minibatch_matvec(h, gen) if minibatch_matvec is not None else matvec(h)
            h = Bm + h - (Ah + damping * h) / scale
        total += h / scale
    X = total / repeats
    _check_finite(X, "LiSSA")
    res = relative_residual(matvec, X, Bm, damping)
    return Solution(X[:, 0] if single else X, res, depth * repeats, "lissa", converged=res <= LISSA_CONVERGED)
