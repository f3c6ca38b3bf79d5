"""Label-flip poisoning of the head, ranked by the influence-predicted effect of each flip.

Flipping training example i from label ``y`` to ``y'`` replaces its loss gradient ``g_i(y)`` by ``g_i(y')``;
to first order the optimum moves by

    delta_theta = -(1/n) (H + damping I)^-1 (g_i(y') - g_i(y))

so the attacker's objective ``A(theta)`` changes by ``-(1/n) s^T (g_i(y') - g_i(y))`` with
``s = (H + damping I)^-1 grad A``. Candidates are ranked by this predicted gain (not by |influence|), the
best alternative label is chosen per example, and flips are taken greedily with the model retrained and
the gains recomputed between rounds.

Objectives (all measured on clean labels):

* untargeted: ``A`` = mean loss on the validation half (the attacker never sees the evaluation half);
* targeted: ``A`` = loss of one target review at its true label (the review is then scored on whether
  its prediction flips).

Baselines at the same budget: ``random`` flips and ``max_loss`` flips (the examples whose loss at the
flipped label is largest, i.e. the most confidently fitted ones); for targeted attacks also ``nearest``
(the target's nearest same-class training neighbours, flipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from influent.attacks.experiment import HeadExperiment
from influent.errors import UserError
from influent.influence import ExactInfluence
from influent.models.head import HeadTask, LogisticHead, accuracy, per_example_loss, predict

DEFAULT_BUDGETS = (0.005, 0.01, 0.03, 0.05)
STRATEGIES = ("influence", "random", "max_loss")


@dataclass
class FlipGains:
    """Predicted objective gain of flipping each training example to its best alternative label.

    Attributes:
        gain: ``[n]`` predicted increase of the attacker's objective (nats, first order, after retraining).
        label: ``[n]`` the alternative label achieving it.
    """

    gain: np.ndarray
    label: np.ndarray


def flip_gains(
    model: LogisticHead,
    l2: float,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    objective_x: torch.Tensor,
    objective_y: torch.Tensor,
    damping: float = 0.0,
) -> FlipGains:
    """Influence-predicted gain of every single flip for the objective ``mean_q loss(q)`` at the queries' labels.

    The gain of flipping ``z_i`` to ``y'`` is ``-loss_change(score(z_i, y') - score(z_i, y))`` with ``score``
    the example's score on the mean objective (:meth:`~influent.influence.ExactInfluence.mean_query_scores`):
    removing ``(x_i, y)`` and adding ``(x_i, y')``.
    """
    engine = ExactInfluence(model, HeadTask(l2), (train_x, train_y), damping=damping)
    objective = (objective_x, objective_y)
    base = engine.mean_query_scores(objective)  # s^T g_i(y)
    best = np.full(len(train_y), -np.inf)
    best_label = train_y.numpy().copy()
    for offset in range(1, num_classes):
        alt = (train_y + offset) % num_classes
        flipped = engine.mean_query_scores(objective, (train_x, alt))  # s^T g_i(y')
        gain = (-engine.loss_change(flipped - base)).numpy()
        better = gain > best
        best[better] = gain[better]
        best_label[better] = alt.numpy()[better]
    return FlipGains(best, best_label)


def _rounds(counts: list[int], rounds_per_budget: int) -> list[int]:
    """Round sizes so that the cumulative flips hit every budget exactly."""
    sizes, prev = [], 0
    for c in counts:
        step = c - prev
        parts = [
            step // rounds_per_budget + (1 if i < step % rounds_per_budget else 0)
            for i in range(rounds_per_budget)
        ]
        sizes.extend(p for p in parts if p > 0)
        sizes.append(0)  # marker: a budget is reached here
        prev = c
    return sizes


def greedy_flips(
    exp: HeadExperiment,
    budgets: list[int],
    objective_x: torch.Tensor,
    objective_y: torch.Tensor,
    rounds_per_budget: int = 1,
    damping: float = 0.0,
    progress=None,
) -> dict[int, tuple[np.ndarray, torch.Tensor, LogisticHead]]:
    """Greedy influence-ranked flips, retraining between rounds.

    Returns:
        ``{budget: (flipped indices, poisoned labels, retrained model)}`` for each budget (nested prefixes).
    """
    y = exp.train_y.clone()
    model = exp.fit()
    flipped: list[int] = []
    out = {}
    sizes = _rounds(sorted(budgets), rounds_per_budget)
    for size in sizes:
        if size == 0:
            out[len(flipped)] = (np.array(flipped, dtype=np.int64), y.clone(), model)
            continue
        gains = flip_gains(model, exp.l2, exp.train_x, y, exp.num_classes, objective_x, objective_y, damping)
        gain = gains.gain.copy()
        if flipped:
            gain[np.array(flipped)] = -np.inf  # flip each example at most once
        chosen = np.argsort(-gain, kind="stable")[:size]
        y[chosen] = torch.as_tensor(gains.label[chosen])
        flipped.extend(chosen.tolist())
        model = exp.fit(exp.train_x, y, init=model)
        if progress is not None:
            progress(len(flipped))
    return out


def baseline_flips(
    exp: HeadExperiment,
    strategy: str,
    budget: int,
    seed: int,
    target_x: torch.Tensor | None = None,
    target_y: torch.Tensor | None = None,
    model: LogisticHead | None = None,
) -> np.ndarray:
    """Indices flipped by a baseline: ``random``, ``max_loss`` or (targeted) ``nearest``."""
    if strategy == "random":
        return np.random.default_rng(seed).choice(exp.n, budget, replace=False)
    if strategy == "max_loss":
        model = model or exp.fit()
        alt = (exp.train_y + 1) % exp.num_classes
        loss = per_example_loss(model, exp.train_x, alt).numpy()
        return np.argsort(-loss, kind="stable")[:budget]
    if strategy == "nearest":
        if target_x is None:
            raise UserError("the nearest baseline needs a target", field="target_x")
        same = (exp.train_y == target_y).numpy()
        dist = torch.cdist(target_x.reshape(1, -1), exp.train_x)[0].numpy()
        dist[~same] = np.inf
        return np.argsort(dist, kind="stable")[:budget]
    raise UserError(f"unknown flip strategy {strategy!r}", field="strategy")


def flip_labels(y: torch.Tensor, idx: np.ndarray, num_classes: int) -> torch.Tensor:
    """``y`` with the labels at ``idx`` moved to the next class (the other class for binary)."""
    y = y.clone()
    t = torch.as_tensor(idx, dtype=torch.long)
    y[t] = (y[t] + 1) % num_classes
    return y


def budget_counts(n: int, budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> list[int]:
    """Flip counts for budget fractions of the training set (at least 1 each)."""
    return [max(1, round(b * n)) for b in budgets]


def untargeted_attack(
    exp: HeadExperiment,
    budgets: tuple[float, ...] = DEFAULT_BUDGETS,
    rounds_per_budget: int = 1,
    damping: float = 0.0,
    objective: str = "correct",
) -> list[dict]:
    """Raise clean loss: influence-greedy vs random vs max-loss flips, scored on the evaluation half.

    Args:
        objective: the attacker's surrogate on the validation half: ``"loss"`` (mean loss of every review)
            or ``"correct"`` (mean loss of the reviews the clean model gets right, which aims the flips at
            accuracy instead of at already-misclassified reviews).

    Returns:
        rows ``{strategy, budget, flips, clean_accuracy, clean_loss, accuracy_drop}``.
    """
    clean = exp.fit()
    acc0 = exp.clean_accuracy(clean)
    loss0 = float(per_example_loss(clean, exp.eval_x, exp.eval_y).mean())
    counts = budget_counts(exp.n, budgets)
    rows = [
        {
            "strategy": "none",
            "budget": 0.0,
            "flips": 0,
            "clean_accuracy": acc0,
            "clean_loss": loss0,
            "accuracy_drop": 0.0,
        }
    ]
    if objective == "loss":
        ox, oy = exp.val_x, exp.val_y
    elif objective == "correct":
        ok = predict(clean, exp.val_x) == exp.val_y
        ox, oy = exp.val_x[ok], exp.val_y[ok]
    else:
        raise UserError(f"unknown objective {objective!r}; choose loss or correct", field="objective")
    greedy = greedy_flips(exp, counts, ox, oy, rounds_per_budget, damping)
    for frac, c in zip(budgets, counts):
        runs = {"influence": greedy[c][2]}
        for strat in ("random", "max_loss"):
            idx = baseline_flips(exp, strat, c, exp.seed, model=clean)
            runs[strat] = exp.fit(exp.train_x, flip_labels(exp.train_y, idx, exp.num_classes), init=clean)
        for strat, m in runs.items():
            acc = exp.clean_accuracy(m)
            rows.append(
                {
                    "strategy": strat,
                    "budget": frac,
                    "flips": c,
                    "clean_accuracy": acc,
                    "clean_loss": float(per_example_loss(m, exp.eval_x, exp.eval_y).mean()),
                    "accuracy_drop": acc0 - acc,
                }
            )
    return rows


def choose_targets(
    exp: HeadExperiment, count: int, seed: int, model: LogisticHead | None = None
) -> np.ndarray:
    """Positions in the evaluation half of ``count`` correctly classified reviews (seeded)."""
    model = model or exp.fit()
    ok = np.flatnonzero((predict(model, exp.eval_x) == exp.eval_y).numpy())
    return np.random.default_rng(seed + 1).choice(ok, min(count, len(ok)), replace=False)


def targeted_attack(
    exp: HeadExperiment,
    n_targets: int = 5,
    budgets: tuple[float, ...] = DEFAULT_BUDGETS,
    rounds_per_budget: int = 1,
    damping: float = 0.0,
) -> list[dict]:
    """Flip the prediction of each target review (one attack per target) at each budget.

    Returns:
        rows ``{strategy, budget, flips, target, flipped (0/1), target_margin, clean_accuracy}`` where the clean
        accuracy is on the evaluation half without the targets.
    """
    clean = exp.fit()
    counts = budget_counts(exp.n, budgets)
    targets = choose_targets(exp, n_targets, exp.seed, clean)
    keep = np.setdiff1d(np.arange(len(exp.eval_y)), targets)
    rows = []

    def score(m, t, strat, frac, c):
        x, y = exp.eval_x[t : t + 1], exp.eval_y[t : t + 1]
        p = m.probabilities(x)[0].detach()
        rows.append(
            {
                "strategy": strat,
                "budget": frac,
                "flips": c,
                "target": int(t),
                "flipped": int(int(p.argmax()) != int(y[0])),
                "target_prob_true": float(p[int(y[0])]),
                "clean_accuracy": accuracy(m, exp.eval_x[keep], exp.eval_y[keep]),
            }
        )

    for t in targets:
        tx, ty = exp.eval_x[t : t + 1], exp.eval_y[t : t + 1]
        greedy = greedy_flips(exp, counts, tx, ty, rounds_per_budget, damping)
        for frac, c in zip(budgets, counts):
            score(greedy[c][2], t, "influence", frac, c)
            for strat in ("random", "max_loss", "nearest"):
                idx = baseline_flips(exp, strat, c, exp.seed, tx[0], ty[0], model=clean)
                m = exp.fit(exp.train_x, flip_labels(exp.train_y, idx, exp.num_classes), init=clean)
                score(m, t, strat, frac, c)
    return rows
