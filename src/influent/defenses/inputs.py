"""The rankers' inputs for each model kind: where the ``head | finetuned`` difference of the audit lives.

* :func:`head_audit_inputs`: the logistic head on frozen features: exact Hessian influence
  (:class:`~influent.influence.ExactInfluence`), identity-curvature checkpoints at the first Newton iterates
  from the zero init plus the final model (TracIn), and :class:`HeadBaselines` (k-fold Newton refits).
* :func:`factored_audit_inputs`: any model with factored curvature
  (:class:`~influent.factored_influence.FactoredInfluence`, e.g. the fine-tuned suffix classifier), an
  identity-curvature checkpoint of the final model, and any model side (e.g. :class:`SuffixBaselines`,
  k-fold re-fine-tuning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from influent.curvature.config import FactorConfig
from influent.defenses.rankers import AuditInputs, BaselineModel
from influent.factored_influence import FactoredInfluence
from influent.influence import ExactInfluence
from influent.models.head import HeadTask, LogisticHead, probabilities
from influent.models.refit import fit_head
from influent.task import Batch, Task, slice_batch


def stratified_folds(labels: np.ndarray, folds: int, seed: int):
    """``(fit, held)`` index pairs of a seeded stratified k-fold split (shared by every model kind)."""
    return StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)


@dataclass
class HeadBaselines:
    """The head's side of the baselines: its features, labels and k-fold refits (warm-started Newton).

    Attributes:
        train_x, train_y: the (possibly poisoned) training set, float64 ``[n, d]`` and int64 ``[n]``.
        num_classes, l2: the head's classes and ridge coefficient.
        model: the head trained on exactly this training set (warm start of the refits).
        folds, seed: the k-fold split.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int
    l2: float
    model: LogisticHead
    folds: int = 5
    seed: int = 0
    _oof: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return self.train_y.numpy()

    def oof_probabilities(self) -> np.ndarray:
        """Out-of-fold class probabilities ``[n, K]`` from k-fold retraining of the head."""
        if self._oof is None:
            probs = np.zeros((len(self.train_y), self.num_classes))
            for fit_idx, held in stratified_folds(self.labels, self.folds, self.seed):
                fit_idx, held = torch.as_tensor(fit_idx), torch.as_tensor(held)
                m, _ = fit_head(
                    self.train_x[fit_idx], self.train_y[fit_idx], self.num_classes, self.l2, init=self.model
                )
                probs[held.numpy()] = probabilities(m, self.train_x[held]).numpy()
            self._oof = probs
        return self._oof

    def representations(self) -> np.ndarray:
        """The frozen embeddings ``[n, d]``."""
        return self.train_x.numpy()


def newton_checkpoints(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, l2: float, count: int
) -> list[LogisticHead]:
    """The first ``count`` Newton iterates of the head from the zero init (its training trajectory)."""
    return [
        fit_head(train_x, train_y, num_classes, l2, max_iter=it, tol=0.0)[0] for it in range(1, count + 1)
    ]


def head_audit_inputs(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    model: LogisticHead | None = None,
    query_x: torch.Tensor | None = None,
    query_y: torch.Tensor | None = None,
    damping: float = 0.0,
    folds: int = 5,
    seed: int = 0,
    tracin_checkpoints: int = 4,
) -> AuditInputs:
    """The rankers' inputs for a logistic head on frozen features.

    Args:
        train_x, train_y: the (possibly poisoned) training set, float64 ``[n, d]`` and int64 ``[n]``.
        num_classes, l2: K and the ridge coefficient of the head's objective.
        model: the head trained on exactly this training set (trained here if None).
        query_x, query_y: queries with the labels they should get, or None (or no rows: no queries).
        damping: added to the Hessian before inverting (0 is fine: the objective has l2).
        folds: k of the k-fold out-of-fold baselines.
        seed: seeds random, the folds and tie-breaking.
        tracin_checkpoints: Newton iterates (from the zero init) used by ``tracin_self`` (0: final only).
    """
    x, y = train_x.double(), torch.as_tensor(train_y).long()
    if model is None:
        model, _ = fit_head(x, y, num_classes, l2)
    task = HeadTask(l2)
    method = ExactInfluence(model, task, (x, y), damping=damping)
    path = newton_checkpoints(x, y, num_classes, l2, tracin_checkpoints) if tracin_checkpoints else []
    checkpoints = [ExactInfluence(m, task, (x, y), curvature="identity") for m in [model, *path]]
    has_queries = query_x is not None and len(query_x) > 0
    queries = (query_x.double(), torch.as_tensor(query_y).long()) if has_queries else None
    baselines = HeadBaselines(x, y, num_classes, float(l2), model, folds, seed)
    return AuditInputs(method, baselines, checkpoints, queries, seed)


def factored_audit_inputs(
    model: torch.nn.Module,
    task: Task,
    train_batches: Sequence[Batch],
    baselines: BaselineModel | None = None,
    *,
    config: FactorConfig | None = None,
    queries: Batch | list[Batch] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AuditInputs:
    """The rankers' inputs for a model with factored curvature over its linear modules.

    Args:
        model, task, train_batches: the trained model, its task and its (audited) training data.
        baselines: the model side of the baselines (None: influence rankers, ``loss`` and ``random`` only).
        config: the curvature (default EK-FAC over the trainable linear modules).
        queries: query batches with the labels they should get, or None.
        seed: seeds ``random`` and tie-breaking.
    """
    config = config or FactorConfig(strategy="ekfac", modules="trainable")
    method = FactoredInfluence(model, task, train_batches, config, progress=progress)
    plain = FactoredInfluence(
        model, task, train_batches, FactorConfig(strategy="identity", modules=config.modules, damping=1.0),
        progress=progress,
    )
    return AuditInputs(method, baselines, [plain], queries, seed)


@dataclass
class SuffixBaselines:
    """A fine-tuned :class:`~influent.models.suffix_classifier.SuffixClassifier`'s side of the baselines.

    Attributes:
        classifier: the classifier (its seeded re-fine-tuning replays the same schedule).
        batch: its cached training batch (the labels in it are the ones trained on).
        folds, seed: the k-fold split.
    """

    classifier: object
    batch: dict
    num_classes: int
    folds: int = 3
    seed: int = 0
    _oof: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return self.batch["labels"].numpy()

    def oof_probabilities(self) -> np.ndarray:
        """Out-of-fold class probabilities ``[n, K]`` from k-fold re-fine-tuning."""
        if self._oof is None:
            oof = np.zeros((len(self.labels), self.num_classes))
            for fit_idx, held in stratified_folds(self.labels, self.folds, self.seed):
                theta, _ = self.classifier.fit(self.batch, torch.as_tensor(fit_idx))
                held_batch = slice_batch(self.batch, torch.as_tensor(held))
                oof[held] = self.classifier.logits(theta, held_batch).softmax(-1).double().numpy()
            self._oof = oof
        return self._oof

    def representations(self) -> None:
        """None: no fixed input representation (the spectral-signature baseline does not apply)."""
        return
