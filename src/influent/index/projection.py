"""LoGra's projection of per-example gradients through a linear module's Kronecker structure.

A tracked ``nn.Linear`` with (bias-augmented) input width ``d_in`` and output width ``d_out`` has per-example
gradient ``G_i = sum_t g_it a_it^T`` (``[d_out, d_in]``, :mod:`influent.curvature.linear_grads`). With
seeded random matrices ``P_in`` (``[k_in, d_in]``) and ``P_out`` (``[k_out, d_out]``) the projected gradient
is ``P_out G_i P_in^T = sum_t (P_out g_it) (P_in a_it)^T`` (``[k_out, k_in]``), formed from the projected
activations and output gradients without ever forming ``G_i`` (Choe et al. 2024, LoGra). Entries of
``P`` are ``N(0, 1/k)`` (``gaussian``, so ``E[P^T P] = I`` and dot products are preserved in expectation) or
rows orthonormal (``orthogonal``; with ``k = d`` the projection is a rotation and every score is exact).
Each module's matrices are drawn from a generator seeded by ``(seed, module name, side)``: the same
index seed gives the same projection on every machine and rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from influent import store
from influent.errors import UserError

KINDS = ("gaussian", "orthogonal")


def module_seed(seed: int, name: str, side: str) -> int:
    """The 63-bit generator seed of one module's ``in`` or ``out`` projection."""
    return int(store.fingerprint("projection", int(seed), name, side), 16) & (2**63 - 1)


def random_projection(k: int, d: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """``[min(k, d), d]`` float32 projection (see the module docstring); ``k >= d`` keeps ``d`` rows."""
    if kind not in KINDS:
        raise UserError(f"projection: expected one of {', '.join(KINDS)}, got {kind!r}", field="projection")
    k = min(int(k), int(d))
    gen = torch.Generator().manual_seed(int(seed))
    p = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(p.T)  # q: [d, k], orthonormal columns
        p = (q * torch.sign(torch.diagonal(r))).T
    else:
        p = p / k**0.5
    return p.to(torch.float32)


@dataclass
class ModuleProjection:
    """The two projections of one module: ``p_in`` ``[k_in, d_in]`` and ``p_out`` ``[k_out, d_out]``."""

    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def width(self) -> int:
        """Entries of the module's projected gradient, ``k_out * k_in``."""
        return self.p_in.shape[0] * self.p_out.shape[0]

    def project_tokens(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected activations ``[B, T, k_in]`` and output gradients ``[B, T, k_out]``."""
        return a @ self.p_in.to(a).T, g @ self.p_out.to(g).T

    def project(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``P_out G_i P_in^T`` flattened (row-major ``[k_out, k_in]``), ``[B, k_out * k_in]``."""
        pa, pg = self.project_tokens(a, g)
        return torch.bmm(pg.transpose(1, 2), pa).reshape(a.shape[0], -1)


def projections(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int, kind: str = "gaussian"
) -> dict[str, ModuleProjection]:
    """One :class:`ModuleProjection` per module of ``shapes`` (``{name: (d_out, d_in)}``), ``k = rank`` per side.

    Raises:
        UserError: (field ``rank``) when ``rank`` is not a positive integer.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"rank must be an integer >= 1, got {rank!r}", field="rank")
    return {
        name: ModuleProjection(
            p_in=random_projection(rank, d_in, module_seed(seed, name, "in"), kind),
            p_out=random_projection(rank, d_out, module_seed(seed, name, "out"), kind),
        )
        for name, (d_out, d_in) in shapes.items()
    }
