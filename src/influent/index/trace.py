"""Tracing a language model's completion from a gradient index: the result of :func:`influent.trace.trace`,
answered by one backward pass on the query and one product with the index.

The query's measurement is ``task.query_measurement`` (the completion's summed log-loss, or minus its
summed margin: :class:`~influent.models.causal_lm.CausalLMTask`); the index's ``top_k`` streams the shards
(the ``[1, n]`` row is never held whole when n is large) under a ranking of :mod:`influent.rankings`
(:func:`~influent.index.explain.ranked_top_k`) and, with ``rerank``, the ``rerank`` best candidates are
rescored by the unprojected factored engine (exact values, re-sorted). Positive = proponent;
``loss_change = score / n``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from influent.data.lm_text import LMSequence, lm_batches
from influent.errors import UserError
from influent.index.explain import ranked_top_k
from influent.index.query import GradientIndex
from influent.index.query import rerank as rerank_top
from influent.task import Task


def query_values(model: nn.Module, task: Task, batch: dict) -> tuple[float, float]:
    """``(loss, measurement)`` of the query without gradients: its completion's summed NLL and the task's
    measurement (nats)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(task.per_example_loss(model, batch)[0]), float(task.query_measurement(model, batch)[0])
    finally:
        model.train(was)


def trace_with_index(
    index: GradientIndex,
    model: nn.Module,
    task: Task,
    sequences: list[LMSequence],
    query: LMSequence,
    tokenizer,
    *,
    top: int = 10,
    rerank: int | None = None,
    method=None,
    rank: str = "influence",
) -> dict:
    """The ``top`` proponents of ``query``'s completion among the indexed ``sequences`` (index row order).

    Args:
        index: the index of ``sequences`` through ``model`` (``influent index build --model lm``).
        model, task: the indexed causal LM and its task.
        sequences: the training sequences, in the order they were indexed.
        query: the prompt + completion sequence (its ``loss_mask`` marks the completion).
        tokenizer: decodes the prompt and completion.
        top: proponents listed (highest score first).
        rerank: rescore this many index candidates with ``method`` (>= ``top``; None: no rerank).
        method: a :class:`~influent.factored_influence.FactoredInfluence` over ``sequences``' batches (with
            the same measurement as ``task``).
        rank: ``influence``, ``relatif`` or ``cosine`` (:mod:`influent.rankings`; the stored self-influence).

    Returns:
        the keys of :func:`influent.trace.trace` (``query`` with loss, measurement and its value, ``ranking``,
        ``results`` with id, text, score, loss_change, rank_value; ``candidates``) and ``index`` (folder, rank, strategy, projection, bytes per example, rerank, seconds).

    Raises:
        UserError: the index holds another number of sequences; ``rerank`` below ``top`` or without ``method``.
    """
    n = len(sequences)
    if index.n != n:
        raise UserError(f"the index holds {index.n} sequences, the training data {n}: build it for this data",
                        field="index")
    if rerank is not None and (rerank < top or method is None):
        raise UserError(f"rerank must be >= top ({top}) and needs the factored engine", field="rerank")
    qbatch = lm_batches([query], 1, int(tokenizer.pad_token_id))[0]
    started = time.perf_counter()
    found = ranked_top_k(index, model, task, [qbatch], min(rerank or top, n), rank)
    if rerank is not None:
        found = rerank_top(found, method, [qbatch], depth=min(top, n), rank=rank)
    seconds = time.perf_counter() - started
    results = []
    for row, score, value in zip(found.proponent_rows[0][:top].tolist(), found.proponent_scores[0][:top].tolist(),
                                 found.proponent_values[0][:top].tolist()):
        seq = sequences[row]
        results.append({"id": seq.id, "text": seq.text, "score": score, "loss_change": score / n, "rank_value": value})
    loss, value = query_values(model, task, qbatch)
    prompt_len = next((k for k, m in enumerate(query.loss_mask) if m), len(query.input_ids))
    config = index.manifest["config"]
    return {
        "query": {"prompt": tokenizer.decode(list(query.input_ids[:prompt_len]), skip_special_tokens=True),
                  "completion": tokenizer.decode(list(query.input_ids[prompt_len:]), skip_special_tokens=True),
                  "loss": loss, "measurement": getattr(task, "measurement", "loss"), "measurement_value": value},
        "ranking": rank,
        "results": results,
        "candidates": {"method": "index", "kept": n, "of": n},
        "index": {"folder": str(index.folder), "rank": config["rank"], "strategy": config["strategy"],
                  "projection": config["projection"], "bytes_per_example": index.bytes_per_example,
                  "rerank": rerank, "seconds": seconds},
    }


__all__ = ["trace_with_index"]
