"""Rankers of suspicious training examples: influence-based ones and the baselines they must beat.

Every ranker returns one suspicion score per training example, ``[n]`` float64, **higher = more
suspicious**. Influence rankers use only the public :class:`~influent.influence.ExactInfluence` API.

Sign of the query rankers: a query is an input with the label it *should* get (a misclassified
validation review with its true label, or a trigger-containing input with its source-class label). The
engine's ``score(z_train, z_query) = g_q^T H^-1 g_train`` is positive for proponents (up-weighting the
training example lowers the query's loss at that label). A poison or a mislabel that causes the wrong
prediction *raises* that loss, so it is an opponent: ``score < 0``. ``query_influence`` therefore sums
``-score`` over the queries (equivalently ``+score`` of the query at the attacker's label, for a binary
task); ``query_influence_abs`` sums ``|score|`` (sign-agnostic, for when the user is unsure which label is
right).

Baselines: random, training loss in-sample and out-of-fold (k-fold retraining), cleanlab's
``find_label_issues`` on the out-of-fold probabilities, and spectral signatures (Tran et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from influent.influence import ExactInfluence
from influent.models.head import LogisticHead, per_example_loss, probabilities
from influent.models.refit import fit_head

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


@dataclass
class HeadAuditData:
    """What the rankers look at for a logistic head on frozen features.

    Attributes:
        train_x, train_y: the (possibly poisoned) training set, float64 ``[n, d]`` and int64 ``[n]``.
        num_classes: K.
        l2: ridge coefficient of the head's objective.
        model: the head trained on exactly this training set (trained here if None).
        query_x, query_y: queries with the labels they should get (see module docstring), or None.
        damping: added to the curvature before inverting (0 is fine: the objective has l2).
        folds: k of the k-fold out-of-fold baselines.
        seed: seeds random, the folds and tie-breaking.
        tracin_checkpoints: Newton iterates (from the zero init) used by ``tracin_self`` (0: final only).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int
    l2: float
    model: LogisticHead | None = None
    query_x: torch.Tensor | None = None
    query_y: torch.Tensor | None = None
    damping: float = 0.0
    folds: int = 5
    seed: int = 0
    tracin_checkpoints: int = 4
    _engine: ExactInfluence | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.train_x = self.train_x.double()
        self.train_y = torch.as_tensor(self.train_y).long()
        if self.model is None:
            self.model, _ = fit_head(self.train_x, self.train_y, self.num_classes, self.l2)

    @property
    def n(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def has_queries(self) -> bool:
        return self.query_x is not None and len(self.query_x) > 0

    @property
    def engine(self) -> ExactInfluence:
        if self._engine is None:
            from influent.models.head import HeadTask

            self._engine = ExactInfluence(
                self.model, HeadTask(self.l2), (self.train_x, self.train_y), damping=self.damping
            )
        return self._engine

    def self_scores(self) -> np.ndarray:
        if "self" not in self._cache:
            self._cache["self"] = self.engine.self_scores().numpy()
        return self._cache["self"]

    def query_grads(self) -> torch.Tensor:
        if "qg" not in self._cache:
            self._cache["qg"] = self.engine.query_grads((self.query_x.double(), self.query_y.long()))
        return self._cache["qg"]

    def oof_probabilities(self) -> np.ndarray:
        """Out-of-fold class probabilities ``[n, K]`` from k-fold retraining of the head."""
        if "oof" not in self._cache:
            probs = np.zeros((self.n, self.num_classes))
            y = self.train_y.numpy()
            folds = StratifiedKFold(self.folds, shuffle=True, random_state=self.seed)
            for fit_idx, held in folds.split(np.zeros(self.n), y):
                fit_idx, held = torch.as_tensor(fit_idx), torch.as_tensor(held)
                m, _ = fit_head(
                    self.train_x[fit_idx], self.train_y[fit_idx], self.num_classes, self.l2, init=self.model
                )
                probs[held.numpy()] = probabilities(m, self.train_x[held]).numpy()
            self._cache["oof"] = probs
        return self._cache["oof"]


# --- baselines -----------------------------------------------------------------------------------------
def rank_random(data: HeadAuditData) -> np.ndarray:
    """Uniform random scores (seeded): the floor every ranker must clear."""
    return np.random.default_rng(data.seed + 7919).random(data.n)


def rank_loss(data: HeadAuditData) -> np.ndarray:
    """In-sample training loss under the trained model (nats)."""
    return per_example_loss(data.model, data.train_x, data.train_y).numpy()


def rank_loss_oof(data: HeadAuditData) -> np.ndarray:
    """Out-of-fold loss ``-log p_oof(y_i)`` from k-fold retraining (nats)."""
    p = data.oof_probabilities()[np.arange(data.n), data.train_y.numpy()]
    return -np.log(np.clip(p, 1e-300, None))


def rank_cleanlab(data: HeadAuditData) -> np.ndarray:
    """cleanlab ``find_label_issues`` on out-of-fold probabilities, ranked by self-confidence.

    Examples cleanlab flags come first, in cleanlab's order; the rest follow by ``1 - p_oof(y)``.
    """
    from cleanlab.filter import find_label_issues

    probs = data.oof_probabilities()
    labels = data.train_y.numpy()
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


def rank_spectral(data: HeadAuditData) -> np.ndarray:
    """Spectral signatures of the head's input representations (the frozen embeddings)."""
    return spectral_signature(data.train_x.numpy(), data.train_y.numpy())


def rank_spectral_grad(data: HeadAuditData) -> np.ndarray:
    """Spectral signatures of the per-example loss gradients."""
    return spectral_signature(data.engine.train_grads.numpy(), data.train_y.numpy())


# --- influence rankers ---------------------------------------------------------------------------------
def rank_self_influence(data: HeadAuditData) -> np.ndarray:
    """Self-influence ``g_i^T (H + damping I)^-1 g_i`` (>= 0)."""
    return data.self_scores()


def rank_loo_loss(data: HeadAuditData) -> np.ndarray:
    """Influence-predicted leave-one-out loss: ``loss_i + self_influence_i / n`` (nats).

    Removing z_i moves the parameters by ``H^-1 g_i / n`` to first order, which raises z_i's own loss by
    ``g_i^T H^-1 g_i / n``: an out-of-fold loss without retraining.
    """
    return rank_loss(data) + data.self_scores() / data.n


def newton_checkpoints(data: HeadAuditData, count: int) -> list[torch.Tensor]:
    """Flat parameters of the first ``count`` Newton iterates from the zero init (training trajectory)."""
    space = data.engine.space
    out = []
    for it in range(1, count + 1):
        m, _ = fit_head(data.train_x, data.train_y, data.num_classes, data.l2, max_iter=it, tol=0.0)
        out.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert all(t.shape[0] == space.dim for t in out)
    return out


def rank_tracin_self(data: HeadAuditData) -> np.ndarray:
    """TracIn self-influence ``sum_c ||g_i(theta_c)||^2`` over checkpoints (the final model included)."""
    engine = data.engine
    thetas = [engine.theta] + (
        newton_checkpoints(data, data.tracin_checkpoints) if data.tracin_checkpoints else []
    )
    total = np.zeros(data.n)
    for theta in thetas:
        G = engine.space.per_example_grads((data.train_x, data.train_y), theta)
        total += G.pow(2).sum(1).numpy()
    return total / len(thetas)


def _require_queries(data: HeadAuditData, name: str) -> None:
    if not data.has_queries:
        raise ValueError(
            f"ranker {name!r} needs queries (misclassified validation examples or trigger inputs)"
        )


def _summed_query_scores(data: HeadAuditData) -> np.ndarray:
    """``sum_q g_q^T H^-1 g_i`` for every training example (one solve)."""
    if "qsum" not in data._cache:
        s = data.engine.inverse_hvp(data.query_grads().sum(0)).x
        data._cache["qsum"] = (data.engine.train_grads @ s).numpy()
    return data._cache["qsum"]


def rank_query_influence(data: HeadAuditData) -> np.ndarray:
    """``sum_q -score(z_i, q)``: how much z_i pushes the queries away from their correct labels."""
    _require_queries(data, "query_influence")
    return -_summed_query_scores(data)


def rank_query_influence_abs(data: HeadAuditData) -> np.ndarray:
    """``sum_q |score(z_i, q)|`` (sign-agnostic)."""
    _require_queries(data, "query_influence_abs")
    S = data.engine.pairwise_scores((data.query_x.double(), data.query_y.long()))  # [Q, n]
    return S.abs().sum(0).numpy()


def rank_relatif(data: HeadAuditData) -> np.ndarray:
    """RelatIF-style (l-relative) influence: ``sum_q -score(z_i, q) / sqrt(g_i^T H^-1 g_i)``.

    Dividing by the square root of self-influence stops a few high-leverage examples from dominating.
    """
    _require_queries(data, "relatif")
    return -_summed_query_scores(data) / np.sqrt(np.clip(data.self_scores(), 1e-300, None))


def rank_grad_cosine(data: HeadAuditData) -> np.ndarray:
    """``sum_q -cos(g_q, g_i)``: curvature-free normalised gradient similarity."""
    _require_queries(data, "grad_cosine")
    Gq = data.query_grads()
    Gt = data.engine.train_grads
    direction = (Gq / Gq.norm(dim=1, keepdim=True).clamp_min(1e-300)).sum(0)
    return -(Gt @ direction / Gt.norm(dim=1).clamp_min(1e-300)).numpy()


RANKERS: dict[str, Callable[[HeadAuditData], np.ndarray]] = {
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


def available_rankers(data: HeadAuditData) -> list[str]:
    """Every ranker that can run on ``data`` (query rankers only when queries are given)."""
    return [r for r in RANKERS if data.has_queries or r not in QUERY_RANKERS]


def score_all(data: HeadAuditData, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Suspicion scores of every requested ranker (default: all available), checked finite."""
    names = available_rankers(data) if names is None else names
    out = {}
    for name in names:
        if name not in RANKERS:
            raise ValueError(f"unknown ranker {name!r}; choose from {', '.join(RANKERS)}")
        s = np.asarray(RANKERS[name](data), dtype=np.float64)
        if not np.isfinite(s).all():
            raise FloatingPointError(f"ranker {name!r} produced non-finite scores")
        out[name] = s
    return out
