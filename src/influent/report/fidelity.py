"""The files of a fidelity evaluation (``influent validate``): Markdown tables, scatter plots, the JSON.

Renders the result dict of :func:`influent.evaluation.fidelity.evaluate_fidelity`; computes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from influent.report.scatter import scatter_png
from influent.store import write_json

TITLES = {"loo_cold": "leave-one-out, cold start", "loo_warm": "leave-one-out, warm start", "pbrf": "PBRF"}
"""Display title of each ground truth, in report order."""


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _estimate_table(result: dict) -> list[str]:
    truths = [g for g in TITLES if g in result["ground_truth"]]
    lines = [
        "| estimate | " + " | ".join(f"{TITLES[g]} P / S" for g in truths) + " | LDS |",
        "|" + "---|" * (len(truths) + 2),
    ]
    for name, row in result["estimates"].items():
        cells = []
        for g in truths:
            c = row["vs"].get(g)
            cells.append(
                "n/a"
                if c is None
                else f"{_fmt(c['pearson_per_query'])} / {_fmt(c['spearman_per_query'])} "
                f"({_fmt(c['pearson'])} / {_fmt(c['spearman'])})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(row.get('lds'))} |")
    return lines


def _gap_table(gap: dict) -> list[str]:
    if not gap:
        return []
    lines = ["", "## Gap decomposition (Bae et al. 2022)", "", "| part | measurement | value |", "|---|---|---|"]
    for part, items in gap.items():
        for key, value in items.items():
            v = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {part} | {key} | {v} |")
    return lines


def markdown_report(result: dict) -> str:
    """The tables of a fidelity result as Markdown (settings, estimates vs ground truths, gap, plots)."""
    s = result["settings"]
    lines = [
        f"# influent validate: {result['model']}",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list))) + ".",
        "",
        (
            "Pearson / Spearman between the estimated change of the query loss when an example is removed "
            "(`score / n`) and the actual change, per query then averaged (pooled over all example x query "
            "pairs in brackets). LDS: mean over queries of the Spearman correlation over retrained subsets."
        ),
        "",
        *_estimate_table(result),
        *_gap_table(result.get("gap", {})),
        "",
        "Scatter plots: " + ", ".join(f"`{p}`" for p in result.get("plots", [])),
        "",
    ]
    return "\n".join(lines)


def scatter_plots(
    out: Path,
    estimate: np.ndarray,
    truths: dict[str, np.ndarray],
    kinds: list[str],
    title: str,
    agreement: dict[str, dict],
) -> list[str]:
    """One ``scatter-<ground truth>.png`` per ground truth in ``out``; returns the file names.

    Args:
        out: output folder.
        estimate: estimated changes ``[k, Q]`` (nats); truths: ground truth -> actual changes ``[k, Q]``.
        kinds: why each of the k examples was chosen (``top`` / ``bottom`` / ``random``), coloured apart.
        title: what the estimate is (``"head: exact influence"``).
        agreement: ground truth -> its :func:`~influent.evaluation.metrics.correlations` with ``estimate``
            (the pooled Pearson / Spearman are printed on the plot).
    """
    paths = []
    for g, actual in truths.items():
        c = agreement[g]
        note = f"Pearson  {c['pearson']:.3f}\nSpearman {c['spearman']:.3f}\n(pooled, {c['pairs']} pairs)"
        p = scatter_png(
            out / f"scatter-{g.replace('_', '-')}.png",
            estimate,
            actual,
            title=f"{title} vs {TITLES[g]}",
            groups=kinds,
            note=note,
        )
        paths.append(p.name)
    return paths


def write_validation(result: dict, out: str | Path) -> dict:
    """Write every file of a fidelity result to ``out``: the scatter plots of its reference method, then
    ``validate.json`` and ``validate.md``. Returns ``result`` with ``plots`` (the PNG names) added."""
    out = Path(out)
    ref = result["reference"]
    estimate = np.asarray(result["estimated_change"][ref["method"]], dtype=np.float64)
    truths = {g: np.asarray(a, dtype=np.float64) for g, a in result["ground_truth"].items()}
    agreement = result["estimates"][ref["estimate"]]["vs"]
    result["plots"] = scatter_plots(out, estimate, truths, result["examples"]["kinds"], ref["title"], agreement)
    write_fidelity_report(result, out)
    return result


def write_fidelity_report(result: dict, out: Path) -> None:
    """Write ``out/validate.json`` (the result) and ``out/validate.md`` (:func:`markdown_report`), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "validate.json", result)
    tmp = out / ".validate.md.tmp"
    tmp.write_text(markdown_report(result))
    tmp.replace(out / "validate.md")


__all__ = ["TITLES", "markdown_report", "scatter_plots", "write_fidelity_report", "write_validation"]
