"""Explanations answered from a gradient index: the records of :func:`influent.explain.explain`, top-k only.

The query side is the same :class:`~influent.explain.ExplainedModel` (probabilities, query batches); the
scores come from :meth:`GradientIndex.top_k` (streaming, the ``[Q, n]`` matrix never held) and, with
``rerank``, from the unprojected factored engine on the index's ``rerank`` best candidates per side.
The rankings of :mod:`influent.rankings` in the projected space: ``influence`` the score
``<precondition(q'), G'_j>``, ``relatif`` the score over ``sqrt`` of the example's self-influence (stored at
build time), ``cosine`` that over ``sqrt`` of the query's self-influence too.
``loss_change = score / n`` as everywhere.
"""

from __future__ import annotations

import time

from torch import nn

from influent.errors import UserError
from influent.explain import RANKINGS, ExplainedModel, Query
from influent.index.query import GradientIndex, TopK
from influent.index.query import rerank as rerank_top
from influent.rankings import inverse_norm
from influent.task import Task


def ranked_top_k(index: GradientIndex, model: nn.Module, task: Task, batches: list, k: int,
                 rank: str = "influence") -> TopK:
    """The index's top ``k`` per side under ``rank`` (``influence``, ``relatif`` or ``cosine``): one backward
    pass per query batch, one streaming product; values as :mod:`influent.rankings` defines them."""
    raw = index.projected_queries(model, task, batches)
    vectors = index.precondition(raw)
    weights = None if rank == "influence" else inverse_norm(index.self_influence())
    found = index.top_k(vectors, k, weights)
    if rank == "cosine":
        scale = inverse_norm((vectors * raw.double()).sum(1))[:, None]  # 1 / sqrt(query self-influence)
        found = TopK(found.proponent_rows, found.proponent_scores, found.opponent_rows, found.opponent_scores,
                     found.proponent_values * scale, found.opponent_values * scale)
    return found


def explain_with_index(
    index: GradientIndex,
    model_side: ExplainedModel,
    model: nn.Module,
    task: Task,
    queries: list[Query],
    top: int = 5,
    rank: str = "influence",
    rerank: int | None = None,
    method=None,
) -> list[dict]:
    """Each query's top proponents and opponents from the index (records as :func:`influent.explain.explain`).

    Args:
        index: the gradient index of the model's training examples (in ``model_side.train_idx`` order).
        model_side: probabilities and query batches of the queries.
        model, task: the indexed model and its task (``query_measurement`` is differentiated).
        queries: texts; a query's ``label`` (default: the prediction) picks the loss explained.
        top: proponents and opponents per query.
        rank: an ordering of :data:`influent.explain.RANKINGS` (``influence``, ``relatif``, ``cosine``).
        rerank: rescore this many index candidates per side with ``method`` (None: no rerank).
        method: a :class:`~influent.factored_influence.FactoredInfluence` over the same training data.

    Returns:
        one dict per query: ``ranking``, ``query``, ``proponents``, ``opponents`` (id, text, label, score,
        loss_change, rank_value) and ``index`` (folder, rank, strategy, bytes per example, rerank, seconds).
    """
    if rank not in RANKINGS:
        raise UserError(f"rank: expected one of {', '.join(RANKINGS)}, got {rank!r}", field="rank")
    if rerank is not None and (rerank < top or method is None):
        raise UserError(f"rerank must be >= top ({top}) and needs the factored engine", field="rerank")
    names = model_side.corpus.label_names
    probs = model_side.probabilities(queries)
    pred = probs.argmax(1)
    explained = [q.label if q.label is not None else int(p) for q, p in zip(queries, pred)]
    batches = model_side.query_batches(queries, explained)
    batches = batches if isinstance(batches, list) else [batches]
    started = time.perf_counter()
    found = ranked_top_k(index, model, task, batches, rerank or top, rank)
    if rerank is not None:
        found = rerank_top(found, method, batches, depth=top, rank=rank)
    seconds = time.perf_counter() - started
    train = [int(i) for i in model_side.train_idx]
    config = index.manifest["config"]
    block = {"index": {"folder": str(index.folder), "rank": config["rank"], "strategy": config["strategy"],
                       "projection": config["projection"], "bytes_per_example": index.bytes_per_example,
                       "rerank": rerank, "seconds": seconds}}
    out = []
    for k, q in enumerate(queries):
        out.append({
            "ranking": rank,
            "query": {"text": q.text, "prediction": names[int(pred[k])], "probability": float(probs[k, pred[k]]),
                      "explained_label": names[explained[k]],
                      "true_label": names[q.true_label] if q.true_label is not None else None},
            **_records(found, k, top, model_side, train, index.n),
            **block,
        })
    return out


def _records(found: TopK, k: int, top: int, model_side, train: list[int], n: int) -> dict:
    corpus = model_side.corpus

    def record(row: int, score: float, value: float) -> dict:
        i = train[row]
        return {"id": corpus.ids[i], "text": corpus.texts[i], "label": corpus.label_names[int(corpus.labels[i])],
                "score": score, "loss_change": score / n, "rank_value": value}

    def side(rows, scores, values, sign: int) -> list[dict]:
        return [record(int(r), float(s), float(v)) for r, s, v in zip(rows[k][:top], scores[k][:top], values[k][:top])
                if sign * v > 0]

    return {"proponents": side(found.proponent_rows, found.proponent_scores, found.proponent_values, 1),
            "opponents": side(found.opponent_rows, found.opponent_scores, found.opponent_values, -1)}


__all__ = ["explain_with_index", "ranked_top_k"]
