"""Eigendecomposition of a symmetric PSD curvature factor that never returns NaN (kronfluence issue #42)."""

from __future__ import annotations

import torch

from influent.errors import NumericalError


def robust_eigh(
    matrix: torch.Tensor, name: str = "factor", max_tries: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor in float64 that never returns NaN.

    Symmetrises, tries ``torch.linalg.eigh``; on failure or non-finite output retries with growing
    jitter (``1e-10 .. 1e-4`` times the mean diagonal); then scipy's LAPACK ``eigh`` on CPU.

    Returns:
        ``(eigenvalues clamped at 0, eigenvectors)`` in float64 on CPU.

    Raises:
        NumericalError: if the matrix itself is non-finite or every attempt fails.
    """
    m = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise NumericalError(f"{name}: covariance factor has non-finite entries (NaN/inf in gradients?)")
    m = 0.5 * (m + m.T)
    scale = float(m.diagonal().abs().mean()) or 1.0
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    for k in range(max_tries + 1):
        jitter = 0.0 if k == 0 else scale * 10.0 ** (-10 + 2 * (k - 1))
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * eye)
        except RuntimeError:
            continue
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return (vals - jitter).clamp_min(0.0), vecs
    try:
        import scipy.linalg

        vals, vecs = scipy.linalg.eigh(m.numpy(), driver="evr")
        vals_t, vecs_t = torch.from_numpy(vals), torch.from_numpy(vecs)
        if torch.isfinite(vals_t).all() and torch.isfinite(vecs_t).all():
            return vals_t.clamp_min(0.0), vecs_t
    except Exception:  # noqa: BLE001, S110 - any LAPACK failure falls through to the error below
        pass
    raise NumericalError(f"{name}: eigendecomposition failed or stayed non-finite after jitter and scipy")


class EighOnce:
    """:func:`robust_eigh` that decomposes each distinct matrix once.

    Modules fed the same input (query / key / value of one attention layer) have bitwise equal activation
    covariances, and ``eigh`` dominates the fit: a repeat gets a copy of the first result (a copy, since
    safetensors refuses tensors sharing storage).
    """

    def __init__(self) -> None:
        self._done: dict[tuple, list] = {}

    def __call__(self, matrix: torch.Tensor, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(matrix.shape), float(matrix.trace()), float(matrix.sum()))
        for other, result in self._done.get(key, []):
            if torch.equal(other, matrix):
                return result[0].clone(), result[1].clone()
        result = robust_eigh(matrix, label)
        self._done.setdefault(key, []).append((matrix, result))
        return result
