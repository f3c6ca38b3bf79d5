"""Which training sequences made a causal LM write this completion (Grosse et al. 2023, over the protocol).

The query is a prompt and a completion; its measurement is the completion's summed log-loss given the
prompt (:class:`~influent.models.causal_lm.CausalLMTask`). Scores come from a
:class:`~influent.factored_influence.FactoredInfluence` fitted on every training sequence: positive =
proponent (up-weighting the sequence lowers the completion's loss, i.e. makes it more likely);
``loss_change = score / n_train`` is the predicted change of that loss when the sequence is removed.

With candidates (:class:`~influent.retrieval.CandidateFilter`) only the kept sequences are scored, against
the same factors, through :func:`~influent.token_influence.token_scores` (the sum of a sequence's token
shares is its score); without, every sequence is scored by ``pairwise_scores``.
"""

from __future__ import annotations

import numpy as np
import torch

from influent.data.lm_text import LMSequence, lm_batches
from influent.errors import UserError
from influent.factored_influence import FactoredInfluence
from influent.retrieval import CandidateFilter
from influent.token_influence import token_scores


def query_loss(method: FactoredInfluence, batch: dict) -> float:
    """The query's measurement: summed NLL of its completion tokens (nats)."""
    model = method.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(method.task.query_measurement(model, batch)[0])
    finally:
        model.train(was)


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
) -> dict:
    """The ``top`` proponents of ``query``'s completion among ``sequences`` (the method's training data).

    Returns:
        ``{"query": {"prompt", "completion", "loss"}, "results": [{"id", "text", "score", "loss_change",
        "tokens"?}], "candidates": {"method", "kept", "of"}}``, results by score, highest first.
    """
    pad = int(tokenizer.pad_token_id)
    qbatch = lm_batches([query], 1, pad)[0]
    n = len(sequences)
    if candidates is not None and not 1 <= candidates <= n:
        raise UserError(f"candidates must be between 1 and the {n} training sequences, got {candidates}",
                        field="candidates")
    kept = None
    if candidates is not None and candidates_method != "all":
        ranker = candidate_filter or CandidateFilter([s.text for s in sequences])
        kept = ranker.top(query.text, candidates, candidates_method)
    if kept is None:
        scores = method.pairwise_scores([qbatch])[0].numpy()
        index = np.arange(n)
        shares = None
    else:
        index = np.sort(kept)
        shares = token_scores(method, [qbatch], lm_batches([sequences[i] for i in index], batch_size, pad))
        scores = np.array([float(s[0].sum()) for s in shares])
    order = np.lexsort((index, -scores))[: min(top, len(index))]
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
        row = {"id": seq.id, "text": seq.text, "score": score, "loss_change": score / method.n_train}
        if tokens:
            per = shares[position[i]][0]
            row["tokens"] = [{"token": tokenizer.decode([t]), "score": float(per[k])}
                             for k, t in enumerate(seq.input_ids)]
        results.append(row)
    prompt_len = next((k for k, m in enumerate(query.loss_mask) if m), len(query.input_ids))
    return {
        "query": {"prompt": tokenizer.decode(list(query.input_ids[:prompt_len]), skip_special_tokens=True),
                  "completion": tokenizer.decode(list(query.input_ids[prompt_len:]), skip_special_tokens=True),
                  "loss": query_loss(method, qbatch)},
        "results": results,
        "candidates": {"method": "all" if kept is None else candidates_method,
                       "kept": n if kept is None else len(kept), "of": n},
    }


def format_trace(result: dict, highlight: int = 3) -> str:
    """Plain-text rendering; with token scores, the ``highlight`` most influential tokens are [[bracketed]]."""
    q = result["query"]
    c = result["candidates"]
    lines = [f"prompt: {q['prompt']!r}", f"completion: {q['completion']!r} (loss {q['loss']:.3f} nats)",
             f"candidates: {c['kept']} of {c['of']} ({c['method']})",
             "top proponents (score; predicted loss change if removed):"]
    for rank, row in enumerate(result["results"], 1):
        text = row["text"]
        if "tokens" in row:
            toks = row["tokens"]
            best = set(sorted(range(len(toks)), key=lambda k: -toks[k]["score"])[:highlight])
            text = "".join(f"[[{t['token']}]]" if k in best else t["token"] for k, t in enumerate(toks))
        lines.append(f"{rank:3d}. {row['score']:+.4g} ({row['loss_change']:+.3g})  {text}")
    return "\n".join(lines)
