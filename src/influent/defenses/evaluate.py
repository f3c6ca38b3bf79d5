"""Scoring rankers on runs with known bad examples: detection metrics and the effect of cleaning.

Two experiments on the head, every ranker on the same run (same poisoned training set, same model):

* :func:`mislabel_experiment`: a fraction of training labels flipped at random; recall when the top
  5/10/20/30% are checked; accuracy after *fixing* the flagged labels among the top 10% and retraining.
* :func:`trigger_defense`: dirty-label trigger poisons; detection metrics; clean accuracy and attack
  success after *removing* the top k and retraining.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from influent.defenses.inputs import head_audit_inputs
from influent.defenses.rankers import available_rankers, score_all
from influent.evaluation.detection import detection_metrics, ranking
from influent.models.head import predict
from influent.models.head_data import HeadData

MISLABEL_CHECKED = (0.05, 0.10, 0.20, 0.30)


def remove_and_retrain(
    exp: HeadData,
    x: torch.Tensor,
    y: torch.Tensor,
    order: np.ndarray,
    k: int,
    evaluate: Callable,
    init=None,
) -> dict:
    """Drop the ``k`` most suspicious training examples (``order`` from most suspicious), retrain, evaluate."""
    keep = np.sort(order[k:])
    keep_t = torch.as_tensor(keep)
    model = exp.fit(x[keep_t], y[keep_t], init=init)
    return evaluate(model)


def random_label_noise(
    y: torch.Tensor, rate: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``y`` with ``round(rate * n)`` labels (seeded) moved to a uniformly chosen other class; returns the indices."""
    rng = np.random.default_rng(seed + 101)
    n = len(y)
    idx = np.sort(rng.choice(n, round(rate * n), replace=False))
    noisy = y.clone()
    shift = torch.as_tensor(rng.integers(1, num_classes, size=len(idx)))
    noisy[torch.as_tensor(idx)] = (y[torch.as_tensor(idx)] + shift) % num_classes
    return noisy, idx


def mislabel_experiment(
    exp: HeadData,
    rate: float = 0.10,
    rankers: list[str] | None = None,
    checked=MISLABEL_CHECKED,
    fix_fraction: float = 0.10,
    damping: float = 0.0,
) -> dict:
    """Flip ``rate`` of the training labels at random and score every ranker on that run.

    Queries for the query rankers: the whole validation half with its clean labels (the model's
    misclassified validation reviews alone are *helped* by symmetric label noise, which lowers confidence,
    so they point the wrong way; see docs/poison.md).

    Returns:
        ``{'seed', 'n', 'n_flipped', 'accuracy_clean_model', 'accuracy_noisy_model', 'rankers': {name: {auroc,
        auprc, recall@..., 'accuracy_after_fix', 'seconds'}}}``.
    """
    y_noisy, flipped = random_label_noise(exp.train_y, rate, exp.num_classes, exp.seed)
    is_bad = np.zeros(exp.n, dtype=bool)
    is_bad[flipped] = True
    clean = exp.fit()
    noisy = exp.fit(exp.train_x, y_noisy, init=clean)
    data = head_audit_inputs(
        exp.train_x, y_noisy, exp.num_classes, exp.l2, model=noisy, query_x=exp.val_x, query_y=exp.val_y,
        damping=damping, seed=exp.seed,
    )
    out = {
        "seed": exp.seed,
        "n": exp.n,
        "n_flipped": int(is_bad.sum()),
        "rate": rate,
        "accuracy_clean_model": exp.clean_accuracy(clean),
        "accuracy_noisy_model": exp.clean_accuracy(noisy),
        "rankers": {},
    }
    k_fix = round(fix_fraction * exp.n)
    for name in rankers or available_rankers(data):
        t = time.perf_counter()
        scores = score_all(data, [name])[name]
        seconds = time.perf_counter() - t
        row = detection_metrics(scores, is_bad, fractions=checked, seed=exp.seed)
        top = ranking(scores, exp.seed)[:k_fix]
        fixed = y_noisy.clone()
        fix = torch.as_tensor(top[is_bad[top]])
        if len(fix):
            fixed[fix] = exp.train_y[fix]
        row["accuracy_after_fix"] = exp.clean_accuracy(exp.fit(exp.train_x, fixed, init=noisy))
        row["seconds"] = seconds
        out["rankers"][name] = row
    return out


def trigger_defense(
    exp: HeadData,
    poison,
    rankers: list[str] | None = None,
    remove_fractions=(0.01, 0.02, 0.05),
    damping: float = 0.0,
) -> dict:
    """Score every ranker against known trigger poisons; remove the top k (k = |poison|, fractions) and retrain.

    ``poison``: a poisoned training set with its triggered inputs (e.g.
    :class:`~influent.attacks.trigger.TriggerPoison`: ``train_x``, ``train_y``, ``is_poison(n)``,
    ``triggered_val_x``, ``triggered_eval_x``, ``source``, ``target``, ``trigger``).

    Queries: the validation half's source-class reviews with the trigger inserted, at their true
    (source) label (the defender names the suspected trigger). Rankers that do not use queries
    (self-influence, loss, cleanlab, spectral ...) never see the trigger.
    """
    x, y = poison.train_x, poison.train_y
    is_bad = poison.is_poison(exp.n)
    clean = exp.fit()
    model = exp.fit(x, y, init=clean)
    qy = torch.full((len(poison.triggered_val_x),), poison.source, dtype=torch.long)
    data = head_audit_inputs(
        x, y, exp.num_classes, exp.l2, model=model, query_x=poison.triggered_val_x, query_y=qy, damping=damping,
        seed=exp.seed,
    )

    def evaluate(m):
        return {"clean_accuracy": exp.clean_accuracy(m), "attack_success": _success_rate(m, poison)}

    out = {
        "seed": exp.seed,
        "n_poison": int(is_bad.sum()),
        "trigger": poison.trigger,
        "control": evaluate(clean),
        "poisoned": evaluate(model),
        "rankers": {},
    }
    ks = {"k=n_poison": int(is_bad.sum())}
    ks.update({f"{100 * f:g}%": round(f * exp.n) for f in remove_fractions})
    for name in rankers or available_rankers(data):
        t = time.perf_counter()
        scores = score_all(data, [name])[name]
        row = detection_metrics(scores, is_bad, seed=exp.seed)
        row["seconds"] = time.perf_counter() - t
        order = ranking(scores, exp.seed)
        row["after_removal"] = {
            kn: remove_and_retrain(exp, x, y, order, k, evaluate, init=model) for kn, k in ks.items()
        }
        out["rankers"][name] = row
    return out


def _success_rate(model, poison) -> float:
    """Fraction of the triggered source-class evaluation reviews the head assigns to the target class."""
    return float((predict(model, poison.triggered_eval_x) == poison.target).double().mean())
