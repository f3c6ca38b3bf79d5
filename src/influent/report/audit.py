"""Report section for ``audit`` output: the ranked table, a score histogram per ranker and, when the rows carry
the truth (the ``truth`` column of ``audit --truth``, or a ``poison`` / ``is_poison`` / ``mislabeled`` /
``corrupted`` flag, as benchmark and attack runs know it), each ranker's precision and recall against the share
of the data checked in its order."""

from __future__ import annotations

import numpy as np

from influent.defenses.truth import CHECKED_SHARES, checked_count
from influent.report.page import esc, figure_svg, pyplot, table

TRUTH_KEYS = ("truth", "poison", "is_poison", "poisoned", "mislabeled", "corrupted")
SHOWN_ROWS = 25


def truth_flags(rows: list[dict]) -> np.ndarray | None:
    """One bool per row from the first truth key every row has, else None (truth unknown)."""
    for key in TRUTH_KEYS:
        if rows and all(key in r for r in rows):
            return np.array([bool(r[key]) for r in rows])
    return None


def precision_recall(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checking examples in decreasing score order: share checked ``k/n``, precision ``hits/k``, recall
    ``hits/positives``, for ``k = 1..n`` (ties broken by row order, a stable sort)."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(truth[order])
    k = np.arange(1, len(scores) + 1)
    return k / len(scores), hits / k, hits / max(int(truth.sum()), 1)


def _ranker_scores(rows: list[dict], rankers: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in rankers:
        values = np.array([float(r[name]) if r.get(name) is not None else np.nan for r in rows])
        if np.isfinite(values).any():
            out[name] = values
    return out


def _histograms(scores: dict[str, np.ndarray], truth: np.ndarray | None) -> str:
    plt = pyplot()
    cols = 3
    n_rows = -(-len(scores) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(10, 2.3 * n_rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, scores.items()):
        finite = np.isfinite(values)
        if truth is None:
            ax.hist(values[finite], bins=30, color="#1f77b4")
        else:
            ax.hist([values[finite & ~truth], values[finite & truth]], bins=30, stacked=True,
                    color=["#1f77b4", "#d62728"], label=["clean", "flagged"])
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    if truth is not None:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return figure_svg(fig, "Distribution of each ranker's score over the training examples "
                           "(higher = more suspicious)" + ("; red: examples known to be poisoned or mislabelled"
                                                            if truth is not None else ""))


def _pr_curves(scores: dict[str, np.ndarray], truth: np.ndarray) -> tuple[str, list[list]]:
    plt = pyplot()
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    summary = []
    for name, values in scores.items():
        share, prec, rec = precision_recall(np.nan_to_num(values, nan=-np.inf), truth)
        ax_p.plot(share, prec, label=name, lw=1.2)
        ax_r.plot(share, rec, label=name, lw=1.2)
        at = {f: checked_count(f, len(share)) - 1 for f in CHECKED_SHARES}
        summary.append([name, *(float(prec[i]) for i in at.values()), *(float(rec[i]) for i in at.values())])
    base = truth.mean()
    ax_p.axhline(base, color="grey", ls=":", lw=1)
    ax_r.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    for ax, what in ((ax_p, "precision"), (ax_r, "recall")):
        ax.set_xlabel("share of the training data checked")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.02)
    ax_r.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return figure_svg(fig, "Precision and recall when the examples are checked in each ranker's order "
                           "(dotted: random checking)"), summary


def audit_sections(data: dict) -> list[str]:
    """Settings, the ranked table (first rows), histograms, and precision/recall when the truth is known."""
    rows = data["rows"]
    rankers = [r for r in data.get("rankers", []) if any(r in row for row in rows)]
    primary = data.get("primary", rankers[0] if rankers else "")
    scores = _ranker_scores(rows, rankers)
    truth = truth_flags(rows)
    meta = ", ".join(f"{k}={data[k]}" for k in ("n_train", "primary", "queries", "damping", "l2", "seed", "encoder")
                     if k in data)
    out = [f"<h2>Audit: training examples ranked by {esc(primary)}</h2>",
           f"<p>{esc(meta)}. Scores: {esc(data.get('sign', 'higher = more suspicious'))}.</p>"]
    shown = sorted(rows, key=lambda r: r.get("rank", 0))[:SHOWN_ROWS]
    extra = [r for r in ("self_influence", "loss_oof", "cleanlab") if r in scores and r != primary]
    headers = ["rank", "index", "label", primary, *extra, *(["truth"] if truth is not None else []), "text"]
    flag_key = next((k for k in TRUTH_KEYS if truth is not None and k in rows[0]), None)
    body = [[r.get("rank"), r.get("index"), r.get("label"), r.get(primary), *(r.get(e) for e in extra),
             *([bool(r[flag_key])] if flag_key else []), r.get("text", "")] for r in shown]
    out += [f"<h3>Most suspicious {len(shown)} of {len(rows)}</h3>",
            table(headers, body, numeric=set(range(1, 4 + len(extra))) - {2}, text_cols={len(headers) - 1})]
    if scores:
        out += ["<h3>Score distributions</h3>", _histograms(scores, truth)]
    given = data.get("truth")
    if given:
        out.append(f"<p>Truth from <code>{esc(given.get('source'))}</code>: {esc(given.get('known_bad'))} known "
                   f"bad examples, {esc(given.get('in_training'))} of them in the ranked training split "
                   f"({esc(given.get('held_out'))} held out, not ranked).</p>")
    if truth is not None:
        fig, summary = _pr_curves(scores, truth)
        out += [f"<h3>Precision and recall ({int(truth.sum())} of {len(truth)} examples flagged)</h3>", fig,
                table(["ranker", "precision @5%", "@10%", "@20%", "recall @5%", "@10%", "@20%"], summary,
                      numeric=set(range(1, 7)))]
    else:
        out.append('<p class="muted">Truth unknown (no poison / mislabel flags in the rows): no precision or '
                   "recall curves.</p>")
    return out
