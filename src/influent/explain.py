"""Explanations of predictions: the most influential training examples for a query.

A consumer of the engine: it turns a ``[Q, n]`` score matrix into ranked, labelled, JSON-ready records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Query:
    """A text to explain, its features and the label whose loss is explained.

    Attributes:
        text: the review.
        features: its embedding ``[d]`` (float64), or None for models that take text directly.
        label: the class index whose loss the scores refer to (default: the model's prediction).
        true_label: the gold label when known (a test example), else None.
    """

    text: str
    features: torch.Tensor | None
    label: int | None = None
    true_label: int | None = None


def rank_influential(
    scores: torch.Tensor,
    n_train: int,
    ids: list[str],
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    top: int,
) -> dict[str, list[dict]]:
    """Top-``top`` proponents (largest positive score) and opponents (most negative) of one query.

    Args:
        scores: ``[n]`` scores of every training example for the query (positive = proponent).
        n_train: training-set size, for ``loss_change = score / n``.
        ids, texts, labels: the training examples, aligned with ``scores``.
        label_names: names of the label indices.
        top: how many of each to return.
    """
    top = min(top, len(scores))
    order = torch.argsort(scores, descending=True)

    def record(i: int) -> dict:
        s = float(scores[i])
        return {
            "id": ids[i],
            "text": texts[i],
            "label": label_names[labels[i]],
            "score": s,
            "loss_change": s / n_train,
        }

    proponents = [record(int(i)) for i in order[:top] if scores[i] > 0]
    opponents = [record(int(i)) for i in order.flip(0)[:top] if scores[i] < 0]
    return {"proponents": proponents, "opponents": opponents}


def format_explanation(result: dict, width: int = 100) -> str:
    """Human-readable text of one explanation produced by the CLI (query, proponents, opponents)."""
    q = result["query"]
    lines = [f"Query: {_clip(q['text'], width)}"]
    gold = f" (true label: {q['true_label']})" if q.get("true_label") is not None else ""
    lines.append(f"Prediction: {q['prediction']} with probability {q['probability']:.3f}{gold}")
    lines.append(f"Scores explain the loss of label '{q['explained_label']}'; loss_change = score / n "
                 "(predicted change of that loss if the example were removed).")
    for kind, title in (("proponents", "Proponents (helped this prediction)"),
                        ("opponents", "Opponents (pushed against it)")):
        lines.append(f"\n{title}:")
        if not result[kind]:
            lines.append("  (none)")
        for rank, r in enumerate(result[kind], 1):
            lines.append(f"  {rank:2d}. [{r['label']}] score={r['score']:+.4g} loss_change={r['loss_change']:+.3g}  "
                         f"{_clip(r['text'], width)}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def explain_head(setup, queries: list[Query], top: int = 5, solver: str = "exact", damping: float = 0.0) -> list[dict]:
    """Explain each query's prediction by the frozen-encoder head (one solve for all queries).

    Args:
        setup: a :class:`~influent.pipeline.HeadSetup`.
        queries: texts with features; a query's ``label`` (default: the prediction) picks the loss explained.
        top: proponents and opponents returned per query.
        solver: ``exact``, ``cg`` or ``lissa``.
        damping: added to the Hessian's diagonal.
    """
    names = setup.corpus.label_names
    x = torch.stack([q.features for q in queries]).double()
    probs = setup.model.probabilities(x).detach()
    pred = probs.argmax(1)
    explained = torch.tensor([q.label if q.label is not None else int(p) for q, p in zip(queries, pred)])
    engine = setup.engine(solver=solver, damping=damping)
    scores = engine.pairwise_scores((x, explained))
    ids = [setup.corpus.ids[i] for i in setup.train_idx]
    texts = [setup.corpus.texts[i] for i in setup.train_idx]
    labels = setup.train_y.tolist()
    out = []
    for k, q in enumerate(queries):
        ranked = rank_influential(scores[k], engine.n, ids, texts, labels, names, top)
        out.append({
            "query": {
                "text": q.text,
                "prediction": names[int(pred[k])],
                "probability": float(probs[k, pred[k]]),
                "explained_label": names[int(explained[k])],
                "true_label": names[q.true_label] if q.true_label is not None else None,
            },
            **ranked,
            "solver": {"method": solver, "residual": engine.last_solution.residual,
                       "iterations": engine.last_solution.iterations},
        })
    return out


def explain_finetuned(
    setup,
    queries: list[Query],
    top: int = 5,
    *,
    strategy: str = "ekfac",
    modules: str = "trainable",
    fisher: str = "empirical",
    damping: float | None = None,
    query_rank: int | None = None,
    seed: int = 0,
    train_cache: bool = False,
    train_cache_max_bytes: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Explain predictions of the fine-tuned classifier with factored curvature (fitted once, cached).

    Args:
        setup: a :class:`~influent.pipeline.FinetunedSetup`.
        queries: texts; a query's ``label`` (default: the prediction) picks the loss explained.
        strategy: ``ekfac``, ``kfac``, ``diagonal`` or ``identity``.
        modules: tracked ``nn.Linear`` modules: ``trainable``, ``all``, ``mlp`` or a name regex.
        fisher: ``empirical`` or ``true`` (labels sampled from the model).
        damping: absolute damping, or None for 0.1 x the mean eigenvalue per module.
        query_rank: optional low-rank compression of preconditioned query gradients.
        train_cache: keep the training token factors beside the model (:mod:`influent.curvature.token_cache`)
            so later calls skip the training passes; ``train_cache_max_bytes`` caps its size (None: 16 GiB).
    """
    from influent.curvature.ekfac import FactorConfig
    from influent.curvature.token_cache import DEFAULT_MAX_BYTES
    from influent.factored_influence import explain as factored_explain
    from influent.models.finetuned import FinetunedTask

    task = FinetunedTask()
    names = setup.corpus.label_names
    texts = [q.text for q in queries]
    with torch.no_grad():
        logits = torch.cat([task.model_output(setup.model, b) for b in setup.text_batches(texts, [0] * len(texts))])
    probs = logits.double().softmax(-1)
    pred = probs.argmax(1)
    explained = [q.label if q.label is not None else int(p) for q, p in zip(queries, pred)]
    config = FactorConfig(strategy=strategy, modules=modules, fisher=fisher, damping=damping, seed=seed)
    scores, _ = factored_explain(
        setup.model, task, setup.batches(setup.train_idx), setup.text_batches(texts, explained), config,
        cache_dir=setup.folder, query_rank=query_rank, progress=progress, train_cache=train_cache,
        train_cache_max_bytes=train_cache_max_bytes or DEFAULT_MAX_BYTES,
    )
    ids = [setup.corpus.ids[i] for i in setup.train_idx]
    train_texts = [setup.corpus.texts[i] for i in setup.train_idx]
    labels = [int(setup.corpus.labels[i]) for i in setup.train_idx]
    out = []
    for k, q in enumerate(queries):
        out.append({
            "query": {
                "text": q.text,
                "prediction": names[int(pred[k])],
                "probability": float(probs[k, pred[k]]),
                "explained_label": names[explained[k]],
                "true_label": names[q.true_label] if q.true_label is not None else None,
            },
            **rank_influential(scores[k], len(ids), ids, train_texts, labels, names, top),
            "curvature": {"strategy": strategy, "modules": modules, "fisher": fisher, "damping": damping},
        })
    return out
