"""Rankers of suspicious training examples: influence-based ones and the baselines they must beat.

Every ranker returns one suspicion score per training example, ``[n]`` float64, **higher = more
suspicious**, and is written once for every model kind: it reads an :class:`AuditInputs`, whose influence
rankers use only the :class:`~influent.influence.InfluenceMethod` protocol (the model's curvature method,
and identity-curvature methods at training checkpoints for the curvature-free rankers) and whose baselines
use the model side (:class:`BaselineModel`: labels, out-of-fold probabilities, representations). The
builders for the head and the fine-tuned classifier are in :mod:`influent.defenses.inputs`.

Sign of the query rankers: a query is an input with the label it *should* get (a misclassified
validation review with its true label, or a trigger-containing input with its source-class label). The
protocol's ``score(z_train, z_query) = g_q^T C^-1 g_train`` is positive for proponents (up-weighting the
training example lowers the query's loss at that label). A poison or a mislabel that causes the wrong
prediction *raises* that loss, so it is an opponent: ``score < 0``. ``query_influence`` therefore sums
``-score`` over the queries (equivalently ``+score`` of the query at the attacker's label, for a binary
task); ``query_influence_abs`` sums ``|score|`` (sign-agnostic, for when the user is unsure which label is
right).

Baselines: random, training loss in-sample and out-of-fold (k-fold retraining), cleanlab's
``find_label_issues`` on the out-of-fold probabilities, and spectral signatures (Tran et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from influent.errors import NumericalError, UserError
from influent.influence import InfluenceMethod, Queries

INFLUENCE_RANKERS = (
    "self_influence",
    "loo_loss",
    "tracin_self",
    "query_influence",
    "query_influence_abs",
    "relatif",
    "grad_cosine",
)
BASELINE_RANKERS = ("random", "loss", "loss_oof", "cleanlab", "spectral", "spectral_grad")
QUERY_RANKERS = ("query_influence", "query_influence_abs", "relatif", "grad_cosine")
CHECKPOINT_RANKERS = ("tracin_self", "grad_cosine")
MODEL_RANKERS = ("loss_oof", "cleanlab", "spectral")


class BaselineModel(Protocol):
    """The model side of the baselines (no influence): what was trained on and how it generalises.

    Attributes:
        labels: ``[n]`` int64 training labels as the model was trained on them.
        num_classes: K.
    """

    labels: np.ndarray
    num_classes: int

    def oof_probabilities(self) -> np.ndarray:
        """Out-of-fold class probabilities ``[n, K]`` from k-fold retraining."""

    def representations(self) -> np.ndarray | None:
        """The model's input representation of every training example ``[n, d]`` (spectral signatures), or
        None where the model has none."""


@dataclass
class AuditInputs:
    """What the rankers look at: one training set through the influence protocol and the model side.

    Attributes:
        method: influence over the training set with the model's curvature (exact Hessian for the head,
            EK-FAC for the fine-tuned classifier); its training data is the one being audited.
        baselines: the model side of the baselines (None: only the influence rankers, ``loss``, ``random``).
        checkpoints: identity-curvature methods (plain gradient dot products, up to a constant) over the
            same training data at training checkpoints, the final model first: ``tracin_self`` averages
            their self-scores, ``grad_cosine`` uses the first.
        queries: queries with the labels they should get (see module docstring), or None (none, or no rows).
        seed: seeds ``random`` and tie-breaking.
    """

    method: InfluenceMethod
    baselines: BaselineModel | None = None
    checkpoints: Sequence[InfluenceMethod] = ()
    queries: Queries | None = None
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.method.n_train)

    @property
    def has_queries(self) -> bool:
        return self.queries is not None

    def _cached(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def self_scores(self) -> np.ndarray:
        """``g_i^T C^-1 g_i`` of every training example ``[n]``."""
        return self._cached("self", lambda: self.method.self_scores().double().numpy())

    def train_losses(self) -> np.ndarray:
        """In-sample training loss ``[n]`` (nats)."""
        return self._cached("loss", lambda: self.method.train_losses().double().numpy())

    def query_scores(self) -> np.ndarray:
        """Scores ``[Q, n]`` of every training example for every query."""
        return self._cached("pairwise", lambda: self.method.pairwise_scores(self.queries).double().numpy())

    def labels(self) -> np.ndarray:
        return np.asarray(self.baselines.labels)


def _require(data: AuditInputs, name: str) -> None:
    if name in QUERY_RANKERS and not data.has_queries:
        raise UserError(
            f"ranker {name!r} needs queries (misclassified validation examples or trigger inputs)", field="rankers"
        )
    if name in CHECKPOINT_RANKERS and not data.checkpoints:
        raise UserError(f"ranker {name!r} needs identity-curvature checkpoint methods", field="rankers")
    needs_model = name in MODEL_RANKERS or name == "spectral_grad"
    if needs_model and data.baselines is None:
        raise UserError(f"ranker {name!r} needs the model side (labels, k-fold retraining)", field="rankers")
    if name == "spectral" and data.baselines.representations() is None:
        raise UserError(f"ranker {name!r} needs the model's input representations", field="rankers")


# --- baselines -----------------------------------------------------------------------------------------
def rank_random(data: AuditInputs) -> np.ndarray:
    """Uniform random scores (seeded): the floor every ranker must clear."""
    return np.random.default_rng(data.seed + 7919).random(data.n)


def rank_loss(data: AuditInputs) -> np.ndarray:
    """In-sample training loss under the trained model (nats)."""
    return data.train_losses()


def rank_loss_oof(data: AuditInputs) -> np.ndarray:
    """Out-of-fold loss ``-log p_oof(y_i)`` from k-fold retraining (nats)."""
    p = data.baselines.oof_probabilities()[np.arange(data.n), data.labels()]
    return -np.log(np.clip(p, 1e-300, None))


def rank_cleanlab(data: AuditInputs) -> np.ndarray:
    """cleanlab ``find_label_issues`` on out-of-fold probabilities, ranked by self-confidence.

    Examples cleanlab flags come first, in cleanlab's order; the rest follow by ``1 - p_oof(y)``.
    """
    from cleanlab.filter import find_label_issues

    probs = data.baselines.oof_probabilities()
    labels = data.labels()
    flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    scores = 1.0 - probs[np.arange(data.n), labels]  # in [0, 1]
    ranked = np.zeros(data.n)
    ranked[flagged] = 2.0 + (len(flagged) - np.arange(len(flagged))) / max(1, len(flagged))
    return np.where(ranked > 0, ranked, scores)


def spectral_signature(reps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Tran et al. 2018: per class, squared projection of centred representations on the top singular vector.

    Scores are divided by their class mean so classes are comparable in one ranking.
    """
    scores = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        R = reps[idx] - reps[idx].mean(0, keepdims=True)
        if len(idx) < 2:
            continue
        # top right singular vector of R = top eigenvector of R^T R (d x d: cheaper than an SVD of R)
        _, evecs = np.linalg.eigh(R.T @ R)
        top = evecs[:, -1]
        s = (R @ top) ** 2
        scores[idx] = s / max(s.mean(), 1e-300)
    return scores


def rank_spectral(data: AuditInputs) -> np.ndarray:
    """Spectral signatures of the model's input representations (the head: the frozen embeddings)."""
    return spectral_signature(data.baselines.representations(), data.labels())


def rank_spectral_grad(data: AuditInputs) -> np.ndarray:
    """Spectral signatures of the per-example loss gradients (``method.train_gradients``)."""
    return spectral_signature(data.method.train_gradients().numpy(), data.labels())


# --- influence rankers ---------------------------------------------------------------------------------
def rank_self_influence(data: AuditInputs) -> np.ndarray:
    """Self-influence ``g_i^T (C + damping)^-1 g_i`` (>= 0)."""
    return data.self_scores()


def rank_loo_loss(data: AuditInputs) -> np.ndarray:
    """Influence-predicted leave-one-out loss: ``loss_i + self_influence_i / n`` (nats).

    Removing z_i moves the parameters by ``C^-1 g_i / n`` to first order, which raises z_i's own loss by
    ``g_i^T C^-1 g_i / n``: an out-of-fold loss without retraining.
    """
    return data.train_losses() + data.self_scores() / data.n


def rank_tracin_self(data: AuditInputs) -> np.ndarray:
    """TracIn self-influence: the mean over checkpoints of ``g_i(theta_c)^T g_i(theta_c)`` (identity
    curvature; the final model included)."""
    total = np.zeros(data.n)
    for method in data.checkpoints:
        total += method.self_scores().double().numpy()
    return total / len(data.checkpoints)


def _summed_query_scores(data: AuditInputs) -> np.ndarray:
    """``sum_q score(z_i, q)`` for every training example."""
    return data._cached("qsum", lambda: data.query_scores().sum(0))


def rank_query_influence(data: AuditInputs) -> np.ndarray:
    """``sum_q -score(z_i, q)``: how much z_i pushes the queries away from their correct labels."""
    return -_summed_query_scores(data)


def rank_query_influence_abs(data: AuditInputs) -> np.ndarray:
    """``sum_q |score(z_i, q)|`` (sign-agnostic)."""
    return np.abs(data.query_scores()).sum(0)


def rank_relatif(data: AuditInputs) -> np.ndarray:
    """RelatIF-style (l-relative) influence: ``sum_q -score(z_i, q) / sqrt(g_i^T C^-1 g_i)``.

    Dividing by the square root of self-influence stops a few high-leverage examples from dominating.
    """
    return -_summed_query_scores(data) / np.sqrt(np.clip(data.self_scores(), 1e-300, None))


def rank_grad_cosine(data: AuditInputs) -> np.ndarray:
    """``sum_q -cos(g_q, g_i)``: curvature-free normalised gradient similarity (final checkpoint)."""
    plain = data.checkpoints[0]
    dots = plain.pairwise_scores(data.queries).double()  # [Q, n], g_q . g_i up to the method's constant
    q_norm = plain.query_self_scores(data.queries).double().sqrt().clamp_min(1e-300)
    t_norm = plain.self_scores().double().sqrt().clamp_min(1e-300)
    return -((dots / q_norm[:, None]).sum(0) / t_norm).numpy()


RANKERS: dict[str, Callable[[AuditInputs], np.ndarray]] = {
    "random": rank_random,
    "loss": rank_loss,
    "loss_oof": rank_loss_oof,
    "cleanlab": rank_cleanlab,
    "spectral": rank_spectral,
    "spectral_grad": rank_spectral_grad,
    "self_influence": rank_self_influence,
    "loo_loss": rank_loo_loss,
    "tracin_self": rank_tracin_self,
    "query_influence": rank_query_influence,
    "query_influence_abs": rank_query_influence_abs,
    "relatif": rank_relatif,
    "grad_cosine": rank_grad_cosine,
}


def available_rankers(data: AuditInputs) -> list[str]:
    """Every ranker that can run on ``data`` (query rankers only with queries, baselines with a model side)."""
    out = []
    for name in RANKERS:
        try:
            _require(data, name)
        except UserError:
            continue
        out.append(name)
    return out


def score_all(data: AuditInputs, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Suspicion scores ``{name: [n]}`` of every requested ranker (default: all available), checked finite.

    Raises:
        UserError: (field ``rankers``) an unknown ranker, or one whose inputs ``data`` lacks.
        NumericalError: a ranker produced non-finite scores.
    """
    names = available_rankers(data) if names is None else names
    out = {}
    for name in names:
        if name not in RANKERS:
            raise UserError(f"unknown ranker {name!r}; choose from {', '.join(RANKERS)}", field="rankers")
        _require(data, name)
        s = np.asarray(RANKERS[name](data), dtype=np.float64)
        if not np.isfinite(s).all():
            raise NumericalError(f"ranker {name!r} produced non-finite scores")
        out[name] = s
    return out


def score_rankers(
    method: InfluenceMethod,
    names: list[str],
    *,
    queries: Queries | None = None,
    checkpoints: Sequence[InfluenceMethod] = (),
    baselines: BaselineModel | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """:func:`score_all` of ``names`` over one influence method (and optional checkpoints, model side)."""
    data = AuditInputs(method, baselines, list(checkpoints), queries, seed)
    return score_all(data, names)

