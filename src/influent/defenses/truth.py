"""The known-bad examples of a user's own audit (``influent audit --truth FILE|COLUMN``), and how well the
audit's ranking finds them.

``--truth`` names either

* a **file** (it exists): the ids of the known-bad examples, one per line, as the ``id`` column of
  ``ranking.csv`` writes them (:func:`~influent.data.corpus.text_id` of the text); blank lines and lines
  starting with ``#`` are skipped; or
* a **column** of the ``--data`` file (CSV, TSV, JSONL or Parquet) marking each row: true / 1 / yes
  (or poison, poisoned, mislabeled, mislabelled, bad) = known bad; false / 0 / no / clean / an empty cell
  = not.

An id that is no example of the data, a name that is neither a file nor a column, or a cell that is no flag
is a :class:`~influent.errors.UserError` (field ``truth``). Known-bad examples in the held-out split are
counted but not ranked (the audit ranks the training split).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from influent.data.corpus import Corpus
from influent.data.loaders import read_table
from influent.errors import UserError

TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "poison", "poisoned", "mislabeled", "mislabelled", "bad"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "clean", ""})
CHECKED_SHARES = (0.05, 0.10, 0.20)  # shares of the training data checked, as the report's table


def ids_from_file(path: Path, corpus: Corpus) -> np.ndarray:
    """One bool per corpus example: its id is listed in ``path``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"truth file {str(path)!r} cannot be read: {exc}", field="truth") from None
    wanted = {s.strip() for s in lines if s.strip() and not s.strip().startswith("#")}
    position = {i: k for k, i in enumerate(corpus.ids)}
    unknown = sorted(wanted - position.keys())
    if unknown:
        raise UserError(f"truth file {str(path)!r}: {len(unknown)} of its {len(wanted)} ids are no example of the "
                        f"data (first: {unknown[0]!r}); give the id column of ranking.csv", field="truth")
    flags = np.zeros(len(corpus), dtype=bool)
    flags[[position[i] for i in wanted]] = True
    return flags


def _flag(value, column: str, row: int) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if math.isnan(float(value)) or float(value) == 0:
            return False
        if float(value) == 1:
            return True
    elif value is None or str(value).strip().lower() in FALSE_WORDS:
        return False
    elif str(value).strip().lower() in TRUE_WORDS:
        return True
    raise UserError(f"truth column {column!r} row {row}: {value!r} is not a flag (use 1/0, true/false, yes/no)",
                    field="truth")


def flags_from_column(data: str | None, column: str, corpus: Corpus) -> np.ndarray:
    """One bool per corpus example from ``column`` of the local data file, row by row (``corpus.rows``)."""
    path = Path(str(data)) if data is not None else None
    if path is None or not path.is_file() or corpus.rows is None:
        raise UserError(f"truth {column!r} is not a file, and a truth column needs a local data file "
                        "(CSV, TSV, JSONL or Parquet)", field="truth")
    frame = read_table(path)
    if column not in frame.columns:
        raise UserError(f"truth {column!r} is neither a file nor a column of {path} (columns: "
                        f"{', '.join(map(str, frame.columns))})", field="truth")
    cells = frame[column].tolist()
    return np.array([_flag(cells[row - 1], column, row) for row in corpus.rows], dtype=bool)


def known_bad(spec: str, data: str | None, corpus: Corpus) -> np.ndarray:
    """One bool per corpus example: known bad according to ``spec`` (a file of ids or a column of ``data``)."""
    path = Path(spec).expanduser()
    flags = ids_from_file(path, corpus) if path.is_file() else flags_from_column(data, spec, corpus)
    if not flags.any():
        raise UserError(f"truth {spec!r} marks none of the {len(corpus)} examples as bad", field="truth")
    return flags


def checked_count(share: float, n: int) -> int:
    """How many of ``n`` examples checking ``share`` of them means: ``ceil(share * n)``, at least 1 (rounded
    first so 0.1 * 70 is 7, not 8)."""
    return max(1, math.ceil(round(share * n, 9)))


def found_when_checking(order: np.ndarray, truth: np.ndarray) -> dict:
    """Checking the training examples in ``order`` (most suspicious first): at each share of
    :data:`CHECKED_SHARES`, ``k =`` :func:`checked_count` examples checked, the known-bad ones ``found`` among them,
    ``precision = found / k`` and ``recall = found / known bad``."""
    n, bad = len(order), int(truth.sum())
    out = {}
    for share in CHECKED_SHARES:
        k = checked_count(share, n)
        found = int(truth[order[:k]].sum())
        out[f"{100 * share:g}%"] = {"checked": k, "found": found, "precision": found / k,
                                   "recall": found / bad if bad else float("nan")}
    return out
