"""Koh & Liang's training-input attack on the head: move a few training examples' features along I_pert.

For a target review ``q`` (correctly classified, scored at its true label), ``I_pert,loss(z_j, q)`` is the
gradient of q's loss with respect to training example j's input features, through retraining (first
order: moving x_j by ``delta`` changes q's loss by ``I_pert . delta / n``). The attack picks the ``k``
training examples with the largest ``||I_pert||``, then takes ``steps`` projected ascent steps: each moves
every poison along its normalised ``I_pert`` and projects back into the L2 ball of radius
``eps * ||x_j||`` around its original features; the head is retrained and ``I_pert`` recomputed between
steps. Labels are unchanged (clean-label poisons). Success: the target's prediction flips after retraining.
"""

from __future__ import annotations

import numpy as np
import torch

from influent.attacks.experiment import HeadExperiment
from influent.attacks.label_flip import choose_targets
from influent.influence import ExactInfluence
from influent.models.head import HeadTask, LogisticHead, accuracy


def perturb_target(
    exp: HeadExperiment,
    target: int,
    k: int,
    eps: float = 0.5,
    steps: int = 3,
    clean: LogisticHead | None = None,
    damping: float = 0.0,
) -> dict:
    """Attack one target (a position in the evaluation half) with ``k`` perturbed training examples.

    Args:
        eps: L2 budget of each perturbation, relative to that example's feature norm.
        steps: projected ascent steps (the head is retrained after each).

    Returns:
        ``{target, k, eps, flipped, target_prob_true, clean_accuracy, poisons}``.
    """
    clean = clean or exp.fit()
    tx, ty = exp.eval_x[target : target + 1], exp.eval_y[target : target + 1]
    task = HeadTask(exp.l2)
    engine = ExactInfluence(clean, task, (exp.train_x, exp.train_y), damping=damping)
    ip = engine.pert_influence((tx, ty), (exp.train_x, exp.train_y))[0]  # [n, d]
    poisons = torch.argsort(ip.norm(dim=1), descending=True)[:k]
    x0 = exp.train_x[poisons].clone()
    radius = eps * x0.norm(dim=1, keepdim=True)
    x = exp.train_x.clone()
    model = clean
    for step in range(steps):
        if step > 0:
            engine = ExactInfluence(model, task, (x, exp.train_y), damping=damping)
            ip = engine.pert_influence((tx, ty), (x[poisons], exp.train_y[poisons]))[0]
        else:
            ip = ip[poisons]
        direction = ip / ip.norm(dim=1, keepdim=True).clamp_min(1e-300)
        delta = x[poisons] - x0 + radius * direction  # a full-radius step, then projection
        norm = delta.norm(dim=1, keepdim=True)
        delta = delta * torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)
        x[poisons] = x0 + delta
        model = exp.fit(x, exp.train_y, init=model)
    p = model.probabilities(tx)[0].detach()
    keep = np.setdiff1d(np.arange(len(exp.eval_y)), [target])
    return {
        "target": int(target),
        "k": int(k),
        "eps": float(eps),
        "flipped": int(int(p.argmax()) != int(ty[0])),
        "target_prob_true": float(p[int(ty[0])]),
        "clean_accuracy": accuracy(model, exp.eval_x[keep], exp.eval_y[keep]),
        "poisons": poisons.tolist(),
    }


def perturb_attack(
    exp: HeadExperiment,
    n_targets: int = 5,
    ks: tuple[int, ...] = (1, 5),
    eps: float = 0.5,
    steps: int = 3,
    damping: float = 0.0,
) -> list[dict]:
    """Run :func:`perturb_target` for ``n_targets`` seeded correctly-classified targets and each ``k``."""
    clean = exp.fit()
    rows = []
    for t in choose_targets(exp, n_targets, exp.seed, clean):
        for k in ks:
            rows.append(perturb_target(exp, int(t), k, eps, steps, clean, damping))
    return rows
