"""Report section for ``attack`` output: each measured quantity against the attacker's budget, mean over the
seeds with error bars of one standard deviation, one line per strategy, and the summary table."""

from __future__ import annotations

import numpy as np

from influent.attacks.summary import summary_columns
from influent.report.page import esc, figure_svg, fmt, pyplot, table

BUDGET_KEYS = ("budget", "n_poison", "size", "k", "eps")


def _budget_plot(rows: list[dict], budget: str, series: list[str], metrics: list[str], title: str) -> str:
    plt = pyplot()
    metrics = [m for m in metrics if any(r.get(f"{m}_mean") is not None for r in rows)][:3]
    if not metrics:
        return ""
    fig, axes = plt.subplots(1, len(metrics), figsize=(10, 3.6), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(" ".join(str(r.get(s)) for s in series) or "all", []).append(r)
    for ax, m in zip(axes.flat, metrics):
        for name, members in groups.items():
            pts = sorted((float(r[budget]), r.get(f"{m}_mean"), r.get(f"{m}_sd") or 0.0) for r in members
                         if r.get(f"{m}_mean") is not None)
            if pts:
                x, y, e = (np.array(v, dtype=float) for v in zip(*pts))
                ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, lw=1.2, label=name)
        ax.set_xlabel(budget)
        ax.set_title(m.replace("_", " "), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return figure_svg(fig, f"Mean over seeds against {budget}; error bars: one standard deviation over the runs.")


def attack_sections(data: dict) -> list[str]:
    """Per mode (targeted / untargeted, when present): the plots against the budget; then the summary table."""
    summary = data.get("summary", [])
    keys, values = summary_columns(summary)
    budget = next((k for k in BUDGET_KEYS if k in keys), None)
    out = [f"<h2>Attack: {esc(data.get('kind', ''))}</h2>",
           (f"<p>Attack seeds {esc(', '.join(map(str, data.get('seeds', []))))}; split seed "
           f"{esc(data.get('split_seed', '-'))}; {len(data.get('rows', []))} runs. Accuracies are on clean "
           "held-out labels; rates in [0, 1].</p>")]
    if budget is not None:
        modes = sorted({r.get("mode") for r in summary}, key=str)
        series = [k for k in keys if k not in (budget, "mode")]
        for mode in modes:
            rows = [r for r in summary if r.get("mode") == mode]
            title = f"{mode}" if mode is not None else data.get("kind", "")
            out += [f"<h3>Success against {esc(budget)}{f' ({esc(mode)})' if mode else ''}</h3>",
                    _budget_plot(rows, budget, series, values, title)]
    cells = []
    for row in summary:
        cells.append([*(row.get(k) for k in keys), row.get("runs"),
                      *("" if row.get(f"{v}_mean") is None else
                        f"{fmt(row[f'{v}_mean'])} ± {fmt(row.get(f'{v}_sd') or 0.0, 2)}" for v in values)])
    out += ["<h3>Summary (mean ± sd over runs)</h3>",
            table([*keys, "runs", *values], cells, numeric=set(range(len(keys), len(keys) + 1 + len(values))))]
    return out
