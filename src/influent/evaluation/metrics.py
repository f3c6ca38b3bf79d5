"""Agreement between estimated and actual changes: correlations and relative errors."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr


def correlations(estimated: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman over all pairs (flattened), plus the mean per-query values.

    Args:
        estimated, actual: ``[k, Q]`` (examples x queries) or flat arrays of the same shape.

    Returns:
        ``{'pearson', 'spearman', 'pearson_per_query', 'spearman_per_query', 'pairs'}``; NaN where undefined.
    """
    e = np.asarray(estimated, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"shapes differ: estimated {e.shape} vs actual {a.shape}")
    e2 = e.reshape(e.shape[0], -1) if e.ndim > 1 else e[:, None]
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[:, None]
    out = {
        "pearson": _corr(pearsonr, e2.ravel(), a2.ravel()),
        "spearman": _corr(spearmanr, e2.ravel(), a2.ravel()),
    }
    out["pearson_per_query"] = float(
        np.nanmean([_corr(pearsonr, e2[:, q], a2[:, q]) for q in range(e2.shape[1])])
    )
    out["spearman_per_query"] = float(
        np.nanmean([_corr(spearmanr, e2[:, q], a2[:, q]) for q in range(e2.shape[1])])
    )
    out["pairs"] = int(e2.size)
    return out


def relative_error(estimated: np.ndarray, reference: np.ndarray) -> float:
    """``||estimated - reference|| / ||reference||`` (Frobenius)."""
    e = np.asarray(estimated, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(e - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with np.errstate(all="ignore"):
        return float(fn(a, b)[0])
