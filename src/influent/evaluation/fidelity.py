"""The one fidelity evaluation behind ``influent validate``, for any model, over the influence protocol.

For a few queries, the estimated change of each query's measurement when a training example is removed
(:meth:`~influent.influence.InfluenceMethod.loss_change`, ``score / n``) is compared with three ground truths
(:mod:`influent.evaluation.groundtruth`): leave-one-out retraining from the original initialisation (cold),
from the trained parameters (warm), and the PBRF (Bae et al. 2022), for top-scored, bottom-scored and random
training examples; plus the linear datamodeling score (LDS) over random subsets.

:func:`evaluate_fidelity` is that skeleton. What depends on the model comes from a :class:`FidelitySubject`:
the :class:`~influent.influence.InfluenceMethod` s compared, the queries, the retraining
(:class:`~influent.evaluation.groundtruth.GroundTruth` with its trainer), the settings recorded and the gap
decomposition that can be measured for that model. The frozen-encoder head
(:class:`~influent.evaluation.validate.HeadFidelity`) and the fine-tuned classifier
(:class:`~influent.evaluation.finetuned.FinetunedFidelity`) are the two subjects; a new model kind is one more.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from influent.evaluation.groundtruth import GroundTruth
from influent.evaluation.lds import lds, random_subsets
from influent.evaluation.metrics import correlations
from influent.influence import InfluenceMethod
from influent.task import Batch

GROUND_TRUTHS = ("loo_cold", "loo_warm", "pbrf")
"""Ground truths in report order: cold-start LOO, warm-start LOO, the PBRF."""


def select_examples(change: np.ndarray, count: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """Training examples to retrain without: a third top-scored, a third bottom-scored, the rest random.

    Top/bottom are taken round-robin over queries (each query's largest / most negative estimated change
    not yet chosen); random ones are drawn from the rest with ``seed``.

    Args:
        change: estimated changes ``[Q, n]``.
        count: number of examples (at most n).

    Returns:
        ``(indices, kinds)`` with kinds ``'top'``, ``'bottom'`` or ``'random'``.
    """
    change = np.asarray(change)
    q, n = change.shape
    count = min(count, n)
    n_top = n_bottom = count // 3
    chosen: list[int] = []
    kinds: list[str] = []
    for kind, k, order in (
        ("top", n_top, np.argsort(-change, axis=1)),
        ("bottom", n_bottom, np.argsort(change, axis=1)),
    ):
        pos = [0] * q
        taken = 0
        while taken < k:
            progressed = False
            for j in range(q):
                while pos[j] < n and int(order[j, pos[j]]) in chosen:
                    pos[j] += 1
                if pos[j] < n and taken < k:
                    chosen.append(int(order[j, pos[j]]))
                    kinds.append(kind)
                    taken += 1
                    progressed = True
            if not progressed:
                break
    rest = np.setdiff1d(np.arange(n), chosen)
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, min(count - len(chosen), len(rest)), replace=False)
    chosen += [int(i) for i in extra]
    kinds += ["random"] * len(extra)
    return chosen, kinds


@dataclass
class ScoredMethods:
    """The compared influence methods and their scores on the queries.

    Attributes:
        methods: name -> fitted method (report order).
        reference: the name whose estimates choose the examples and feed the gap decomposition.
        scores: name -> pairwise scores ``[Q, n]`` (positive = proponent).
        change: name -> estimated change of the query measurement on removal ``[Q, n]`` (``score / n``).
        seconds: name -> wall-clock seconds of fitting and scoring.
    """

    methods: dict[str, InfluenceMethod]
    reference: str
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    change: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return self.methods[self.reference].n_train


@dataclass
class FidelityRun:
    """Everything measured by :func:`evaluate_fidelity`, handed to the subject for its settings and gap.

    Attributes:
        scored: the methods and their scores.
        indices, kinds: the training examples retrained without and why each was chosen.
        truths: ground truth -> actual change ``[k, Q]`` (rows follow ``indices``).
        ground_truth: the retraining object (its ``infos`` hold the trainers' diagnostics).
        estimates: report name -> row (correlations with each ground truth, LDS, method diagnostics).
        subsets, subset_fraction: the LDS design (0 subsets: no LDS).
    """

    scored: ScoredMethods
    indices: list[int]
    kinds: list[str]
    truths: dict[str, np.ndarray]
    ground_truth: GroundTruth
    estimates: dict[str, dict]
    subsets: int
    subset_fraction: float

    def estimate(self, name: str) -> np.ndarray:
        """Estimated change ``[k, Q]`` of method ``name`` for the selected examples (rows follow ``indices``)."""
        return self.scored.change[name][:, self.indices].T


class FidelitySubject(ABC):
    """The model side of a fidelity evaluation.

    Attributes:
        label: the ``model`` entry of the result (``'head'``, ``'finetuned'``).
        queries: the query batch every method scores and every retraining measures.
        lds_start: start of the LDS subset retraining (``'cold'`` or ``'warm'``).
        record_lds_design: write the LDS design (subsets, fraction, start) as the result's ``lds`` entry.
    """

    label: str
    queries: Batch
    lds_start: str = "cold"
    record_lds_design: bool = False

    @abstractmethod
    def methods(self) -> dict[str, InfluenceMethod]:
        """The influence methods compared, by name (report order)."""

    @abstractmethod
    def reference(self, names: list[str]) -> str:
        """Which of ``names`` chooses the examples and is decomposed in the gap."""

    @abstractmethod
    def ground_truth(self, scored: ScoredMethods) -> GroundTruth:
        """The retraining ground truth (built after scoring: its PBRF damping may come from the methods)."""

    def estimate_name(self, name: str) -> str:
        """The row name of method ``name`` in the result's ``estimates``."""
        return name

    @abstractmethod
    def estimate_info(self, name: str, scored: ScoredMethods) -> dict:
        """Diagnostics of method ``name`` added to its row (residual, damping, seconds, ...)."""

    def agreement_with_reference(self, name: str, scored: ScoredMethods) -> dict:
        """How method ``name`` agrees with the reference method, added to its row after the LDS (default none)."""
        return {}

    @abstractmethod
    def settings(self, run: FidelityRun) -> dict:
        """The result's ``settings`` entry."""

    @abstractmethod
    def gap(self, run: FidelityRun) -> dict:
        """The result's ``gap`` entry: the parts of the influence-vs-retraining gap measurable here."""

    def example_info(self, indices: list[int]) -> dict:
        """Extra entries of the result's ``examples`` (e.g. the corpus rows of the chosen examples)."""
        return {}

    @abstractmethod
    def plot_title(self, reference: str) -> str:
        """Title prefix of the scatter plots of the reference method."""


def score_methods(subject: FidelitySubject) -> ScoredMethods:
    """Fit every method of ``subject``, score its queries, and convert the scores to estimated changes."""
    methods = subject.methods()
    scored = ScoredMethods(methods, subject.reference(list(methods)))
    for name, method in methods.items():
        start = time.perf_counter()
        scores = method.fit().pairwise_scores(subject.queries)
        scored.seconds[name] = time.perf_counter() - start
        scored.scores[name] = scores.numpy()
        scored.change[name] = method.loss_change(scores).numpy()
    return scored


def retraining_truths(gt: GroundTruth, indices: list[int]) -> dict[str, np.ndarray]:
    """Actual change ``[k, Q]`` under cold and warm leave-one-out and the PBRF for each example of ``indices``."""
    return {
        "loo_cold": gt.leave_one_out(indices, "cold"),
        "loo_warm": gt.leave_one_out(indices, "warm"),
        "pbrf": gt.pbrf(indices),
    }


def linear_datamodeling_scores(
    gt: GroundTruth, scored: ScoredMethods, subsets: int, fraction: float, seed: int, start: str
) -> dict[str, float]:
    """LDS of each method over ``subsets`` random subsets of relative size ``fraction``, retrained from ``start``."""
    if subsets <= 0:
        return {}
    masks = random_subsets(scored.n_train, subsets, fraction, seed)
    actual = gt.remove_groups(masks, start)
    return {name: lds(sc, masks, actual)[0] for name, sc in scored.scores.items()}


def estimate_rows(
    subject: FidelitySubject,
    scored: ScoredMethods,
    indices: list[int],
    truths: dict[str, np.ndarray],
    lds_values: dict[str, float],
) -> dict[str, dict]:
    """One row per method: correlations with each ground truth, the subject's diagnostics, the LDS, the
    agreement with the reference method."""
    rows = {}
    for name in scored.methods:
        est = scored.change[name][:, indices].T
        row = {"vs": {g: correlations(est, a) for g, a in truths.items()}, **subject.estimate_info(name, scored)}
        if name in lds_values:
            row["lds"] = lds_values[name]
        row.update(subject.agreement_with_reference(name, scored))
        rows[subject.estimate_name(name)] = row
    return rows


def evaluate_fidelity(
    subject: FidelitySubject,
    *,
    examples: int,
    subsets: int,
    subset_fraction: float = 0.5,
    seed: int = 0,
) -> dict:
    """Influence estimates of ``subject``'s methods against retraining (files: :mod:`influent.report.fidelity`).

    Args:
        subject: the model side (methods, queries, retraining, settings, gap).
        examples: training examples retrained without (a third top, a third bottom, the rest random, chosen
            by the reference method's estimates).
        subsets: random subsets retrained for the LDS (0 skips it); subset_fraction: their relative size.
        seed: seeds the example and subset draws.

    Returns:
        The result dict (``model``, ``settings``, ``estimates``, ``ground_truth``, ``examples``,
        ``estimated_change``, [``lds``], ``gap``, ``reference`` (the method the examples were chosen by: its
        ``method`` key in ``estimated_change``, its ``estimate`` row and a plot ``title``), ``seconds``);
        changes in the units of the
        query measurement (nats for a loss), rows of ``ground_truth`` following ``examples.indices``.
    """
    t0 = time.perf_counter()
    scored = score_methods(subject)
    idx, kinds = select_examples(scored.change[scored.reference], examples, seed)
    gt = subject.ground_truth(scored)
    truths = retraining_truths(gt, idx)
    lds_values = linear_datamodeling_scores(gt, scored, subsets, subset_fraction, seed, subject.lds_start)
    rows = estimate_rows(subject, scored, idx, truths, lds_values)
    run = FidelityRun(scored, idx, kinds, truths, gt, rows, subsets, subset_fraction)
    result = {
        "model": subject.label,
        "settings": subject.settings(run),
        "estimates": rows,
        "ground_truth": {g: a.tolist() for g, a in truths.items()},
        "examples": {"indices": idx, "kinds": kinds, **subject.example_info(idx)},
        "estimated_change": {k: v[:, idx].T.tolist() for k, v in scored.change.items()},
    }
    if subject.record_lds_design:
        design = {"subsets": subsets, "fraction": subset_fraction, "start": subject.lds_start}
        result["lds"] = design if subsets > 0 else {}
    result["gap"] = subject.gap(run)
    ref = scored.reference
    result["reference"] = {"method": ref, "estimate": subject.estimate_name(ref), "title": subject.plot_title(ref)}
    result["seconds"] = time.perf_counter() - t0
    return result


__all__ = [
    "GROUND_TRUTHS",
    "FidelityRun",
    "FidelitySubject",
    "ScoredMethods",
    "evaluate_fidelity",
    "select_examples",
]
