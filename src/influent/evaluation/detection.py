"""Detection metrics for rankers of suspicious training examples (poison, mislabels).

A ranker gives every training example a suspicion score (higher = more suspicious). Against the known
set of bad examples (``is_bad``, boolean ``[n]``) we report threshold-free AUROC and AUPRC (average
precision) and the recall when the top ``k`` are checked. Ties are broken by a seeded random order so a
constant ranker scores like a random one instead of like the data's storage order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

DEFAULT_FRACTIONS = (0.01, 0.05, 0.10, 0.30)


def _check(scores: np.ndarray, is_bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_bad = np.asarray(is_bad, dtype=bool).reshape(-1)
    if scores.shape != is_bad.shape:
        raise ValueError(f"scores ({scores.shape[0]}) and is_bad ({is_bad.shape[0]}) differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("suspicion scores contain NaN or Inf")
    return scores, is_bad


def ranking(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices from most to least suspicious (ties broken by a seeded random permutation)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    perm = np.random.default_rng(seed).permutation(scores.shape[0])
    order = np.argsort(-scores[perm], kind="stable")
    return perm[order]


def auroc(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """Area under the ROC curve (0.5 = random, 1 = every bad example ranked above every clean one)."""
    scores, is_bad = _check(scores, is_bad)
    if is_bad.all() or not is_bad.any():
        return float("nan")
    return float(roc_auc_score(is_bad, scores))


def auprc(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """Average precision (area under precision-recall; random = the fraction of bad examples)."""
    scores, is_bad = _check(scores, is_bad)
    if not is_bad.any():
        return float("nan")
    return float(average_precision_score(is_bad, scores))


def recall_at_k(scores: np.ndarray, is_bad: np.ndarray, k: int, seed: int = 0) -> float:
    """Fraction of the bad examples found among the ``k`` most suspicious."""
    scores, is_bad = _check(scores, is_bad)
    if not is_bad.any():
        return float("nan")
    top = ranking(scores, seed)[: max(0, int(k))]
    return float(is_bad[top].sum() / is_bad.sum())


def k_values(
    n: int, n_bad: int | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, int]:
    """The budgets reported: ``{'k=n_bad': n_bad, '1%': ..., '5%': ...}`` (fractions of ``n``, rounded)."""
    ks: dict[str, int] = {}
    if n_bad is not None:
        ks["k=n_bad"] = int(n_bad)
    for f in fractions:
        ks[f"{100 * f:g}%"] = round(f * n)
    return ks


def detection_metrics(
    scores: np.ndarray,
    is_bad: np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    extra_k: Iterable[int] = (),
    seed: int = 0,
) -> dict[str, float]:
    """AUROC, AUPRC and recall at ``k = |bad|`` and at each fraction of the training set.

    Returns:
        ``{'auroc', 'auprc', 'recall@k=n_bad', 'recall@1%', ..., 'recall@<k>' for extra_k}``.
    """
    scores, is_bad = _check(scores, is_bad)
    out = {"auroc": auroc(scores, is_bad), "auprc": auprc(scores, is_bad)}
    for name, k in k_values(len(scores), int(is_bad.sum()), fractions).items():
        out[f"recall@{name}"] = recall_at_k(scores, is_bad, k, seed)
    for k in extra_k:
        out[f"recall@{int(k)}"] = recall_at_k(scores, is_bad, int(k), seed)
    return out
