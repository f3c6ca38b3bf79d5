"""Scatter plot of estimated vs actual changes (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scatter_png(
    path: str | Path,
    estimated: np.ndarray,
    actual: np.ndarray,
    *,
    title: str,
    xlabel: str = "estimated change of query loss (score / n, nats)",
    ylabel: str = "actual change (nats)",
    groups: list[str] | None = None,
    note: str | None = None,
) -> Path:
    """Write a scatter of ``actual`` against ``estimated`` (same shape ``[k, Q]`` or flat) with ``y = x``.

    Args:
        path: PNG path (parent folders created).
        estimated, actual: the two quantities; rows are examples, columns queries.
        title, xlabel, ylabel: text.
        groups: one label per row (e.g. ``top``, ``bottom``, ``random``), coloured separately.
        note: text drawn in the upper-left corner (e.g. correlations).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est = np.asarray(estimated, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if est.ndim == 1:
        est, act = est[:, None], act[:, None]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    labels = groups if groups is not None else ["examples"] * est.shape[0]
    for name in dict.fromkeys(labels):
        rows = [i for i, g in enumerate(labels) if g == name]
        ax.scatter(est[rows].ravel(), act[rows].ravel(), s=12, alpha=0.75, label=name)
    finite = np.concatenate([est.ravel(), act.ravel()])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="y = x")
    ax.axhline(0, color="lightgrey", lw=0.5)
    ax.axvline(0, color="lightgrey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if note:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    ax.legend(fontsize=7, loc="lower right")
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
