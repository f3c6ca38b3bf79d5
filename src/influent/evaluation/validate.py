"""``influent validate``: which question do the influence scores answer, and how well?

The comparison itself (scores vs cold/warm leave-one-out, PBRF and LDS; tables, plots) is
:func:`influent.evaluation.fidelity.evaluate_fidelity`, the same for every model. This module holds the
entry point :func:`run_validate` and the frozen-encoder logistic head's side of it (:class:`HeadFidelity`,
:func:`validate_exact`): exact/CG/LiSSA solves of the exact Hessian; retraining is Newton to the optimum
(cold start = the zero initialisation). The fine-tuned classifier's side is
:mod:`influent.evaluation.finetuned`.

The gap between influence and cold leave-one-out is decomposed where it can be measured: warm vs cold
start, damping (estimate with vs without), convergence (gradient norm at the trained parameters),
linearisation (influence vs PBRF) and solver error (residual and cosine to the exact solve).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent.data.split import stratified_sample
from influent.evaluation.fidelity import FidelityRun, FidelitySubject, ScoredMethods, evaluate_fidelity
from influent.evaluation.finetuned import validate_finetuned
from influent.evaluation.groundtruth import GroundTruth
from influent.evaluation.metrics import correlations, relative_error
from influent.evaluation.options import SOLVERS, ValidateOptions
from influent.gradients import ParameterSpace, full_gradient
from influent.influence import ExactInfluence, SolverOptions
from influent.models.head import train_head
from influent.models.training import NewtonTrainer, Trainer
from influent.pipeline import prepare_head
from influent.store import default_cache_dir
from influent.task import Batch, Task

HEAD_SOLVERS = SOLVERS
"""Inverse-Hessian solvers the head's validation compares."""


class HeadFidelity(FidelitySubject):
    """The head's side of the fidelity evaluation: one :class:`ExactInfluence` per solver, Newton retraining.

    Args:
        model, task: the trained model (at the optimum of ``task``'s objective) and its task.
        train_batch: the n training examples; query_batch: the Q queries.
        trainer: retraining procedure (default :class:`NewtonTrainer`, cold start = zeros).
        solvers: inverse-Hessian solvers compared (``exact``, ``cg``, ``lissa``).
        damping: damping of the influence estimate and of the PBRF proximity term.
        gap_damping: damping used to measure the damping part of the gap (default: ``damping`` if > 0,
            else ``0.1 x`` the mean eigenvalue of the Hessian).
        lissa_depth: LiSSA recursion depth; seed: seeds LiSSA.
        cache_dir: retraining cache root (None: no cache).
        progress: progress bars.
        label: the result's ``model`` entry; extra_settings: added to the result's settings.
    """

    lds_start = "warm"
    record_lds_design = True

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_batch: Batch,
        query_batch: Batch,
        *,
        trainer: Trainer | None = None,
        solvers: Sequence[str] = HEAD_SOLVERS,
        damping: float = 0.0,
        gap_damping: float | None = None,
        lissa_depth: int = 500,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        label: str = "head",
        extra_settings: dict | None = None,
    ):
        self.model, self.task, self.train_batch, self.queries = model, task, train_batch, query_batch
        self.trainer = trainer or NewtonTrainer(model, task)
        self.solvers, self.damping, self.gap_damping = list(solvers), damping, gap_damping
        self.lissa_depth, self.seed = lissa_depth, seed
        self.cache_dir, self.progress = cache_dir, progress
        self.label, self.extra_settings = label, dict(extra_settings or {})

    def methods(self) -> dict[str, ExactInfluence]:
        options = SolverOptions(lissa_depth=self.lissa_depth, seed=self.seed)
        return {
            s: ExactInfluence(self.model, self.task, self.train_batch, solver=s, damping=self.damping, options=options)
            for s in self.solvers
        }

    def reference(self, names: list[str]) -> str:
        return "exact" if "exact" in names else names[0]

    def estimate_name(self, name: str) -> str:
        return f"{name} (damping {self.damping:g})"

    def ground_truth(self, scored: ScoredMethods) -> GroundTruth:
        return GroundTruth(
            self.model, self.task, self.train_batch, self.queries, self.trainer,
            damping=self.damping, cache_dir=self.cache_dir, progress=self.progress,
        )

    def estimate_info(self, name: str, scored: ScoredMethods) -> dict:
        sol = scored.methods[name].last_solution
        return {"residual": sol.residual, "iterations": sol.iterations, "converged": sol.converged,
                "seconds": scored.seconds[name]}

    def agreement_with_reference(self, name: str, scored: ScoredMethods) -> dict:
        """Smallest cosine over queries between this solver's ``(H + damping)^-1 g_query`` and the reference's."""
        if name == scored.reference:
            return {}
        x, ref = scored.methods[name].last_solution.x, scored.methods[scored.reference].last_solution.x
        return {"cosine_to_exact": float(torch.nn.functional.cosine_similarity(x, ref, dim=0).min())}

    def plot_title(self, reference: str) -> str:
        return f"{self.label}: {reference} influence"

    def settings(self, run: FidelityRun) -> dict:
        return {
            "n_train": run.scored.n_train,
            "queries": self.task.batch_size(self.queries),
            "examples": len(run.indices),
            "subsets": run.subsets,
            "damping": self.damping,
            "lissa_depth": self.lissa_depth,
            "seed": self.seed,
            "l2": self.task.l2,
            "cold start": "Newton from the original (zero) initialisation",
            "warm start": "Newton from the trained parameters",
            "LDS retraining": "warm start (same optimum: strongly convex)",
            **self.extra_settings,
        }

    def gap(self, run: FidelityRun) -> dict:
        scored, ref = run.scored, run.scored.reference
        cold, warm, pbrf = run.truths["loo_cold"], run.truths["loo_warm"], run.truths["pbrf"]
        est_ref = run.estimate(ref)
        space = ParameterSpace(self.model, self.task)
        theta_s = space.flat()
        undamped, damped, gap_damping = self._damping_effect(scored.methods[self.solvers[0]], run.indices)
        rows = {self.estimate_name(name): run.estimates[self.estimate_name(name)] for name in scored.methods}
        return {
            "warm vs cold start": {
                "max abs(warm - cold) / max abs(cold)": float(
                    np.abs(warm - cold).max() / max(np.abs(cold).max(), 1e-300)
                ),
                "relative error of warm vs cold": relative_error(warm, cold),
                "Pearson(warm, cold)": correlations(warm, cold)["pearson"],
            },
            "damping": {
                "damping compared": gap_damping,
                "relative change of the estimate": relative_error(damped, undamped),
                "Pearson(undamped, cold LOO)": correlations(undamped, cold)["pearson"],
                "Pearson(damped, cold LOO)": correlations(damped, cold)["pearson"],
            },
            "convergence": {
                "gradient norm of the objective at theta_s": float(
                    full_gradient(space, theta_s, self.train_batch).norm()
                ),
                "norm of theta_s (for scale)": float(theta_s.norm()),
            },
            "linearisation": {
                "relative error of influence vs PBRF": relative_error(est_ref, pbrf),
                "relative error of PBRF vs warm LOO": relative_error(pbrf, warm),
                "relative error of influence vs cold LOO": relative_error(est_ref, cold),
            },
            "solver": {f"{name}: residual": rows[self.estimate_name(name)]["residual"] for name in scored.methods}
            | {f"{name}: converged": rows[self.estimate_name(name)]["converged"] for name in scored.methods}
            | {
                f"{name}: cosine of H^-1 g_query to exact": rows[self.estimate_name(name)].get("cosine_to_exact", 1.0)
                for name in scored.methods
            },
        }

    def _damping_effect(self, engine: ExactInfluence, indices: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """Estimated changes ``[k, Q]`` with the exact Hessian undamped and damped by the gap damping."""
        hessian = engine.curvature_matrix
        gap_damping = self.gap_damping
        if gap_damping is None:
            gap_damping = self.damping if self.damping > 0 else 0.1 * float(torch.diagonal(hessian).mean())
        damped_hessian = hessian + gap_damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
        sub = engine.train_grads[indices]
        query_grads = engine.query_grads(self.queries)
        n = engine.n_train
        undamped = (query_grads @ torch.linalg.solve(hessian, sub.T)).numpy().T / n
        damped = (query_grads @ torch.linalg.solve(damped_hessian, sub.T)).numpy().T / n
        return undamped, damped, gap_damping


def validate_exact(
    model: nn.Module,
    task: Task,
    train_batch: Batch,
    query_batch: Batch,
    *,
    trainer: Trainer | None = None,
    examples: int = 30,
    subsets: int = 50,
    subset_fraction: float = 0.5,
    solvers: Sequence[str] = HEAD_SOLVERS,
    damping: float = 0.0,
    gap_damping: float | None = None,
    lissa_depth: int = 500,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    label: str = "head",
    extra_settings: dict | None = None,
) -> dict:
    """Influence vs retraining for a model whose Hessian can be formed (e.g. the logistic head).

    The arguments of :class:`HeadFidelity`, plus those of :func:`~influent.evaluation.fidelity.evaluate_fidelity`
    (``examples``, ``subsets``, ``subset_fraction``, ``seed``).

    Returns:
        The result dict (:func:`influent.report.fidelity.write_validation` writes its files).
    """
    subject = HeadFidelity(
        model, task, train_batch, query_batch, trainer=trainer, solvers=solvers, damping=damping,
        gap_damping=gap_damping, lissa_depth=lissa_depth, seed=seed, cache_dir=cache_dir, progress=progress,
        label=label, extra_settings=extra_settings,
    )
    return evaluate_fidelity(
        subject, examples=examples, subsets=subsets, subset_fraction=subset_fraction, seed=seed
    )


# -------------------------------------------------------------------------------------------- entry point
def head_problem(setup, train_size: int | None, queries: int, seed: int) -> tuple[nn.Module, Task, Batch, Batch]:
    """The head, its task, its training batch and a seeded draw of ``queries`` test examples.

    With ``train_size`` below the training split's size, the head is retrained on the seeded stratified slice
    (:func:`~influent.data.split.stratified_sample`) of that size.
    """
    train_x, train_y = setup.train_x, setup.train_y
    if train_size is not None and train_size < len(train_y):
        keep = torch.as_tensor(stratified_sample(train_y.numpy(), train_size, seed))
        train_x, train_y = train_x[keep], train_y[keep]
        head, task, _ = train_head(train_x, train_y, setup.model.num_classes, setup.task.l2)
    else:
        head, task = setup.model, setup.task
    rng = np.random.default_rng(seed)
    q = torch.as_tensor(np.sort(rng.choice(len(setup.test_y), min(queries, len(setup.test_y)), replace=False)))
    return head, task, (train_x, train_y), (setup.test_x[q], setup.test_y[q])


def run_validate(
    model: str = "head",
    *,
    strategies: Sequence[str] = ("identity", "diagonal", "kfac", "ekfac"),
    solvers: Sequence[str] = HEAD_SOLVERS,
    examples: int = 30,
    subsets: int = 50,
    queries: int = 5,
    epochs: int = 1,
    fine_tune_last: int = 1,
    train_size: int | None = None,
    damping: float | None = None,
    seed: int = 0,
    setup=None,
    data: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Run the fidelity comparison; :func:`influent.report.fidelity.write_validation` writes its files.

    Args:
        model: ``'head'`` (frozen encoder + logistic head) or ``'finetuned'`` (last k layers fine-tuned).
        strategies: curvature strategies compared for ``finetuned`` (identity, diagonal, kfac, ekfac).
        solvers: solvers compared for ``head`` (exact, cg, lissa).
        examples: training examples retrained without (top/bottom/random thirds).
        subsets: random half-size subsets retrained for the LDS (0 skips it).
        queries: test examples used as queries (seeded draw).
        epochs: fine-tuning epochs (``finetuned``; also those of cold-start retraining).
        fine_tune_last: encoder layers fine-tuned (``finetuned``).
        train_size: training examples used (seeded stratified slice; None = all for the head, 1000 for
            the fine-tuned model).
        damping: influence / PBRF damping (None: 0 for the head; the strategy's heuristic for fine-tuned).
        seed: seeds the split, the slices, the draws and the training.
        setup: a prepared :class:`~influent.pipeline.HeadSetup` (head only; else built with
            :func:`~influent.pipeline.prepare_head` from ``data``/``cache_dir``/``seed``).
        data: corpus spec (None: bundled Rotten Tomatoes).
        cache_dir: cache root (retraining results go under ``cache_dir/validate``).
        progress: progress bars.
        **kwargs: passed to :func:`validate_exact` / :func:`~influent.evaluation.finetuned.validate_finetuned`.

    Raises:
        UserError: on a bad option (:class:`~influent.evaluation.options.ValidateOptions`), naming its field.
    """
    ValidateOptions(
        model, strategies=strategies, solvers=solvers, examples=examples, subsets=subsets, queries=queries,
        epochs=epochs, fine_tune_last=fine_tune_last, train_size=train_size, damping=damping, seed=seed,
    )  # raises UserError naming the field
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model == "finetuned":
        return validate_finetuned(
            strategies=strategies, examples=examples, subsets=subsets, queries=queries, epochs=epochs,
            fine_tune_last=fine_tune_last, train_size=1000 if train_size is None else train_size,
            damping=damping, seed=seed, data=data, cache_dir=cache, progress=progress, **kwargs,
        )
    if setup is None:
        setup = prepare_head(data, seed=seed, cache_dir=cache, progress=progress)
    head, task, train_batch, query_batch = head_problem(setup, train_size, queries, seed)
    return validate_exact(
        head, task, train_batch, query_batch, examples=examples, subsets=subsets, solvers=solvers,
        damping=0.0 if damping is None else damping, seed=seed, cache_dir=cache / "validate",
        progress=progress, label="head",
        extra_settings={"data": setup.info.get("data"), "encoder": setup.info.get("encoder")}, **kwargs,
    )


__all__ = ["HeadFidelity", "head_problem", "run_validate", "validate_exact"]
