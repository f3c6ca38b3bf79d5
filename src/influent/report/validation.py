"""Report section for ``validate`` output: estimated against actual change of the query loss (one scatter per
ground truth: cold and warm leave-one-out, PBRF), the correlation table with the LDS, and the gap table."""

from __future__ import annotations

import numpy as np

from influent.report.page import esc, figure_svg, pyplot, table

TITLES = {"loo_cold": "cold LOO", "loo_warm": "warm LOO", "pbrf": "PBRF"}


def _scatters(data: dict) -> str:
    plt = pyplot()
    truths = [g for g in TITLES if g in data.get("ground_truth", {})]
    if not truths:
        return ""
    fig, axes = plt.subplots(1, len(truths), figsize=(10, max(3.6, 9.5 / len(truths))), squeeze=False)
    for ax, g in zip(axes.flat, truths):
        actual = np.asarray(data["ground_truth"][g], dtype=float).ravel()
        lo, hi = np.inf, -np.inf
        for name, est in data.get("estimated_change", {}).items():
            est = np.asarray(est, dtype=float).ravel()
            if est.shape != actual.shape:
                continue
            ax.scatter(est, actual, s=14, alpha=0.75, label=name)
            both = np.concatenate([est, actual])
            lo, hi = min(lo, np.nanmin(both)), max(hi, np.nanmax(both))
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="grey", ls=":", lw=1)
        ax.set_title(TITLES[g])
        ax.set_xlabel("estimated change (score / n, nats)")
        ax.set_ylabel("actual change (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_svg(fig, "Each point: one removed training example and one query; dotted: y = x.")


def _estimate_rows(data: dict) -> tuple[list[str], list[list]]:
    truths = [g for g in TITLES if g in data.get("ground_truth", {})]
    headers = ["estimate", *(f"{TITLES[g]} Pearson" for g in truths), *(f"{TITLES[g]} Spearman" for g in truths),
               "LDS", "seconds"]
    rows = []
    for name, row in data.get("estimates", {}).items():
        vs = row.get("vs", {})
        rows.append([name, *(vs.get(g, {}).get("pearson_per_query") for g in truths),
                     *(vs.get(g, {}).get("spearman_per_query") for g in truths), row.get("lds"), row.get("seconds")])
    return headers, rows


def validate_sections(data: dict) -> list[str]:
    """Settings, the scatters, the correlation table and the gap decomposition."""
    settings = data.get("settings", {})
    meta = ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, (dict, list)))
    headers, rows = _estimate_rows(data)
    out = [f"<h2>Validate: influence against retraining ({esc(data.get('model', ''))})</h2>",
           f"<p>{esc(meta)}.</p>", "<h3>Estimated against actual change of the query loss</h3>", _scatters(data),
           "<h3>Correlations (per query, averaged) and the LDS</h3>",
           table(headers, rows, numeric=set(range(1, len(headers))))]
    gap = data.get("gap") or {}
    if gap:
        gap_rows = [[part, key, value] for part, items in gap.items() for key, value in items.items()]
        out += ["<h3>Gap decomposition (Bae et al. 2022)</h3>",
                table(["part", "measurement", "value"], gap_rows, numeric={2})]
    return out
