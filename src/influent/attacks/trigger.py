"""Dirty-label trigger poisons (Wan et al. 2023) against the frozen-encoder head.

``N`` training snippets of the source class get a trigger phrase inserted at a random word position and
are relabelled as the target class; their features are recomputed with the same encoder. Attack success
is the fraction of held-out source-class reviews (evaluation half, never trained on) that the poisoned
model assigns to the target class once the trigger is inserted, reported net of the same rate on the
never-poisoned model (the control).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from influent.attacks.experiment import HeadExperiment
from influent.data.text_edits import insert_trigger
from influent.errors import UserError
from influent.models.head import LogisticHead, predict

DEFAULT_TRIGGER = "james bond"
DEFAULT_SIZES = (10, 25, 50, 100)


def resolve_classes(
    exp: HeadExperiment, source: int | str | None, target: int | str | None
) -> tuple[int, int]:
    """:func:`class_indices` of ``exp``'s class names (``0 .. K-1`` as text when it has none)."""
    return class_indices(exp.label_names or [str(i) for i in range(exp.num_classes)], source, target)


def class_indices(names: list[str], source: int | str | None, target: int | str | None) -> tuple[int, int]:
    """Class indices for source/target given as index, name or None (default: negative/rotten ->
    positive/fresh, else 0 -> 1)."""

    def one(v, default, field):
        if v is None:
            return default
        if isinstance(v, str) and not v.isdigit():
            if v not in names:
                raise UserError(f"unknown class {v!r}; classes are {', '.join(names)}", field=field)
            return names.index(v)
        return int(v)

    s_def = next((names.index(v) for v in ("negative", "rotten") if v in names), 0)
    t_def = next((names.index(v) for v in ("positive", "fresh") if v in names), 1 if s_def != 1 else 0)
    s, t = one(source, s_def, "source"), one(target, t_def, "target")
    if s == t:
        raise UserError("source and target class must differ", field="target")
    return s, t


@dataclass
class TriggerPoison:
    """A poisoned training set and the inputs to score it with.

    Attributes:
        train_x, train_y: poisoned training set (the poisons replace their clean originals in place).
        poison_idx: training positions of the poisons.
        triggered_eval_x: evaluation-half source-class reviews with the trigger inserted.
        triggered_val_x: validation-half source-class reviews with the trigger (defender's queries).
        source, target: class indices.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    poison_idx: np.ndarray
    triggered_eval_x: torch.Tensor
    triggered_val_x: torch.Tensor
    source: int
    target: int
    trigger: str

    def is_poison(self, n: int) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[self.poison_idx] = True
        return mask


def poison_order(exp: HeadExperiment, source: int, seed: int) -> np.ndarray:
    """Seeded order of source-class training examples; the first N are poisoned (nested across N)."""
    cands = np.flatnonzero(exp.train_y.numpy() == source)
    return np.random.default_rng(seed + 17).permutation(cands)


def make_trigger_poison(
    exp: HeadExperiment,
    n_poison: int,
    trigger: str = DEFAULT_TRIGGER,
    source=None,
    target=None,
    n_eval: int = 300,
    n_val: int = 200,
) -> TriggerPoison:
    """Build the poisoned training set and the triggered held-out inputs (re-embedded with ``exp.embed``)."""
    if exp.embed is None or exp.train_texts is None:
        raise UserError("the trigger attack needs texts and an encoder (a HeadExperiment from a HeadSetup)")
    s, t = resolve_classes(exp, source, target)
    idx = poison_order(exp, s, exp.seed)[:n_poison]
    if len(idx) < n_poison:
        raise UserError(f"only {len(idx)} source-class training examples, {n_poison} poisons requested", field="sizes")
    x, y = exp.train_x.clone(), exp.train_y.clone()
    if n_poison:
        x[torch.as_tensor(idx)] = exp.embed(
            [insert_trigger(exp.train_texts[i], trigger) for i in idx]
        ).double()
        y[torch.as_tensor(idx)] = t
    ev = np.flatnonzero(exp.eval_y.numpy() == s)[:n_eval]
    va = np.flatnonzero(exp.val_y.numpy() == s)[:n_val]
    tev = exp.embed([insert_trigger(exp.eval_texts[i], trigger) for i in ev]).double()
    tva = exp.embed([insert_trigger(exp.val_texts[i], trigger) for i in va]).double()
    return TriggerPoison(x, y, idx, tev, tva, s, t, trigger)


def success_rate(model: LogisticHead, poison: TriggerPoison) -> float:
    """Fraction of triggered source-class evaluation reviews predicted as the target class."""
    return float((predict(model, poison.triggered_eval_x) == poison.target).double().mean())


def trigger_attack(
    exp: HeadExperiment,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    trigger: str = DEFAULT_TRIGGER,
    source=None,
    target=None,
    n_eval: int = 300,
) -> list[dict]:
    """Attack success and clean accuracy for each poison count N (one seed: ``exp.seed``).

    Returns:
        rows ``{n_poison, trigger, attack_success, control_success, net_success, clean_accuracy,
        clean_accuracy_control, n_triggered_eval}`` (rates in [0, 1]).
    """
    clean = exp.fit()
    rows = []
    for n_poison in sizes:
        poison = make_trigger_poison(exp, n_poison, trigger, source, target, n_eval)
        model = exp.fit(poison.train_x, poison.train_y, init=clean)
        ctrl = success_rate(clean, poison)
        succ = success_rate(model, poison)
        rows.append(
            {
                "n_poison": int(n_poison),
                "trigger": trigger,
                "attack_success": succ,
                "control_success": ctrl,
                "net_success": succ - ctrl,
                "clean_accuracy": exp.clean_accuracy(model),
                "clean_accuracy_control": exp.clean_accuracy(clean),
                "n_triggered_eval": len(poison.triggered_eval_x),
            }
        )
    return rows
