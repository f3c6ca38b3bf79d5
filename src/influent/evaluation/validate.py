"""``influent validate``: which question do the influence scores answer, and how well?

For a few queries, the estimated change of each query's loss when a training example is removed
(``score / n``) is compared with three ground truths (see :mod:`influent.evaluation.groundtruth`):
leave-one-out retraining from the original initialisation (cold), from the trained parameters (warm), and
the PBRF (Bae et al. 2022), for top-scored, bottom-scored and random training examples; plus the linear
datamodeling score over random half-size subsets. Outputs in ``out``: ``validate.json``, ``validate.md``
(tables) and ``scatter-<ground truth>.png``.

Two settings:

* ``model='head'`` (:func:`validate_exact`): the frozen-encoder logistic head, exact/CG/LiSSA solves of the
  exact Hessian; retraining is Newton to the optimum (cold start = the zero initialisation).
* ``model='finetuned'`` (:func:`validate_factored`): a transformer classifier fine-tuned in its last k
  layers; scores from identity/diagonal/K-FAC/EK-FAC curvature; cold start replays the fine-tuning (same
  initial weights, AdamW, epochs and seed); warm start continues AdamW from the trained weights; PBRF by
  L-BFGS over the trainable parameters.

The gap between influence and cold leave-one-out is decomposed where it can be measured: warm vs cold
start, damping (estimate with vs without), convergence (gradient norm at the trained parameters),
linearisation (influence vs PBRF) and solver error (residual and cosine to the exact solve).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent.data.split import stratified_sample
from influent.evaluation.groundtruth import GroundTruth
from influent.evaluation.lds import lds, random_subsets
from influent.evaluation.metrics import correlations, relative_error
from influent.gradients import ParameterSpace, full_gradient
from influent.models.training import NewtonTrainer, Trainer
from influent.store import write_json
from influent.task import Batch, Task

GROUND_TRUTHS = ("loo_cold", "loo_warm", "pbrf")
TITLES = {"loo_cold": "leave-one-out, cold start", "loo_warm": "leave-one-out, warm start", "pbrf": "PBRF"}


# ----------------------------------------------------------------------------------------------- selection
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


# -------------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def markdown_report(result: dict) -> str:
    """The tables of a :func:`validate_exact` / :func:`validate_factored` result as Markdown."""
    lines = [f"# influent validate: {result['model']}", ""]
    s = result["settings"]
    lines.append(
        "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list))) + "."
    )
    lines += [
        "",
        (
            "Pearson / Spearman between the estimated change of the query loss when an example is removed "
            "(`score / n`) and the actual change, per query then averaged (pooled over all example x query "
            "pairs in brackets). LDS: mean over queries of the Spearman correlation over retrained subsets."
        ),
        "",
    ]
    gts = [g for g in GROUND_TRUTHS if g in result["ground_truth"]]
    head = "| estimate | " + " | ".join(f"{TITLES[g]} P / S" for g in gts) + " | LDS |"
    lines += [head, "|" + "---|" * (len(gts) + 2)]
    for name, row in result["estimates"].items():
        cells = []
        for g in gts:
            c = row["vs"].get(g)
            cells.append(
                "n/a"
                if c is None
                else f"{_fmt(c['pearson_per_query'])} / {_fmt(c['spearman_per_query'])} "
                f"({_fmt(c['pearson'])} / {_fmt(c['spearman'])})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(row.get('lds'))} |")
    gap = result.get("gap", {})
    if gap:
        lines += [
            "",
            "## Gap decomposition (Bae et al. 2022)",
            "",
            "| part | measurement | value |",
            "|---|---|---|",
        ]
        for part, items in gap.items():
            for key, value in items.items():
                v = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"| {part} | {key} | {v} |")
    lines += ["", "Scatter plots: " + ", ".join(f"`{p}`" for p in result.get("plots", [])), ""]
    return "\n".join(lines)


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "validate.json", result)
    text = markdown_report(result)
    tmp = out / ".validate.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "validate.md")


def _plots(
    out: Path, estimate: np.ndarray, truths: dict[str, np.ndarray], kinds: list[str], label: str
) -> list[str]:
    from influent.report.scatter import scatter_png

    paths = []
    for g, actual in truths.items():
        c = correlations(estimate, actual)
        note = f"Pearson  {c['pearson']:.3f}\nSpearman {c['spearman']:.3f}\n(pooled, {c['pairs']} pairs)"
        p = scatter_png(
            out / f"scatter-{g.replace('_', '-')}.png",
            estimate,
            actual,
            title=f"{label} vs {TITLES[g]}",
            groups=kinds,
            note=note,
        )
        paths.append(p.name)
    return paths


# ---------------------------------------------------------------------------------------- exact (the head)
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
    solvers: Sequence[str] = ("exact", "cg", "lissa"),
    damping: float = 0.0,
    gap_damping: float | None = None,
    lissa_depth: int = 500,
    seed: int = 0,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    label: str = "head",
    extra_settings: dict | None = None,
) -> dict:
    """Influence vs retraining for a model whose Hessian can be formed (e.g. the logistic head).

    Args:
        model, task: the trained model (at the optimum of ``task``'s objective) and its task.
        train_batch: the n training examples; query_batch: the Q queries.
        trainer: retraining procedure (default :class:`NewtonTrainer`, cold start = zeros).
        examples: training examples retrained without (a third top, a third bottom, the rest random).
        subsets: random subsets for the LDS (0 skips it); subset_fraction: their size relative to n.
        solvers: inverse-Hessian solvers compared (``exact``, ``cg``, ``lissa``).
        damping: damping of the influence estimate and of the PBRF proximity term.
        gap_damping: damping used to measure the damping part of the gap (default: ``damping`` if > 0,
            else ``0.1 x`` the mean eigenvalue of the Hessian).
        lissa_depth: LiSSA recursion depth.
        seed: seeds the example and subset draws.
        out: output folder (None: nothing written).
        cache_dir: retraining cache root (None: no cache).
        progress: progress bars.

    Returns:
        The result dict written to ``validate.json``.
    """
    from influent.influence import ExactInfluence, SolverOptions

    t0 = time.perf_counter()
    trainer = trainer or NewtonTrainer(model, task)
    n = task.batch_size(train_batch)
    options = SolverOptions(lissa_depth=lissa_depth, seed=seed)
    scores: dict[str, np.ndarray] = {}
    solver_info: dict[str, dict] = {}
    s_tests: dict[str, torch.Tensor] = {}
    for solver in solvers:
        eng = ExactInfluence(model, task, train_batch, solver=solver, damping=damping, options=options)
        start = time.perf_counter()
        sc = eng.pairwise_scores(query_batch)
        sol = eng.last_solution
        scores[solver] = sc.numpy()
        s_tests[solver] = sol.x
        solver_info[solver] = {
            "residual": sol.residual,
            "iterations": sol.iterations,
            "seconds": time.perf_counter() - start,
        }
        if solver == solvers[0]:
            hessian = eng.curvature_matrix
            train_grads = eng.train_grads
            query_grads = eng.query_grads(query_batch)
    ref = "exact" if "exact" in scores else solvers[0]
    change = {k: v / n for k, v in scores.items()}
    idx, kinds = select_examples(change[ref], examples, seed)
    gt = GroundTruth(
        model,
        task,
        train_batch,
        query_batch,
        trainer,
        damping=damping,
        cache_dir=cache_dir,
        progress=progress,
    )
    truths = {
        "loo_cold": gt.leave_one_out(idx, "cold"),
        "loo_warm": gt.leave_one_out(idx, "warm"),
        "pbrf": gt.pbrf(idx),
    }
    lds_values: dict[str, float] = {}
    lds_info: dict = {}
    if subsets > 0:
        masks = random_subsets(n, subsets, subset_fraction, seed)
        actual = gt.remove_groups(masks, "warm")
        for name, sc in scores.items():
            lds_values[name], _ = lds(sc, masks, actual)
        lds_info = {"subsets": subsets, "fraction": subset_fraction, "start": "warm"}

    estimates = {}
    for name in scores:
        est = change[name][:, idx].T
        row = {"vs": {g: correlations(est, a) for g, a in truths.items()}, **solver_info[name]}
        if name in lds_values:
            row["lds"] = lds_values[name]
        if name != ref:
            row["cosine_to_exact"] = float(
                torch.nn.functional.cosine_similarity(s_tests[name], s_tests[ref], dim=0).min()
            )
        estimates[f"{name} (damping {damping:g})"] = row

    # ---- gap decomposition
    space = ParameterSpace(model, task)
    theta_s = space.flat()
    grad_norm = float(full_gradient(space, theta_s, train_batch).norm())
    cold, warm, pbrf = truths["loo_cold"], truths["loo_warm"], truths["pbrf"]
    est_ref = change[ref][:, idx].T
    if gap_damping is None:
        gap_damping = damping if damping > 0 else 0.1 * float(torch.diagonal(hessian).mean())
    H0 = hessian
    Hd = hessian + gap_damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    sub = train_grads[idx]
    undamped = (query_grads @ torch.linalg.solve(H0, sub.T)).numpy().T / n
    damped = (query_grads @ torch.linalg.solve(Hd, sub.T)).numpy().T / n
    gap = {
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
            "gradient norm of the objective at theta_s": grad_norm,
            "norm of theta_s (for scale)": float(theta_s.norm()),
        },
        "linearisation": {
            "relative error of influence vs PBRF": relative_error(est_ref, pbrf),
            "relative error of PBRF vs warm LOO": relative_error(pbrf, warm),
            "relative error of influence vs cold LOO": relative_error(est_ref, cold),
        },
        "solver": {f"{name}: residual": solver_info[name]["residual"] for name in scores}
        | {
            f"{name}: cosine of H^-1 g_query to exact": estimates[f"{name} (damping {damping:g})"].get(
                "cosine_to_exact", 1.0
            )
            for name in scores
        },
    }
    label_full = f"{label}: {ref} influence"
    result = {
        "model": label,
        "settings": {
            "n_train": n,
            "queries": task.batch_size(query_batch),
            "examples": len(idx),
            "subsets": subsets,
            "damping": damping,
            "lissa_depth": lissa_depth,
            "seed": seed,
            "l2": task.l2,
            "cold start": "Newton from the original (zero) initialisation",
            "warm start": "Newton from the trained parameters",
            "LDS retraining": "warm start (same optimum: strongly convex)",
            **(extra_settings or {}),
        },
        "estimates": estimates,
        "ground_truth": {g: a.tolist() for g, a in truths.items()},
        "examples": {"indices": idx, "kinds": kinds},
        "estimated_change": {k: v[:, idx].T.tolist() for k, v in change.items()},
        "lds": lds_info,
        "gap": gap,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        out = Path(out)
        result["plots"] = _plots(out, est_ref, truths, kinds, label_full)
        _write(result, out)
    return result


# -------------------------------------------------------------------------------------------- entry point
def run_validate(
    model: str = "head",
    *,
    strategies: Sequence[str] = ("identity", "diagonal", "kfac", "ekfac"),
    solvers: Sequence[str] = ("exact", "cg", "lissa"),
    examples: int = 30,
    subsets: int = 50,
    queries: int = 5,
    epochs: int = 1,
    fine_tune_last: int = 1,
    train_size: int | None = None,
    damping: float | None = None,
    out: str | Path = "validate",
    seed: int = 0,
    setup=None,
    data: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Run the fidelity comparison and write ``out/validate.{json,md}`` and ``out/scatter-*.png``.

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
        out: output folder.
        seed: seeds the split, the slices, the draws and the training.
        setup: a prepared :class:`~influent.pipeline.HeadSetup` (head only; else built with
            :func:`~influent.pipeline.prepare_head` from ``data``/``cache_dir``/``seed``).
        data: corpus spec (None: bundled Rotten Tomatoes).
        cache_dir: cache root (retraining results go under ``cache_dir/validate``).
        progress: progress bars.
        **kwargs: passed to :func:`validate_exact` / :func:`validate_factored`.

    Raises:
        UserError: on a bad option.
    """
    from influent.errors import UserError
    from influent.store import default_cache_dir

    for name, value, low in (
        ("--examples", examples, 3),
        ("--subsets", subsets, 0),
        ("--queries", queries, 1),
        ("--epochs", epochs, 1),
        ("--fine-tune-last", fine_tune_last, 1),
    ):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if 0 < subsets < 10:
        raise UserError(
            f"--subsets must be 0 (skip the LDS) or >= 10 for a meaningful rank correlation, got {subsets}"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model == "head":
        bad = [s for s in solvers if s not in ("exact", "cg", "lissa")]
        if bad:
            raise UserError(f"--solver: expected exact, cg or lissa, got {bad[0]!r}")
        if setup is None:
            from influent.pipeline import prepare_head

            setup = prepare_head(data, seed=seed, cache_dir=cache, progress=progress)
        train_x, train_y = setup.train_x, setup.train_y
        if train_size is not None and train_size < len(train_y):
            keep = torch.as_tensor(stratified_sample(train_y.numpy(), train_size, seed))
            train_x, train_y = train_x[keep], train_y[keep]
            from influent.models.head import train_head

            head, task, _ = train_head(train_x, train_y, setup.model.num_classes, setup.task.l2)
        else:
            head, task = setup.model, setup.task
        rng = np.random.default_rng(seed)
        q = torch.as_tensor(
            np.sort(rng.choice(len(setup.test_y), min(queries, len(setup.test_y)), replace=False))
        )
        query_batch = (setup.test_x[q], setup.test_y[q])
        return validate_exact(
            head,
            task,
            (train_x, train_y),
            query_batch,
            examples=examples,
            subsets=subsets,
            solvers=solvers,
            damping=0.0 if damping is None else damping,
            seed=seed,
            out=out,
            cache_dir=cache / "validate",
            progress=progress,
            label="head",
            extra_settings={"data": setup.info.get("data"), "encoder": setup.info.get("encoder")},
            **kwargs,
        )
    if model == "finetuned":
        from influent.evaluation.finetuned import validate_finetuned

        return validate_finetuned(
            strategies=strategies,
            examples=examples,
            subsets=subsets,
            queries=queries,
            epochs=epochs,
            fine_tune_last=fine_tune_last,
            train_size=1000 if train_size is None else train_size,
            damping=damping,
            out=out,
            seed=seed,
            data=data,
            cache_dir=cache,
            progress=progress,
            **kwargs,
        )
    raise UserError(f"--model: expected head or finetuned, got {model!r}")


__all__ = ["markdown_report", "run_validate", "select_examples", "validate_exact"]
