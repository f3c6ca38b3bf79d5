"""Interactive label review (Teso et al. 2021, "Interactive Label Cleaning with Example-based Explanations"):
the pieces the ``influent review`` loop is built from, each usable and testable without a terminal.

- :func:`counter_examples`: the most incompatible training example of each suspicious one.
- :class:`DecisionLog`: every decision appended to a JSON-lines file and flushed to disk before the next one
  is asked for, so a killed process loses nothing; :meth:`DecisionLog.replay` is the state it records.
- :func:`write_cleaned`: the input data file with the decisions applied, in the input's own format.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from influent.data.corpus import text_id
from influent.errors import UserError
from influent.influence import InfluenceMethod

ACTIONS = ("keep", "relabel", "drop", "skip")


def counter_examples(method: InfluenceMethod, features: torch.Tensor, labels: torch.Tensor,
                     positions: list[int]) -> list[tuple[int, float]]:
    """The most incompatible counter-example of each training example in ``positions`` (CINCER's choice).

    For the suspicious training example ``z_i`` at its recorded label, with ``g_i = grad_theta L(z_i)`` and
    the method's curvature ``C``, the counter-example is ``k* = argmin_{k != i} g_i^T C^-1 g_k``: the training
    example whose up-weighting raises ``z_i``'s loss at its recorded label the most (to first order), i.e.
    the strongest opponent of that label, the example most in contradiction with it. Its score is negative
    when such an opponent exists (influent's sign: positive = proponent).

    Args:
        method: a fitted influence method over the training set (``n_train`` rows).
        features, labels: the training batch (``[n, d]`` float, ``[n]`` int64) the method was fitted on.
        positions: rows of the training set to find counter-examples for.

    Returns:
        One ``(k*, score)`` per position.
    """
    if not positions:
        return []
    idx = torch.as_tensor(positions, dtype=torch.long)
    scores = np.array(method.pairwise_scores((features[idx], labels[idx])), dtype=np.float64)
    scores[np.arange(len(positions)), np.asarray(positions)] = np.inf  # never the example itself
    best = scores.argmin(1)
    return [(int(k), float(scores[q, k])) for q, k in enumerate(best)]


class DecisionLog:
    """A JSON-lines file of review decisions, one object per line, appended and fsync'ed one at a time.

    Lines: ``{"id", "action": keep|relabel|drop|skip, "label" (new label, relabel only), "old_label", "time"}``
    and ``{"id", "action": "undo", "time"}`` (cancels that example's latest decision).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        """Write one decision and flush it to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "time": round(time.time(), 3)}, ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[dict]:
        """Every complete line of the log (a half-written last line of a killed process is ignored)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def replay(self) -> dict[str, dict]:
        """The decision in force for each example id, in the order they were made (undo applied)."""
        stacks: dict[str, list[dict]] = {}
        order: list[str] = []
        for rec in self.records():
            stack = stacks.setdefault(rec["id"], [])
            if rec.get("action") == "undo":
                if stack:
                    stack.pop()
            elif rec.get("action") in ACTIONS:
                stack.append(rec)
                order.append(rec["id"])
        seen, result = set(), {}
        for i in order:
            if i not in seen and stacks[i]:
                seen.add(i)
                result[i] = stacks[i][-1]
        return result


def _read(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix == ".tsv":
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=True)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise UserError(f"data {str(path)!r}: review writes CSV, TSV, JSONL or Parquet files", field="data")


def _write(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(tmp, index=False)
    elif suffix == ".tsv":
        frame.to_csv(tmp, sep="\t", index=False)
    elif suffix in (".jsonl", ".json"):
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def write_cleaned(data: str | Path, text_column: str, label_column: str, decisions: dict[str, dict],
                  out: str | Path) -> dict:
    """Write ``data`` with ``decisions`` applied (drop: row removed; relabel: label cell replaced) to ``out``
    in the same format (atomically). Rows are matched by the text's stable id. Returns counts."""
    data, out = Path(data), Path(out)
    if out.suffix.lower() != data.suffix.lower():
        raise UserError(f"out {str(out)!r} must have the input's extension {data.suffix!r}", field="out")
    frame = _read(data)
    ids = [text_id(str(t)) for t in frame[text_column]]
    keep = np.ones(len(frame), dtype=bool)
    counts = {"dropped": 0, "relabelled": 0, "rows": 0}
    column = frame[label_column]
    for row, i in enumerate(ids):
        d = decisions.get(i)
        if d is None:
            continue
        if d["action"] == "drop":
            keep[row] = False
            counts["dropped"] += 1
        elif d["action"] == "relabel":
            value = d["label"]
            if pd.api.types.is_numeric_dtype(column.dtype):
                value = type(column.iloc[row].item())(value)
            frame.at[frame.index[row], label_column] = value
            counts["relabelled"] += 1
    cleaned = frame[keep].reset_index(drop=True)
    counts["rows"] = len(cleaned)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(cleaned, out)
    return counts
