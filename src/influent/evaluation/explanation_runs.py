"""The explanation-quality evaluation (:mod:`influent.evaluation.explanations`) on the two classifiers.

:func:`head_explanation_quality`: the frozen-encoder head (exact Hessian influence; exact retraining by
Newton from the optimum). :func:`finetuned_explanation_quality`: the last ``last_k`` encoder layers + head
fine-tuned on cached prefix hidden states (:class:`~influent.models.suffix_classifier.SuffixClassifier`,
seeded AdamW replay), EK-FAC influence over its trainable linear modules, retrained by seeded replay.

Queries are a seeded random sample of the held-out reviews, each explained at its predicted label. The
references are the cosine of the frozen encoder's sentence embeddings (``embedding_nn``) and TF-IDF cosine
over the training texts (``tfidf_nn``). Removal records are appended to ``records_path`` (JSON lines) as they
finish, so an interrupted or time-capped run keeps what it measured; ``max_seconds`` stops the removal
experiment after that many seconds (the summary says how many queries it covered).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from influent.evaluation.explanations import (
    REMOVAL_KS,
    HeadRemoval,
    RankingPanel,
    RemovalRecord,
    SuffixRemoval,
    choose_default,
    influence_panel,
    paired_difference,
    removal_experiment,
    summarise,
)
from influent.rankings import embedding_similarity, tfidf_similarity


def sample_queries(n_test: int, n_queries: int, seed: int) -> np.ndarray:
    """Positions of ``n_queries`` held-out reviews drawn without replacement (seeded), in draw order, so that
    any prefix (a time-capped removal experiment) is itself a random sample."""
    rng = np.random.default_rng(seed)
    return rng.choice(n_test, size=min(n_queries, n_test), replace=False)


def collect(
    records: Iterable[RemovalRecord], path: Path | None, max_seconds: float | None, progress: bool, total: int,
    previous: list[RemovalRecord] | None = None,
) -> list[RemovalRecord]:
    """Run the removal experiment, appending each query's record to ``path`` (JSONL), until ``max_seconds``.
    ``previous`` (records already in ``path``, from :func:`read_records`) are kept and come first; without
    them ``path`` starts empty."""
    from tqdm.auto import tqdm

    start, out = time.perf_counter(), list(previous or [])
    if path is not None and not previous:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    for rec in tqdm(records, total=total, desc="remove and retrain", disable=not progress):
        out.append(rec)
        if path is not None:
            with path.open("a") as f:
                row = {name: {str(k): list(v) for k, v in by_k.items()} for name, by_k in rec.results.items()}
                f.write(json.dumps({"query": rec.query, "seconds": rec.seconds, "retrains": rec.retrains,
                                    "results": row}) + "\n")
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return out


def removal_run(panel: RankingPanel, removal, m: int, ks: tuple[int, ...], reference_ks, seed: int,
                records_path, max_seconds: float | None, progress: bool, resume: bool) -> list[RemovalRecord]:
    """The removal experiment on the first ``m`` queries, recorded to ``records_path``; with ``resume`` the
    queries already in that file are read back and skipped (the random removals are seeded per query, so a
    resumed run measures what an uninterrupted one would)."""
    path = Path(records_path) if records_path else None
    previous = read_records(path) if resume and path is not None and path.exists() else []
    seen = {r.query for r in previous}
    todo = [q for q in range(m) if q not in seen]
    return collect(removal_experiment(panel, removal, todo, ks, seed=seed, reference_ks=reference_ks),
                   path, max_seconds, progress, len(todo), previous)


def read_records(path: str | Path) -> list[RemovalRecord]:
    """The removal records :func:`collect` appended to ``path`` (JSON lines), back as :class:`RemovalRecord`."""
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        results = {name: {int(k): tuple(v) for k, v in by_k.items()} for name, by_k in row["results"].items()}
        out.append(RemovalRecord(row["query"], results, row["seconds"], row.get("retrains", 0)))
    return out


def report(model: str, panel: RankingPanel, records: list[RemovalRecord], ks: tuple[int, ...], seed: int,
           settings: dict, reference_ks: tuple[int, ...] | None = None) -> dict:
    """The JSON-ready result: settings, counts, per-ranking summary and the default's choice.

    ``retrain_seconds_per_replay`` is the removal experiment's wall time over its retrainings (distinct
    removal sets); ``full_panel_retrains`` counts those a removal run over every query with every k for every
    ranking would need (RelatIF and cosine share theirs), so ``full_panel_retrains x
    retrain_seconds_per_replay`` is its cost in seconds."""
    all_ks = tuple(sorted(set(ks) | set(reference_ks or ())))
    summary = summarise(panel, records, all_ks, seed)
    secs = [r.seconds for r in records]
    retrains = sum(r.retrains for r in records)
    conditions = len({*panel.values, "random"} - ({"cosine"} if "relatif" in panel.values else set()))
    return {
        "model": model,
        "n_train": len(panel.train_labels),
        "n_queries": panel.n_queries,
        "n_queries_removal": len(records),
        "ks": list(ks),
        "reference_ks": list(reference_ks) if reference_ks is not None else list(ks),
        "retrain_seconds_per_query": float(np.mean(secs)) if secs else None,
        "retrains": retrains,
        "retrain_seconds_per_replay": float(np.sum(secs) / retrains) if retrains else None,
        "full_panel_retrains": panel.n_queries * conditions * len(all_ks),
        "settings": settings,
        "summary": summary,
        "choice": choose_default(summary),
        "paired": paired_block(records, all_ks, seed),
    }


def paired_block(records: list[RemovalRecord], ks: tuple[int, ...], seed: int) -> dict:
    """``"influence - relatif@k"``: the paired loss-change difference of the two candidates per k (nats)."""
    return {f"influence - relatif@{k}": paired_difference(records, "influence", "relatif", k, seed) for k in ks
            if any(k in r.results.get("influence", {}) for r in records)}


def head_explanation_quality(
    setup,
    n_queries: int = 300,
    *,
    ks: tuple[int, ...] = REMOVAL_KS,
    reference_ks: tuple[int, ...] | None = None,
    removal_queries: int | None = None,
    seed: int = 0,
    records_path: str | Path | None = None,
    max_seconds: float | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Relevance and faithfulness of every ranking on the head (module docstring).

    Args:
        setup: a :class:`~influent.pipeline.HeadSetup` (trained head, embeddings, corpus, split).
        n_queries: held-out reviews in the panel; removal_queries: how many of them (the first) go through
            the removal experiment (None: all).
        resume: keep the removal records already in ``records_path`` and measure only the other queries.
        ks: numbers of proponents removed; reference_ks: those for the comparators (similarity references
            and random; None: ``ks``); seed: seeds the query sample and the random removals.
    """
    pos = sample_queries(len(setup.test_idx), n_queries, seed)
    xq = setup.test_x[torch.as_tensor(pos)]
    pred = setup.model.probabilities(xq).detach().argmax(1)
    corpus = setup.corpus
    train_texts = [corpus.texts[i] for i in setup.train_idx]
    query_texts = [corpus.texts[setup.test_idx[i]] for i in pos]
    refs = {
        "embedding_nn": lambda: embedding_similarity(setup.train_x, xq),
        "tfidf_nn": lambda: tfidf_similarity(train_texts, query_texts),
    }
    panel = influence_panel(setup.influence(), (xq, pred), pred.numpy(), setup.train_y.numpy(), refs)
    removal = HeadRemoval(setup.model, setup.train_x, setup.train_y, setup.task.l2, xq, pred)
    m = len(pos) if removal_queries is None else min(removal_queries, len(pos))
    records = removal_run(panel, removal, m, ks, reference_ks, seed, records_path, max_seconds, progress, resume)
    settings = {"influence": "exact Hessian, direct solve, damping 0", "retraining": "Newton from the optimum "
                "(models.refit.fit_head, tol 1e-9): exact", "l2": setup.task.l2, "seed": seed,
                "query_positions": pos.tolist()}
    return report("head", panel, records, ks, seed, settings, reference_ks)


def finetuned_explanation_quality(
    setup,
    n_queries: int = 100,
    *,
    train_size: int = 1000,
    last_k: int = 1,
    epochs: int = 3,
    lr: float = 1e-4,
    max_length: int = 48,
    strategy: str = "ekfac",
    ks: tuple[int, ...] = REMOVAL_KS,
    reference_ks: tuple[int, ...] | None = None,
    removal_queries: int | None = None,
    seed: int = 0,
    records_path: str | Path | None = None,
    max_seconds: float | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Relevance and faithfulness on the prefix-cached fine-tuned classifier (module docstring).

    Args:
        setup: the head's :class:`~influent.pipeline.HeadSetup` (corpus, split and the frozen encoder's
            embeddings for the ``embedding_nn`` reference).
        train_size: the seeded stratified training slice fine-tuned on.
        last_k, epochs, lr, max_length: the SuffixClassifier's settings (AdamW, dropout on, seeded).
        strategy: curvature of the factored influence over the trainable linear modules.
        Other arguments as :func:`head_explanation_quality`.
    """
    from influent.curvature.config import FactorConfig
    from influent.data import stratified_sample
    from influent.factored_influence import FactoredInfluence
    from influent.models.suffix_classifier import SuffixClassifier
    from influent.task import iter_chunks

    corpus = setup.corpus
    rows = np.arange(len(setup.train_idx))
    if train_size < len(rows):
        rows = rows[stratified_sample(setup.train_y.numpy(), train_size, seed)]
    train_rows = setup.train_idx[rows]
    pos = sample_queries(len(setup.test_idx), n_queries, seed)
    texts = [corpus.texts[i] for i in train_rows]
    labels = [int(corpus.labels[i]) for i in train_rows]
    q_texts = [corpus.texts[setup.test_idx[i]] for i in pos]
    clf = SuffixClassifier(None, len(corpus.label_names), last_k=last_k, seed=seed, epochs=epochs, lr=lr,
                           max_length=max_length)
    batch = clf.cache(texts, labels)
    t = time.perf_counter()
    theta, _ = clf.fit(batch)
    fit_seconds = time.perf_counter() - t
    q_batch = clf.cache(q_texts, [0] * len(q_texts))
    pred = clf.predict(theta, q_batch)
    q_batch = dict(q_batch, labels=pred)
    model = clf.load_suffix(theta)
    n = len(texts)
    chunks = [c for _, c in iter_chunks(batch, n, 64)]
    q_chunks = [c for _, c in iter_chunks(q_batch, len(q_texts), 64)]
    method = FactoredInfluence(model, clf.task, chunks, FactorConfig(strategy=strategy, modules="trainable",
                                                                   seed=seed), progress=progress)
    refs = {
        "embedding_nn": lambda: embedding_similarity(setup.train_x[torch.as_tensor(rows)],
                                                     setup.test_x[torch.as_tensor(pos)]),
        "tfidf_nn": lambda: tfidf_similarity(texts, q_texts),
    }
    panel = influence_panel(method, q_chunks, pred.numpy(), np.asarray(labels), refs)
    removal = SuffixRemoval(clf, batch, q_batch, theta)
    m = len(pos) if removal_queries is None else min(removal_queries, len(pos))
    records = removal_run(panel, removal, m, ks, reference_ks, seed, records_path, max_seconds, progress, resume)
    settings = {"classifier": f"SuffixClassifier: packaged MiniLM, last {last_k} layer(s) + pooler + head, "
                f"AdamW lr {lr}, {epochs} epochs, batch 32, dropout on, max_length {max_length}, seed {seed}",
                "train_size": n, "influence": f"{strategy} over the trainable linear modules",
                "retraining": "seeded AdamW replay from the same initialisation without the removed rows",
                "fine_tune_seconds": fit_seconds, "seed": seed, "query_positions": pos.tolist()}
    return report("finetuned", panel, records, ks, seed, settings, reference_ks)
