"""EK-FAC fitted in the projected space (George et al. 2018 / Grosse et al. 2023, on LoGra's projections).

For a module with projected activations ``a'_t = P_in a_t`` (``k_in``) and output gradients
``g'_t = P_out g_t`` (``k_out``), the covariances ``A = sum_{i,t} a' a'^T`` and ``S = sum_{i,t} g' g'^T`` give
the eigenbases ``Q_A``, ``Q_S``; the eigenvalues are then corrected to the second moments of the projected
per-example gradients in that basis, ``lambda = (1/n) sum_i (Q_S^T G'_i Q_A)^2`` (element-wise), so the
curvature is ``(Q_A (x) Q_S) diag(lambda) (Q_A (x) Q_S)^T`` of the projected empirical Fisher. Only the
eigenvectors of ``A`` and ``S`` matter (their scale cancels). A query's projected gradient is preconditioned
as ``Q_S [(Q_S^T q Q_A) / (lambda + damping)] Q_A^T``; damping per module is absolute, or
``damping_fraction`` x the unprojected module's mean eigenvalue, estimated as ``sum(lambda) / (d_out d_in)``
(kronfluence's heuristic at the factored engine's scale), plus the task's ``l2``. Units: loss per
squared projected-parameter unit. With an orthogonal projection of full rank this is exactly the
unprojected EK-FAC in a rotated basis (the scores are equal).

Sums are plain float64 tensors, so under torch.distributed every rank adds its own examples and one
all-reduce gives the totals (:func:`influent.distributed.all_reduce_sum`).
"""

from __future__ import annotations

import torch

from influent import distributed
from influent.errors import NumericalError

STRATEGIES = ("identity", "ekfac")


class CovarianceSums:
    """Running ``A`` and ``S`` per module from projected tokens (float64)."""

    def __init__(self, widths: dict[str, tuple[int, int]], device: torch.device | str = "cpu") -> None:
        self.a = {n: torch.zeros(k_in, k_in, dtype=torch.float64, device=device) for n, (_, k_in) in widths.items()}
        self.s = {n: torch.zeros(k_out, k_out, dtype=torch.float64, device=device) for n, (k_out, _) in widths.items()}

    def add(self, name: str, pa: torch.Tensor, pg: torch.Tensor) -> None:
        """Add one batch's projected activations ``[B, T, k_in]`` and output gradients ``[B, T, k_out]``."""
        pa = pa.reshape(-1, pa.shape[-1]).double()
        pg = pg.reshape(-1, pg.shape[-1]).double()
        self.a[name] += pa.T @ pa
        self.s[name] += pg.T @ pg

    def all_reduce(self) -> None:
        """Sum the covariances over ranks (torch.distributed; nothing in one process)."""
        for name in self.a:
            distributed.all_reduce_sum(self.a[name])
            distributed.all_reduce_sum(self.s[name])

    def eigenbases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (Q_A [k_in, k_in], Q_S [k_out, k_out])}`` (float64 eigenvectors)."""
        out = {}
        for name in self.a:
            for what, m in (("activation", self.a[name]), ("gradient", self.s[name])):
                if not bool(torch.isfinite(m).all()):
                    raise NumericalError(f"non-finite projected {what} covariance of module {name}")
            out[name] = (torch.linalg.eigh(self.a[name].cpu())[1], torch.linalg.eigh(self.s[name].cpu())[1])
        return out


def rotate(grads: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """``Q_S^T G Q_A`` for ``G`` ``[B, k_out, k_in]`` (float64)."""
    return q_s.T @ grads.double() @ q_a


def precondition(
    grads: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor, lam: torch.Tensor, damping: float
) -> torch.Tensor:
    """``Q_S [(Q_S^T G Q_A) / (lambda + damping)] Q_A^T`` for ``G`` ``[B, k_out, k_in]`` (float64)."""
    return q_s @ (rotate(grads, q_a, q_s) / (lam + damping)) @ q_a.T


def heuristic_damping(lam: torch.Tensor, damping: float | None, fraction: float, l2: float, full_size: int) -> float:
    """Absolute ``damping`` or ``fraction`` x the mean eigenvalue of the *unprojected* module, plus ``l2``.

    The projection keeps the trace (``E[P^T P] = I``), so the unprojected module's mean eigenvalue is about
    ``sum(lambda) / (d_out * d_in)`` (``full_size``), not ``mean(lambda)`` over the ``k_out * k_in``
    projected ones (which is larger by about ``d_out d_in / (k_out k_in)``): the heuristic damps as much
    as the factored engine's does.
    """
    base = float(damping) if damping is not None else fraction * float(lam.sum()) / int(full_size)
    return base + float(l2)
