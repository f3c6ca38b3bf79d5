"""Which training sequences made a causal LM write this completion (Grosse et al. 2023, over the protocol).

The query is a prompt and a completion; its measurement ``f`` is the completion's summed log-loss given the
prompt, or minus its summed margin (:class:`~influent.models.causal_lm.CausalLMTask`, ``measurement``).
Scores come from a :class:`~influent.factored_influence.FactoredInfluence` (factors fitted on every training
sequence or a seeded sample of them): ``score = g_f^T C^-1 g_i``, positive = proponent (up-weighting the
sequence lowers ``f``, i.e. makes the completion more likely); ``loss_change = score / n_train`` is the
predicted change of ``f`` (nats) when the sequence is removed.

With candidates (:class:`~influent.retrieval.CandidateFilter`) only the kept sequences are scored, against
the same factors, through :func:`~influent.token_influence.token_scores` (the sum of a sequence's token
shares is its score); without, every sequence is scored by ``pairwise_scores``. The results are ordered by
a ranking of :mod:`influent.rankings` (``influence``, ``relatif`` or ``cosine``, :func:`ranking_values`).
"""

from __future__ import annotations

import numpy as np
import torch

from influent.data.lm_text import LMSequence, lm_batches
from influent.errors import UserError
from influent.factored_influence import FactoredInfluence, self_scores
from influent.rankings import RANKINGS, inverse_norm
from influent.retrieval import CandidateFilter
from influent.token_influence import token_scores


def query_values(method: FactoredInfluence, batch: dict) -> tuple[float, float]:
    """``(loss, measurement)`` of the query: its completion's summed NLL and the task's measurement (nats)."""
    model = method.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = float(method.task.per_example_loss(model, batch)[0])
            return loss, float(method.task.query_measurement(model, batch)[0])
    finally:
        model.train(was)


def ranking_values(method: FactoredInfluence, rank: str, scores: np.ndarray, qbatch: dict,
                   batches: list | None = None) -> np.ndarray:
    """The ``rank`` ordering's value of each scored sequence (:mod:`influent.rankings`; same sign as the score).

    ``influence``: the score; ``relatif``: ``score / sqrt(g_i^T C^-1 g_i)``; ``cosine``: that divided by
    ``sqrt(g_q^T C^-1 g_q)`` as well. The self-influences are those of ``batches`` (the scored subset, in
    order) or, with None, of every training sequence (``method.self_scores()``).
    """
    if rank not in RANKINGS:
        raise UserError(f"unknown ranking {rank!r}; choose {', '.join(RANKINGS)}", field="rank")
    if rank == "influence":
        return scores
    own = method.self_scores() if batches is None else self_scores(
        method.model, method.task, method.factors, batches, progress=method.progress)
    values = torch.as_tensor(scores, dtype=torch.float64) * inverse_norm(own)
    if rank == "cosine":
        values = values * inverse_norm(method.query_self_scores([qbatch]))[0]
    return values.numpy()


def candidate_index(sequences: list[LMSequence], query: LMSequence, candidates: int | None, method: str,
                    candidate_filter: CandidateFilter | None) -> np.ndarray | None:
    """Sorted positions of the kept candidates, or None when every sequence is scored."""
    n = len(sequences)
    if candidates is not None and not 1 <= candidates <= n:
        raise UserError(f"candidates must be between 1 and the {n} training sequences, got {candidates}",
                        field="candidates")
    if candidates is None or method == "all":
        return None
    ranker = candidate_filter or CandidateFilter([s.text for s in sequences])
    return np.sort(ranker.top(query.text, candidates, method))


def trace(
    method: FactoredInfluence,
    sequences: list[LMSequence],
    query: LMSequence,
    tokenizer,
    *,
    top: int = 10,
    tokens: bool = False,
    candidates: int | None = None,
    candidates_method: str = "tfidf",
    candidate_filter: CandidateFilter | None = None,
    batch_size: int = 8,
    rank: str = "influence",
) -> dict:
    """The ``top`` proponents of ``query``'s completion among ``sequences`` (the method's training data).

    Returns:
        ``{"query": {"prompt", "completion", "loss", "measurement", "measurement_value"}, "ranking",
        "results": [{"id", "text", "score", "loss_change", "rank_value", "tokens"?}],
        "candidates": {"method", "kept", "of"}}``, results by ``rank_value`` (the ``rank`` ordering's value,
        :func:`ranking_values`), highest first; ``score`` and ``loss_change`` are the raw influence.
    """
    pad = int(tokenizer.pad_token_id)
    qbatch = lm_batches([query], 1, pad)[0]
    n = len(sequences)
    kept = candidate_index(sequences, query, candidates, candidates_method, candidate_filter)
    if kept is None:
        scores = method.pairwise_scores([qbatch])[0].numpy()
        index, shares, kept_batches = np.arange(n), None, None
    else:
        index = kept
        kept_batches = lm_batches([sequences[i] for i in index], batch_size, pad)
        shares = token_scores(method, [qbatch], kept_batches)
        scores = np.array([float(s[0].sum()) for s in shares])
    values = ranking_values(method, rank, scores, qbatch, kept_batches)
    order = np.lexsort((index, -values))[: min(top, len(index))]
    chosen = [int(index[j]) for j in order]
    if tokens and shares is None:
        shares = token_scores(method, [qbatch], lm_batches([sequences[i] for i in chosen], batch_size, pad))
        position = {i: k for k, i in enumerate(chosen)}
    elif shares is not None:
        position = {int(i): k for k, i in enumerate(index)}
    results = []
    for j in order:
        i = int(index[j])
        seq, score = sequences[i], float(scores[j])
        row = {"id": seq.id, "text": seq.text, "score": score, "loss_change": score / method.n_train,
               "rank_value": float(values[j])}
        if tokens:
            per = shares[position[i]][0]
            row["tokens"] = [{"token": tokenizer.decode([t]), "score": float(per[k])}
                             for k, t in enumerate(seq.input_ids)]
        results.append(row)
    prompt_len = next((k for k, m in enumerate(query.loss_mask) if m), len(query.input_ids))
    loss, value = query_values(method, qbatch)
    return {
        "query": {"prompt": tokenizer.decode(list(query.input_ids[:prompt_len]), skip_special_tokens=True),
                  "completion": tokenizer.decode(list(query.input_ids[prompt_len:]), skip_special_tokens=True),
                  "loss": loss, "measurement": getattr(method.task, "measurement", "loss"),
                  "measurement_value": value},
        "ranking": rank,
        "results": results,
        "candidates": {"method": "all" if kept is None else candidates_method,
                       "kept": n if kept is None else len(kept), "of": n},
    }


def format_trace(result: dict, highlight: int = 3) -> str:
    """Plain-text rendering; with token scores, the ``highlight`` most influential tokens are [[bracketed]]."""
    q = result["query"]
    c = result["candidates"]
    measured = "" if q.get("measurement", "loss") == "loss" else f"; margin measurement {q['measurement_value']:.3f}"
    ranking = result.get("ranking", "influence")
    lines = [f"prompt: {q['prompt']!r}", f"completion: {q['completion']!r} (loss {q['loss']:.3f} nats{measured})",
             f"candidates: {c['kept']} of {c['of']} ({c['method']})",
             "top proponents (score; predicted loss change if removed):" if ranking == "influence" else
             f"top by {ranking} ({ranking} value; score; predicted loss change if removed):"]
    for rank, row in enumerate(result["results"], 1):
        text = row["text"]
        if "tokens" in row:
            toks = row["tokens"]
            best = set(sorted(range(len(toks)), key=lambda k: -toks[k]["score"])[:highlight])
            text = "".join(f"[[{t['token']}]]" if k in best else t["token"] for k, t in enumerate(toks))
        value = "" if ranking == "influence" else f"{row['rank_value']:+.3g}; "
        lines.append(f"{rank:3d}. {value}{row['score']:+.4g} ({row['loss_change']:+.3g})  {text}")
    return "\n".join(lines)
