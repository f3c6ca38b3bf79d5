"""Mean and sd over seeds of an attack's result rows (the ``summary`` of every ``attack_<kind>.json``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def summarise(rows: list[dict], keys: Iterable[str], values: Iterable[str]) -> list[dict]:
    """Group ``rows`` by ``keys``; mean, sd (ddof=1; 0 for one row) and count of each value column."""
    keys, values = list(keys), list(values)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["runs"] = len(rs)
        for v in values:
            a = np.array([float(r[v]) for r in rs if r.get(v) is not None], dtype=np.float64)
            row[f"{v}_mean"] = float(a.mean()) if len(a) else float("nan")
            row[f"{v}_sd"] = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        out.append(row)
    return out


def summary_columns(summary: list[dict]) -> tuple[list[str], list[str]]:
    """The grouping keys and the value names (``x`` of ``x_mean`` / ``x_sd``) of a :func:`summarise` table,
    in first-seen order."""
    keys: list[str] = []
    values: list[str] = []
    for row in summary:
        for col in row:
            if col.endswith("_mean"):
                if col[:-5] not in values:
                    values.append(col[:-5])
            elif not col.endswith("_sd") and col != "runs" and col not in keys:
                keys.append(col)
    return keys, values
