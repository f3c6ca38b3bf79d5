"""Explanations of predictions: the most influential training examples for a query.

A consumer of the influence protocol, written once for every model kind: :func:`explain` takes an
:class:`~influent.influence.InfluenceMethod` (which gives the scores and ``loss_change``) and the model's
query side (:class:`ExplainedModel`: each query's probabilities and its query batch; implemented by
:class:`~influent.pipeline.HeadSetup` and :class:`~influent.pipeline.FinetunedSetup`) and turns the
``[Q, n]`` score matrix into ranked, labelled, JSON-ready records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from influent.data import Corpus
from influent.errors import UserError
from influent.influence import InfluenceMethod, Queries
from influent.rankings import RANKINGS


@dataclass
class Query:
    """A text to explain, its features and the label whose loss is explained.

    Attributes:
        text: the review.
        features: its embedding ``[d]`` (float64), or None (models that take text directly, or a head
            that embeds the text itself).
        label: the class index whose loss the scores refer to (default: the model's prediction).
        true_label: the gold label when known (a test example), else None.
    """

    text: str
    features: torch.Tensor | None
    label: int | None = None
    true_label: int | None = None


class ExplainedModel(Protocol):
    """The model side of an explanation: what the queries are predicted as and how they are batched.

    Attributes:
        corpus: label names, ids, texts and labels of every example; ``train_idx`` indexes the training
            examples, in the order of the influence method's training data.
    """

    corpus: Corpus
    train_idx: Sequence[int]

    def probabilities(self, queries: list[Query]) -> torch.Tensor:
        """Class probabilities ``[Q, K]`` (float64) of each query."""

    def query_batches(self, queries: list[Query], labels: list[int]) -> Queries:
        """The queries as the influence method's query data, each with the label whose loss is explained."""


DEFAULT_RANKINGS: dict[str, str] = {"head": "relatif", "finetuned": "influence"}
"""Per model kind, the ranking :func:`explain` should use, chosen by the rule of
:func:`influent.evaluation.explanations.choose_default` on that kind's table under
benchmarks/results/explain-quality/ (README, "Which ranking"): among the rankings whose top-10 proponents share
the predicted class at least 95% of the time, the one whose top-10 removal raises the query loss the most.
``"both"`` for a kind whose table has no passing ranking: show :data:`SIDE_BY_SIDE` instead. Head: raw
influence fails (0.75), RelatIF and cosine pass (0.98) and order each query's examples identically. Fine-tuned
classifier: all three pass (>= 0.998); raw influence's top-10 removal moves the query loss most (0.125 nats
against 0.120 for RelatIF on 100 queries; paired difference +0.005, interval [0.0003, 0.009])."""

SIDE_BY_SIDE: dict[str, tuple[str, str]] = {"head": ("relatif", "influence"), "finetuned": ("relatif", "influence")}
"""Per model kind, (the most relevant ranking, the most faithful ranking) on its table: the two lists shown
side by side (the CLI's ``both`` ranking, and by default where no ranking passes)."""

DEFAULT_RANKING = DEFAULT_RANKINGS["head"]
"""The library's default for :func:`explain` (the head's)."""

SETTINGS_BLOCKS = {
    "exact": ("solver", {"method": "solver", "residual": "residual", "iterations": "iterations",
                         "converged": "converged"}),
    "factored": ("curvature", {"strategy": "strategy", "modules": "modules", "fisher": "fisher", "damping": "damping"}),
}
"""Per method kind (``describe()['method']``): the JSON block name and its keys -> ``describe()`` keys."""


def explain(
    method: InfluenceMethod,
    model: ExplainedModel,
    queries: list[Query],
    top: int = 5,
    rank: str = DEFAULT_RANKING,
) -> list[dict]:
    """Explain each query's prediction by its top proponents and opponents among the training examples.

    Args:
        method: the influence method over the model's training set (fitted here if needed).
        model: the query side (:class:`ExplainedModel`), e.g. a :class:`~influent.pipeline.HeadSetup`.
        queries: texts; a query's ``label`` (default: the prediction) picks the loss explained.
        top: proponents and opponents returned per query.
        rank: the ordering, a name of :data:`influent.rankings.RANKINGS`: ``influence`` (the raw score),
            ``relatif`` (score / sqrt(self-influence of the training example)) or ``cosine`` (score over
            the product of the training example's and the query's ``C^-1``-norms).

    Proponents are the ``top`` training examples with the largest ranking value among those with a positive
    score; opponents the ``top`` with the most negative value among those with a negative score (every
    ranking keeps the score's sign, so the two lists are the same examples' signs under any ranking).

    Returns:
        one dict per query: ``ranking`` (the name used), ``query`` (text, prediction, probability,
        explained_label, true_label), ``proponents`` / ``opponents`` (id, text, label, ``score`` = the raw
        influence, ``loss_change`` = score / n in the query loss's units, ``rank_value`` = the ranking's
        value) and the method's settings block (``solver`` for exact methods, ``curvature`` for factored ones).
    """
    return [by_rank[rank] for by_rank in explain_rankings(method, model, queries, (rank,), top)]


def explain_rankings(
    method: InfluenceMethod, model: ExplainedModel, queries: list[Query], ranks: Sequence[str], top: int = 5
) -> list[dict[str, dict]]:
    """:func:`explain` under several rankings from one scoring pass: per query, ranking name -> its result."""
    for rank in ranks:
        if rank not in RANKINGS:
            raise UserError(f"unknown ranking {rank!r}; choose {', '.join(RANKINGS)}", field="rank")
    names = model.corpus.label_names
    probs = model.probabilities(queries)
    pred = probs.argmax(1)
    explained = [q.label if q.label is not None else int(p) for q, p in zip(queries, pred)]
    batches = model.query_batches(queries, explained)
    scores = method.pairwise_scores(batches)
    values = {rank: RANKINGS[rank](method, scores, batches) for rank in ranks}
    changes = method.loss_change(scores)
    train = [int(i) for i in model.train_idx]
    examples = (
        [model.corpus.ids[i] for i in train],
        [model.corpus.texts[i] for i in train],
        [int(model.corpus.labels[i]) for i in train],
    )
    block = settings_block(method.describe())
    out = []
    for k, q in enumerate(queries):
        query = {
            "text": q.text,
            "prediction": names[int(pred[k])],
            "probability": float(probs[k, pred[k]]),
            "explained_label": names[explained[k]],
            "true_label": names[q.true_label] if q.true_label is not None else None,
        }
        out.append({rank: {"ranking": rank, "query": query,
                           **rank_influential(values[rank][k], scores[k], changes[k], *examples, names, top),
                           **block} for rank in ranks})
    return out


def settings_block(description: dict) -> dict:
    """The method's settings as the explanation's JSON block (:data:`SETTINGS_BLOCKS`)."""
    name, keys = SETTINGS_BLOCKS[description["method"]]
    return {name: {out: description.get(key) for out, key in keys.items()}}


def rank_influential(
    values: torch.Tensor,
    scores: torch.Tensor,
    loss_change: torch.Tensor,
    ids: list[str],
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    top: int,
) -> dict[str, list[dict]]:
    """Top-``top`` proponents (largest positive ``values``) and opponents (most negative) of one query; each
    record has the raw ``score``, its ``loss_change`` and the ranking's ``rank_value``.

    Args:
        values: ``[n]`` the ranking's value of every training example (same sign as its score).
        scores: ``[n]`` influence scores (positive = proponent); loss_change: ``[n]`` ``score / n``.
        ids, texts, labels: the training examples, aligned with ``scores``.
        label_names: names of the label indices.
        top: how many of each to return.
    """
    top = min(top, len(values))
    order = torch.argsort(values, descending=True)

    def record(i: int) -> dict:
        return {
            "id": ids[i],
            "text": texts[i],
            "label": label_names[labels[i]],
            "score": float(scores[i]),
            "loss_change": float(loss_change[i]),
            "rank_value": float(values[i]),
        }

    proponents = [record(int(i)) for i in order[:top] if values[i] > 0]
    opponents = [record(int(i)) for i in order.flip(0)[:top] if values[i] < 0]
    return {"proponents": proponents, "opponents": opponents}


def format_explanation(result: dict, width: int = 100) -> str:
    """Human-readable text of one explanation produced by the CLI (query, proponents, opponents)."""
    q = result["query"]
    lines = [f"Query: {_clip(q['text'], width)}"]
    gold = f" (true label: {q['true_label']})" if q.get("true_label") is not None else ""
    lines.append(f"Prediction: {q['prediction']} with probability {q['probability']:.3f}{gold}")
    lines.append(f"Scores explain the loss of label '{q['explained_label']}'; loss_change = score / n "
                 "(predicted change of that loss if the example were removed).")
    ranking = result.get("ranking", "influence")
    if ranking != "influence":
        lines.append(f"Ranked by {ranking} (rank_value); score and loss_change are the raw influence.")
    for kind, title in (("proponents", "Proponents (helped this prediction)"),
                        ("opponents", "Opponents (pushed against it)")):
        lines.append(f"\n{title}:")
        if not result[kind]:
            lines.append("  (none)")
        for rank, r in enumerate(result[kind], 1):
            value = f" {ranking}={r['rank_value']:+.3g}" if ranking != "influence" else ""
            lines.append(f"  {rank:2d}. [{r['label']}]{value} score={r['score']:+.4g} "
                         f"loss_change={r['loss_change']:+.3g}  {_clip(r['text'], width)}")
    return "\n".join(lines)


def format_side_by_side(left: dict, right: dict, note: str, width: int = 140) -> str:
    """Two explanations of the same query (e.g. the most relevant and the most faithful ranking) as two
    text columns, proponents then opponents; ``note`` says why both are shown. Each row: position, label,
    the ranking's value (the raw ``score`` for ``influence``) and the clipped text; ``*`` marks an example
    that is in both columns."""
    q = left["query"]
    gold = f" (true label: {q['true_label']})" if q.get("true_label") is not None else ""
    lines = [f"Query: {_clip(q['text'], width)}",
             f"Prediction: {q['prediction']} with probability {q['probability']:.3f}{gold}",
             f"Scores explain the loss of label '{q['explained_label']}'.", note,
             "Rows marked * are in both lists; score is the raw influence (loss_change = score / n)."]
    col = (width - 3) // 2
    titles = [f"{r['ranking']}" + (" (raw influence)" if r["ranking"] == "influence" else "") for r in (left, right)]
    for kind, title in (("proponents", "Proponents (helped this prediction)"),
                        ("opponents", "Opponents (pushed against it)")):
        shared = {r["id"] for r in left[kind]} & {r["id"] for r in right[kind]}
        columns = [[_clip(t, col), *([_side_row(i, r, side["ranking"], r["id"] in shared, col)
                                      for i, r in enumerate(side[kind], 1)] or ["  (none)"])]
                   for t, side in zip(titles, (left, right))]
        lines.append(f"\n{title}:")
        rows = max(len(c) for c in columns)
        for i in range(rows):
            a, b = (c[i] if i < len(c) else "" for c in columns)
            lines.append(f"{a:<{col}} | {b}".rstrip())
    return "\n".join(lines)


def _side_row(position: int, record: dict, ranking: str, shared: bool, width: int) -> str:
    value = f"score={record['score']:+.3g}" if ranking == "influence" else f"{ranking}={record['rank_value']:+.3g}"
    head = f"{position:2d}.{'*' if shared else ' '}[{record['label']}] {value} "
    return head + _clip(record["text"], max(width - len(head), 1))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
