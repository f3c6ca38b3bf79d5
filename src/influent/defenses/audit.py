"""``influent audit``: rank a user's training examples by suspicion and write the list (CSV and JSON).

No poison is known here: the output is the ranking itself, with every requested ranker's score beside the
primary one so a user can compare. Queries for the query rankers come from the held-out split:

* ``validation`` (default): every held-out review at its own label (mislabel hunting);
* ``misclassified``: only the held-out reviews the model gets wrong;
* a suspected ``trigger`` phrase: held-out reviews with the phrase inserted, kept where the model's
  prediction then disagrees with the review's label (backdoor hunting);
* a ``query_file`` (CSV/TSV/JSONL/Parquet with text and label columns): the user's own queries.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from influent.data import load_corpus
from influent.data.text_edits import insert_trigger
from influent.defenses.inputs import head_audit_inputs
from influent.defenses.rankers import QUERY_RANKERS, RANKERS, AuditInputs, available_rankers, score_all
from influent.defenses.truth import found_when_checking, known_bad
from influent.errors import UserError
from influent.evaluation.detection import ranking
from influent.models.head import predict
from influent.store import write_json

QUERY_MODES = ("validation", "misclassified", "none")
DEFAULT_PRIMARY = "loo_loss"


def _label_index(value, names: list[str], where: str) -> int:
    s = str(value).strip()
    if s in names:
        return names.index(s)
    try:
        i = int(float(s))
    except ValueError:
        raise UserError(f"{where}: label {value!r} is not one of {', '.join(names)}", field="query_file") from None
    if not 0 <= i < len(names):
        raise UserError(f"{where}: label index {i} out of range 0..{len(names) - 1}", field="query_file")
    return i


def read_queries(path: str | Path, names: list[str], text_column: str = "text", label_column: str = "label"):
    """Texts and label indices of a user's query file (labels given by name or index)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"query file not found: {path}", field="query_file")
    suffix = "".join(path.suffixes).lower()
    try:
        if ".jsonl" in suffix:
            df = pd.read_json(path, lines=True)
        elif ".parquet" in suffix:
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if ".tsv" in suffix else ",")
    except Exception as exc:  # noqa: BLE001 - one-line error for a user file
        raise UserError(f"cannot read the query file {path}: {str(exc).splitlines()[0]}", field="query_file") from None
    for col in (text_column, label_column):
        if col not in df.columns:
            raise UserError(
                f"query file {path} has no column {col!r} (columns: {', '.join(map(str, df.columns))})",
                field="text_column" if col == text_column else "label_column",
            )
    texts = [str(t) for t in df[text_column]]
    labels = [_label_index(v, names, f"query file {path} row {i + 2}") for i, v in enumerate(df[label_column])]
    if not texts:
        raise UserError(f"query file {path} has no rows", field="query_file")
    return texts, torch.as_tensor(labels, dtype=torch.long)


def build_queries(
    setup,
    mode: str = "validation",
    trigger: str | None = None,
    query_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
):
    """Query features and labels for the query rankers, or ``(None, None, description)``."""
    names = list(setup.corpus.label_names)
    if query_file:
        texts, labels = read_queries(query_file, names, text_column, label_column)
        return setup.embed(texts), labels, f"{len(texts)} queries from {query_file}"
    if trigger:
        held = [setup.corpus.texts[i] for i in setup.test_idx]
        x = setup.embed([insert_trigger(t, trigger) for t in held])
        wrong = predict(setup.model, x) != setup.test_y
        if int(wrong.sum()) == 0:
            return (
                x,
                setup.test_y.clone(),
                f"{len(held)} held-out reviews with {trigger!r} (none misclassified)",
            )
        return (
            x[wrong],
            setup.test_y[wrong],
            f"{int(wrong.sum())} held-out reviews misclassified once {trigger!r} is inserted",
        )
    if mode == "none":
        return None, None, "none"
    if mode == "validation":
        return setup.test_x, setup.test_y, f"{len(setup.test_y)} held-out reviews at their labels"
    if mode == "misclassified":
        wrong = predict(setup.model, setup.test_x) != setup.test_y
        return setup.test_x[wrong], setup.test_y[wrong], f"{int(wrong.sum())} misclassified held-out reviews"
    raise UserError(f"queries_from must be one of {', '.join(QUERY_MODES)}, got {mode!r}", field="queries_from")


def _atomic_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def run_audit(
    data: str | None = None,
    *,
    out: str | Path = "audit",
    rankers: list[str] | None = None,
    primary: str | None = None,
    queries_from: str = "validation",
    trigger: str | None = None,
    query_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    encoder: str | None = None,
    l2: float | None = None,
    damping: float = 0.0,
    seed: int = 0,
    folds: int = 5,
    top: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    truth: str | None = None,
) -> dict:
    """Rank every training example of ``data`` (default: bundled Rotten Tomatoes) by suspicion.

    Writes ``<out>/ranking.csv`` (rank, index, id, label, one column per ranker, text; most suspicious
    first by ``primary``) and ``<out>/ranking.json`` (settings + the same rows).

    Args:
        data: corpus spec as for :func:`influent.pipeline.prepare_head`.
        out: output folder.
        rankers: ranker names (default: every available one; see ``influent.defenses.rankers.RANKERS``).
        primary: the ranker that orders the list (default ``query_influence`` when a trigger or query file
            is given, else ``loo_loss``, the influence-predicted leave-one-out loss).
        queries_from: ``validation``, ``misclassified`` or ``none`` (ignored with ``trigger``/``query_file``).
        trigger: suspected trigger phrase (queries = held-out reviews with it inserted).
        query_file: the user's own labelled queries.
        encoder, l2, seed: as for ``prepare_head`` (seed also seeds folds and tie-breaking).
        damping: added to the Hessian before inverting.
        folds: k of the out-of-fold baselines.
        top: write only the ``top`` most suspicious rows (default: all).
        truth: the known-bad examples, a file of ids or a column of ``data``
            (:mod:`influent.defenses.truth`): the rows get a ``truth`` column and the settings a ``truth``
            summary (counts; precision and recall of the primary ranking at 5 / 10 / 20 % checked).

    Returns:
        ``{'csv', 'json', 'primary', 'rankers', 'n', 'queries', 'truth'}`` (``truth``: the summary or None).
    """
    from influent.pipeline import prepare_head

    # the truth is checked before any model work (the corpus loads again, unchanged, inside prepare_head)
    bad = None if truth is None else known_bad(truth, data, load_corpus(data, text_column, label_column))
    setup = prepare_head(data, text_column=text_column, label_column=label_column, seed=seed, cache_dir=cache_dir,
                         progress=progress, l2=l2, encoder=encoder)
    train_bad = None if bad is None else bad[np.asarray(setup.train_idx)]
    qx, qy, qdesc = build_queries(setup, queries_from, trigger, query_file, text_column, label_column)
    audit = head_audit_inputs(
        setup.train_x, setup.train_y, len(setup.corpus.label_names), float(setup.task.l2), model=setup.model,
        query_x=qx, query_y=qy, damping=damping, folds=folds, seed=seed,
    )
    names, primary = choose_rankers(audit, rankers, primary, suspect_given=bool(trigger or query_file))
    scores = score_all(audit, names)
    order = ranking(scores[primary], seed)
    if top is not None:
        order = order[:top]
    settings = {
        "data": setup.info.get("data"),
        "encoder": setup.info.get("encoder"),
        "seed": seed,
        "l2": setup.task.l2,
        "damping": damping,
        "primary": primary,
        "rankers": names,
        "queries": qdesc,
    }
    if bad is not None:
        settings["truth"] = {"source": truth, "known_bad": int(bad.sum()), "in_training": int(train_bad.sum()),
                             "held_out": int(bad.sum() - train_bad.sum()),
                             "by_primary": found_when_checking(order, train_bad)}
    paths = write_ranking(Path(out), setup, scores, names, order, settings, train_bad)
    return {**paths, "primary": primary, "rankers": names, "n": len(setup.train_y), "queries": qdesc,
            "truth": settings.get("truth")}


def choose_rankers(
    audit: AuditInputs, rankers: list[str] | None, primary: str | None, suspect_given: bool
) -> tuple[list[str], str]:
    """The rankers to run (default: every available one) and the primary one that orders the list.

    Default primary: ``query_influence`` when the user named a suspect (trigger or query file), else
    ``loo_loss``. The primary ranker is added to the list when missing.
    """
    names = rankers or available_rankers(audit)
    for r in names:
        if r not in RANKERS:
            raise UserError(f"unknown ranker {r!r}; choose from {', '.join(RANKERS)}", field="rankers")
        if r in QUERY_RANKERS and not audit.has_queries:
            raise UserError(f"ranker {r!r} needs queries (queries_from, trigger or query_file)", field="rankers")
    if primary is None:
        primary = (
            "query_influence"
            if suspect_given and "query_influence" in names
            else (DEFAULT_PRIMARY if DEFAULT_PRIMARY in names else names[0])
        )
    if primary not in names:
        names = [primary] + names
    return names, primary


def write_ranking(out: Path, setup, scores: dict, names: list[str], order, settings: dict, truth=None) -> dict:
    """``out/ranking.csv`` (rank, index, id, label, one column per ranker, ``truth`` when known, text) and
    ``out/ranking.json`` (``settings`` + the same rows), in ``order`` (most suspicious first); returns their
    paths. ``truth``: one bool per training example (known bad) or None."""
    label_names = list(setup.corpus.label_names)
    header = ["rank", "index", "id", "label"] + names + (["truth"] if truth is not None else []) + ["text"]
    rows = []
    for r, i in enumerate(order, start=1):
        corpus_i = int(setup.train_idx[i])
        rows.append(
            [r, int(i), setup.corpus.ids[corpus_i], label_names[int(setup.train_y[i])]]
            + [float(scores[nm][i]) for nm in names]
            + ([bool(truth[i])] if truth is not None else [])
            + [setup.corpus.texts[corpus_i]]
        )
    _atomic_csv(out / "ranking.csv", header, rows)
    write_json(
        out / "ranking.json",
        {
            **settings,
            "sign": "higher = more suspicious",
            "n_train": len(setup.train_y),
            "rows": [dict(zip(header, row)) for row in rows],
        },
    )
    return {"csv": str(out / "ranking.csv"), "json": str(out / "ranking.json")}
