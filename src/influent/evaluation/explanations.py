"""How good are explanations? Relevance and faithfulness of each ranking of the training examples.

For a panel of held-out queries (each explained at its predicted label) and each ranking (the influence
rankings of :mod:`influent.rankings`, the model-free nearest-neighbour references, and ``random`` for the
removal baseline):

* **relevance** (Hanawa et al., ICLR 2021, the identical-class test): ``top1_same_class`` = share of queries
  whose top-1 proponent's training label is the query's predicted class; ``top10_same_class`` = the same
  share over each query's top 10 proponents (averaged per query); ``distinct_top10`` = how many distinct
  training examples appear across all queries' top-10 lists (a ranking that shows the same outliers to
  everyone scores low);
* **faithfulness**: for k in ``ks``, remove the query's top-k proponents, retrain (:class:`HeadRemoval`:
  Newton warm start from the optimum, exact; :class:`SuffixRemoval`: seeded AdamW replay of the prefix-cached
  fine-tune, the same seed and order minus the removed rows) and record ``loss_change`` = retrained minus
  original loss of the query at its predicted label (nats; positive = the removed examples were helping the
  prediction) and ``flipped`` = share of queries whose predicted class changes;
* **seconds per query**: time to compute the ranking over the panel, divided by the number of queries
  (one-off costs such as the training self-influences amortised over the panel; retraining excluded).

Proponents are the top of the ranking among positive values (influence rankings: positive score); the
similarity references take the k most similar; ``random`` draws k training examples per query (seeded).
Every figure has a mean and a 95% percentile-bootstrap interval over the queries (``distinct_top10`` is a
count over the panel, without interval). Consumers talk to the influence protocol only; retraining is the
models' own code (:func:`influent.models.refit.fit_head`, :class:`~influent.models.suffix_classifier.SuffixClassifier`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from influent.influence import InfluenceMethod, Queries
from influent.rankings import RANKINGS, proponent_order

REMOVAL_KS = (1, 10, 50)
RELEVANCE_TOP = 10
INFLUENCE_RANKINGS = tuple(RANKINGS)
"""The rankings ``explain`` offers, hence the candidates for its default."""


@dataclass
class RankingPanel:
    """Every ranking's values for a panel of queries.

    Attributes:
        values: ranking name -> ``[Q, n]`` (larger = more of a proponent).
        positive_only: ranking name -> whether only positive values count as proponents.
        seconds_per_query: ranking name -> seconds to compute it for the panel / Q.
        predicted: ``[Q]`` the queries' predicted classes (the label explained).
        train_labels: ``[n]`` the training examples' labels.
    """

    values: dict[str, torch.Tensor]
    positive_only: dict[str, bool]
    seconds_per_query: dict[str, float]
    predicted: np.ndarray
    train_labels: np.ndarray

    @property
    def n_queries(self) -> int:
        return len(self.predicted)

    def top(self, name: str, q: int, k: int) -> np.ndarray:
        """The top ``k`` proponents of query ``q`` under ranking ``name`` (training indices)."""
        return proponent_order(self.values[name][q], k, self.positive_only[name]).numpy()


def influence_panel(
    method: InfluenceMethod,
    queries: Queries,
    predicted: np.ndarray,
    train_labels: np.ndarray,
    references: dict[str, Callable[[], torch.Tensor]],
) -> RankingPanel:
    """The influence rankings (raw, RelatIF, cosine) from one method and the similarity ``references``.

    Args:
        method: the influence method over the training set (fitted here).
        queries: the queries' data, each labelled with its predicted class.
        predicted: ``[Q]`` predicted classes; train_labels: ``[n]``.
        references: name -> a function returning ``[Q, n]`` similarities (timed here).
    """
    q = len(predicted)
    t = time.perf_counter()
    method.fit()
    scores = method.pairwise_scores(queries)
    t_scores = time.perf_counter() - t
    t = time.perf_counter()
    inv_train = method.self_scores()
    t_self = time.perf_counter() - t
    t = time.perf_counter()
    inv_query = method.query_self_scores(queries)
    t_query = time.perf_counter() - t

    class _Cached:  # the protocol's self-scores computed once for both normalised rankings
        n_train = method.n_train

        def self_scores(self):
            return inv_train

        def query_self_scores(self, _):
            return inv_query

    cached = _Cached()
    values = {name: fn(cached, scores, queries) for name, fn in RANKINGS.items()}
    seconds = {"influence": t_scores / q, "relatif": (t_scores + t_self) / q,
               "cosine": (t_scores + t_self + t_query) / q}
    positive = dict.fromkeys(values, True)
    for name, fn in references.items():
        t = time.perf_counter()
        values[name] = fn().double()
        seconds[name] = (time.perf_counter() - t) / q
        positive[name] = False
    return RankingPanel(values, positive, seconds, np.asarray(predicted), np.asarray(train_labels))


def relevance(panel: RankingPanel, top: int = RELEVANCE_TOP) -> dict[str, dict[str, np.ndarray | int]]:
    """Per ranking: ``top1_same_class`` and ``top10_same_class`` per query (``[Q]``; NaN where a query has no
    proponent) and ``distinct_top10`` (count). See the module docstring."""
    out = {}
    for name in panel.values:
        top1, share, seen = [], [], set()
        for q in range(panel.n_queries):
            idx = panel.top(name, q, top)
            same = panel.train_labels[idx] == panel.predicted[q]
            top1.append(float(same[0]) if len(idx) else np.nan)
            share.append(float(same.mean()) if len(idx) else np.nan)
            seen.update(int(i) for i in idx)
        out[name] = {"top1_same_class": np.asarray(top1), "top10_same_class": np.asarray(share),
                     "distinct_top10": len(seen)}
    return out


class Removal(Protocol):
    """Retrains a model without some training examples and evaluates one query.

    ``base(q)`` and ``without(q, removed)`` return the query's loss at its predicted label (nats) and the
    predicted class, for the model trained on all examples and on all but ``removed`` (training indices).
    """

    def base(self, q: int) -> tuple[float, int]: ...

    def without(self, q: int, removed: np.ndarray) -> tuple[float, int]: ...


@dataclass
class HeadRemoval:
    """Exact retraining of the logistic head: Newton from the trained optimum (warm start) on the kept rows.

    Uses :func:`influent.models.refit.fit_head` (the package's Newton loop) to gradient norm ``tol``; the
    objective is strongly convex, so its optimum is unique and the warm start only saves iterations. The steps
    use the full data's Hessian at the optimum as a fixed matrix (``curvature``; exact gradient, same optimum),
    which makes a refit cost a few gradient evaluations instead of a Hessian per step.

    Args:
        model: the trained head; train_x ``[n, d]``, train_y ``[n]``: its training data; l2: its ridge.
        query_x: ``[Q, d]`` query features; query_labels: ``[Q]`` the predicted labels explained.
    """

    model: torch.nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    l2: float
    query_x: torch.Tensor
    query_labels: torch.Tensor
    tol: float = 1e-9

    def refit(self, removed: np.ndarray) -> torch.nn.Module:
        """The head retrained without ``removed`` (to gradient norm ``tol``)."""
        from influent.models.refit import fit_head, head_hessian

        if not hasattr(self, "_hessian"):  # the full data's Hessian at the optimum, as a fixed Newton matrix
            self._hessian = head_hessian(self.model, self.train_x, self.train_y, self.l2)
        keep = np.setdiff1d(np.arange(len(self.train_y)), removed)
        k = torch.as_tensor(keep)
        model, _ = fit_head(self.train_x[k], self.train_y[k], self.model.num_classes, self.l2,
                            init=self.model, tol=self.tol, max_iter=200, curvature=self._hessian)
        return model

    def evaluate(self, model: torch.nn.Module, q: int) -> tuple[float, int]:
        from influent.models.head import per_example_loss, predict

        x = self.query_x[q : q + 1]
        return float(per_example_loss(model, x, self.query_labels[q : q + 1])[0]), int(predict(model, x)[0])

    def base(self, q: int) -> tuple[float, int]:
        if not hasattr(self, "_base_model"):
            self._base_model = self.refit(np.zeros(0, dtype=np.int64))
        return self.evaluate(self._base_model, q)

    def without(self, q: int, removed: np.ndarray) -> tuple[float, int]:
        return self.evaluate(self.refit(removed), q)


@dataclass
class SuffixRemoval:
    """Seeded replay of a prefix-cached fine-tune (:class:`~influent.models.suffix_classifier.SuffixClassifier`)
    without the removed rows: same initialisation, seed, shuffling order of the remaining rows and dropout.

    Args:
        classifier: the SuffixClassifier; train_batch: its cached training batch (gold labels).
        query_batch: cached queries labelled with their predicted classes.
        theta: the parameters trained on everything (``classifier.fit(train_batch)``).
    """

    classifier: object
    train_batch: dict
    query_batch: dict
    theta: torch.Tensor

    def evaluate(self, theta: torch.Tensor, q: int) -> tuple[float, int]:
        from influent.task import slice_batch

        one = slice_batch(self.query_batch, torch.tensor([q]))
        logits = self.classifier.logits(theta, one).double()
        label = int(one["labels"][0])
        return float(-logits.log_softmax(-1)[0, label]), int(logits.argmax(-1)[0])

    def base(self, q: int) -> tuple[float, int]:
        return self.evaluate(self.theta, q)

    def without(self, q: int, removed: np.ndarray) -> tuple[float, int]:
        n = int(self.train_batch["attention_mask"].shape[0])
        keep = torch.as_tensor(np.setdiff1d(np.arange(n), removed))
        theta, _ = self.classifier.fit(self.train_batch, keep)
        return self.evaluate(theta, q)


@dataclass
class RemovalRecord:
    """One query's removal results: ranking -> k -> (loss change in nats, flipped 0/1, examples removed);
    ``seconds`` for the query's retrainings (and its base evaluation), ``retrains`` how many there were."""

    query: int
    results: dict[str, dict[int, tuple[float, float, int]]] = field(default_factory=dict)
    seconds: float = 0.0
    retrains: int = 0


def removal_experiment(
    panel: RankingPanel,
    removal: Removal,
    queries: list[int],
    ks: tuple[int, ...] = REMOVAL_KS,
    rankings: list[str] | None = None,
    seed: int = 0,
    reference_ks: tuple[int, ...] | None = None,
) -> Iterator[RemovalRecord]:
    """For each query, remove its top-k proponents under each ranking (and k random examples), retrain, and
    yield the query's loss change and whether its prediction flipped. Identical removal sets (e.g. RelatIF
    and cosine order each query's examples the same way) are retrained once.

    ``ks`` are used for the influence rankings (:data:`INFLUENCE_RANKINGS`); the comparators (the similarity
    references and ``random``) use ``reference_ks`` (default: ``ks``), which lets a costly retraining measure
    them at fewer k."""
    names = list(rankings or panel.values)
    n = len(panel.train_labels)
    for q in queries:
        t = time.perf_counter()
        loss0, pred0 = removal.base(q)
        rng = np.random.default_rng([seed, q])
        done: dict[tuple[int, ...], tuple[float, float]] = {}
        record = RemovalRecord(q)
        for name in [*names, "random"]:
            record.results[name] = {}
            for k in ks if name in INFLUENCE_RANKINGS or reference_ks is None else reference_ks:
                idx = rng.choice(n, size=k, replace=False) if name == "random" else panel.top(name, q, k)
                key = tuple(sorted(int(i) for i in idx))
                if key not in done:
                    loss, pred = removal.without(q, np.asarray(key, dtype=np.int64))
                    done[key] = (loss - loss0, float(pred != pred0))
                record.results[name][k] = (*done[key], len(key))
        record.seconds, record.retrains = time.perf_counter() - t, len(done)
        yield record


def interval(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict[str, float | int]:
    """Mean and 95% percentile-bootstrap interval of ``values`` (NaNs dropped), with the count ``m``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "m": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "low": float(low), "high": float(high), "m": len(v)}


def summarise(
    panel: RankingPanel, records: list[RemovalRecord], ks: tuple[int, ...] = REMOVAL_KS, seed: int = 0
) -> dict:
    """Per ranking: relevance figures, per k the loss change and flip share (mean + interval), seconds."""
    rel = relevance(panel)
    out: dict[str, dict] = {}
    for name in [*panel.values, "random"]:
        row: dict = {}
        if name in rel:
            row["top1_same_class"] = interval(rel[name]["top1_same_class"], seed)
            row["top10_same_class"] = interval(rel[name]["top10_same_class"], seed)
            row["distinct_top10"] = rel[name]["distinct_top10"]
            row["seconds_per_query"] = panel.seconds_per_query[name]
        for k in ks:
            got = [r.results[name][k] for r in records if k in r.results.get(name, {})]
            if got:
                row[f"loss_change@{k}"] = interval(np.array([g[0] for g in got]), seed)
                row[f"flipped@{k}"] = interval(np.array([g[1] for g in got]), seed)
                row[f"removed@{k}"] = float(np.mean([g[2] for g in got]))
        out[name] = row
    return out


def paired_difference(records: list[RemovalRecord], a: str, b: str, k: int, seed: int = 0) -> dict:
    """Mean and 95% bootstrap interval over queries of ``loss_change(a) - loss_change(b)`` at ``k`` (nats), the
    two removals measured on the same query (paired, so the replay's query-to-query spread cancels)."""
    d = [r.results[a][k][0] - r.results[b][k][0] for r in records
         if k in r.results.get(a, {}) and k in r.results.get(b, {})]
    return interval(np.asarray(d), seed)


def choose_default(summary: dict, threshold: float = 0.95, k: int = RELEVANCE_TOP) -> dict:
    """The ranking ``explain`` should use: among :data:`INFLUENCE_RANKINGS` those whose ``top10_same_class``
    mean is at least ``threshold``, the one whose top-``k`` removal raises the query loss the most.

    Returns ``{"default": name or None, "faithfulness_measured", "passing": [...], "most_relevant": name,
    "most_faithful": name}`` (``default`` None when none passes, then show the most relevant and the most
    faithful side by side, or when no removal was measured). Ties (``relatif`` and ``cosine`` order each query's
    examples identically, so their removals are the same) go to the first in :data:`INFLUENCE_RANKINGS`.
    """
    cands = [n for n in INFLUENCE_RANKINGS if n in summary]
    key = f"loss_change@{k}"

    def faith(n: str) -> float:
        return summary[n].get(key, {}).get("mean", float("-inf"))

    passing = [n for n in cands if summary[n]["top10_same_class"]["mean"] >= threshold]
    measured = any(key in summary[n] for n in cands)
    return {
        "default": max(passing, key=faith) if passing and measured else None,
        "faithfulness_measured": measured,
        "passing": passing,
        "threshold": threshold,
        "most_relevant": max(cands, key=lambda n: summary[n]["top10_same_class"]["mean"]),
        "most_faithful": max(cands, key=faith) if measured else None,
    }


def _cell(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def markdown_table(summary: dict, ks: tuple[int, ...] = REMOVAL_KS) -> str:
    """Two markdown tables: relevance (+ seconds per query) and faithfulness (loss change, flips) per ranking."""
    lines = ["| ranking | top-1 same class | top-10 same class | distinct in top-10 | s / query |",
             "|---|---|---|---|---|"]
    for name, row in summary.items():
        if "top1_same_class" in row:
            lines.append(f"| {name} | {_cell(row['top1_same_class'])} | {_cell(row['top10_same_class'])} | "
                         f"{row['distinct_top10']} | {row['seconds_per_query']:.2g} |")
    def measured(row: dict) -> bool:
        return any(f"loss_change@{k}" in row for k in ks)

    if not any(measured(row) for row in summary.values()):
        return "\n".join([*lines, "", "(faithfulness: no removal measured)"])
    head = " | ".join(f"loss change k={k} | flipped k={k}" for k in ks)
    lines += ["", f"| ranking | {head} |", "|---|" + "---|" * (2 * len(ks))]
    for name, row in summary.items():
        if measured(row):
            cells = " | ".join(f"{_cell(row[f'loss_change@{k}'], 4)} | {_cell(row[f'flipped@{k}'], 3)}"
                               if f"loss_change@{k}" in row else "- | -" for k in ks)
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)
