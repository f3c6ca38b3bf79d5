"""Orderings of the training examples behind a prediction: raw influence, RelatIF, the H^-1-cosine, and
model-free nearest neighbours as references.

Every ranking maps a query to one value per training example; the explanation of a query lists the examples
with the largest values. The influence rankings keep the sign of the score (positive = proponent), so
proponents are the top of the ranking among positive scores and opponents the bottom among negative scores.

* ``influence``: ``s(q, i) = g_q^T C^-1 g_i`` (Koh & Liang; the protocol's ``pairwise_scores``; units of the
  query loss times n).
* ``relatif``: ``s(q, i) / sqrt(g_i^T C^-1 g_i)`` (Barshan et al. 2020, RelatIF): the score divided by the
  ``C^-1``-norm of the training gradient, so a few high-loss, high-leverage examples no longer top every
  query's list. Units: sqrt of the score's.
* ``cosine``: ``s(q, i) / (sqrt(g_i^T C^-1 g_i) sqrt(g_q^T C^-1 g_q))``: the cosine of the two gradients in
  the ``C^-1`` inner product, in [-1, 1] (dimensionless). Same order per query as ``relatif``.

The references need no model gradients: :func:`embedding_similarity` (cosine of the encoder's sentence
embeddings) and :func:`tfidf_similarity` (cosine of TF-IDF vectors fitted on the training texts), both in
[-1, 1], larger = more similar.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from influent.influence import InfluenceMethod, Queries

Ranking = Callable[[InfluenceMethod, torch.Tensor, Queries], torch.Tensor]
"""``(method, scores [Q, n], queries) -> [Q, n]`` values that order the examples (same sign as the score)."""


def inverse_norm(self_scores: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(self-influence)`` (``[m]``), 0 where the self-influence is 0 (a zero gradient ranks nowhere)."""
    s = self_scores.double().clamp_min(0.0)
    return torch.where(s > 0, s.rsqrt(), torch.zeros_like(s))


def influence_values(method: InfluenceMethod, scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """The raw score ``g_q^T C^-1 g_i`` (``[Q, n]``)."""
    return scores


def relatif_values(method: InfluenceMethod, scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """RelatIF: ``score / sqrt(self_i)`` with ``self_i = g_i^T C^-1 g_i`` (``method.self_scores()``), ``[Q, n]``."""
    return scores * inverse_norm(method.self_scores())[None, :]


def cosine_values(method: InfluenceMethod, scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """The ``C^-1``-cosine ``score / (sqrt(self_i) sqrt(self_q))`` (``query_self_scores``), ``[Q, n]`` in [-1, 1]."""
    return relatif_values(method, scores, queries) * inverse_norm(method.query_self_scores(queries))[:, None]


RANKINGS: dict[str, Ranking] = {
    "influence": influence_values,
    "relatif": relatif_values,
    "cosine": cosine_values,
}
"""The influence rankings :func:`influent.explain.explain` offers (``rank=``), by name."""


def embedding_similarity(train: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[Q, n]`` (float64) of query embeddings ``[Q, d]`` to training embeddings ``[n, d]``."""
    a = torch.nn.functional.normalize(queries.double(), dim=1)
    b = torch.nn.functional.normalize(train.double(), dim=1)
    return a @ b.T


def tfidf_similarity(train_texts: list[str], query_texts: list[str]) -> torch.Tensor:
    """Cosine similarity ``[Q, n]`` (float64) of TF-IDF vectors (scikit-learn ``TfidfVectorizer``, fitted on the
    training texts: word unigrams, sublinear tf, l2-normalised rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True)
    train = vec.fit_transform(train_texts)
    sims = vec.transform(query_texts) @ train.T
    return torch.from_numpy(np.asarray(sims.todense(), dtype=np.float64))


def proponent_order(values: torch.Tensor, k: int, positive_only: bool = True) -> torch.Tensor:
    """Indices of the top ``k`` training examples of one query's ``values`` ``[n]`` (largest first).

    With ``positive_only`` (the influence rankings) only examples with a positive value are proponents, so
    fewer than ``k`` may come back; the similarity references take the ``k`` most similar.
    """
    order = torch.argsort(values, descending=True)[:k]
    return order[values[order] > 0] if positive_only else order
