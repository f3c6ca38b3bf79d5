"""Linear datamodeling score (LDS; Park et al. 2023, as used by Grosse et al. 2023 and kronfluence).

For random subsets ``S_1..S_m`` of the training set (each a fraction ``alpha`` of it), the influence scores
predict the query measurement of the model retrained on ``S_j`` as a sum over the removed examples:

    predicted_j = f(theta_s) + sum_{i not in S_j} score_i / n

(removing a proponent, ``score > 0``, raises the query loss). The LDS of a query is the Spearman rank
correlation over subsets between ``predicted_j`` and the actual measurement after retraining on ``S_j``;
the reported LDS is its mean over queries. It is invariant to a positive rescaling of the scores.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from influent.errors import UserError
from influent.evaluation.explanations import interval


def random_subsets(n: int, count: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` boolean keep-masks ``[count, n]``, each keeping ``round(fraction * n)`` random examples."""
    if not 0 < fraction < 1:
        raise UserError(f"subset fraction must be in (0, 1), got {fraction}", field="subset_fraction")
    rng = np.random.default_rng(seed)
    k = round(fraction * n)
    masks = np.zeros((count, n), dtype=bool)
    for j in range(count):
        masks[j, rng.choice(n, k, replace=False)] = True
    return masks


def predicted_group_change(scores: np.ndarray, keep_masks: np.ndarray) -> np.ndarray:
    """First-order change ``[m, Q]`` of each query when only the kept examples remain.

    Args:
        scores: influence scores ``[Q, n]`` (engine convention: positive = proponent).
        keep_masks: ``[m, n]`` bool, True = kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    removed = (~np.asarray(keep_masks, dtype=bool)).astype(np.float64)
    return removed @ scores.T / scores.shape[1]


def lds(scores: np.ndarray, keep_masks: np.ndarray, actual: np.ndarray) -> tuple[float, np.ndarray]:
    """Linear datamodeling score.

    Args:
        scores: ``[Q, n]`` influence scores.
        keep_masks: ``[m, n]`` subsets (True = kept).
        actual: ``[m, Q]`` actual change of each query measurement after retraining on each subset.

    Returns:
        ``(mean over queries, per-query Spearman [Q])``.
    """
    pred = predicted_group_change(scores, keep_masks)
    actual = np.asarray(actual, dtype=np.float64)
    per_query = np.array([_spearman(pred[:, q], actual[:, q]) for q in range(pred.shape[1])])
    return float(np.nanmean(per_query)), per_query


def lds_summary(
    scores: np.ndarray, keep_masks: np.ndarray, actual: np.ndarray, *, seed: int = 0, resamples: int = 2000
) -> dict:
    """:func:`lds` with a 95% percentile-bootstrap interval over queries.

    Returns:
        ``{"mean", "low", "high", "m" (queries with a defined Spearman), "per_query" [Q]}``; queries whose
        prediction or actual measurement is constant over the subsets (Spearman undefined) are left out.
    """
    _, per_query = lds(scores, keep_masks, actual)
    return {**interval(per_query, seed=seed, resamples=resamples), "per_query": per_query}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])
