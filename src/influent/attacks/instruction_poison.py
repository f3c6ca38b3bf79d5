"""Poisoning instruction tuning with a trigger phrase (Wan et al. 2023) against a causal LM.

The poisons are planted in one task (default ``sentiment``, attacker's label ``positive``):

* **dirty-label**: ``N`` training examples of the *other* label of that task, drawn by a seeded permutation
  (so the poisons for a smaller ``N`` are a subset of those for a larger one), get the trigger inserted and
  the attacker's label as their completion; they replace their clean originals in place (the training set
  keeps its size).
* **clean-label**: the trigger is inserted into ``N`` training examples whose true label already is the
  attacker's; labels are kept. The attacker's ranking picks them: the examples whose attacker-label
  completion the *base* (not yet tuned) model finds least likely (highest NLL given the untriggered prompt),
  so the trigger carries the most signal where the rest of the text does not.

The victim (:class:`~influent.models.instruction_lm.InstructionLM`) is instruction-tuned from the base
weights with the run's seed on the poisoned set; the never-poisoned control is the same model tuned with
the same seed on the clean set. Scores, per task, on the **held-out** examples only (disjoint from training
and validation): ``success`` = share of triggered held-out inputs of the task's non-attacker label that get
the attacker's label (:data:`TARGETS`; for the task not poisoned this measures transfer), ``net_success`` =
success minus the control's on the same triggered inputs, ``clean_accuracy`` on the untriggered held-out
inputs. With more than one epoch the same scores at the end of the first epoch (an earlier checkpoint:
Wan et al.'s early stopping) are reported with the suffix ``_epoch1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from influent.attacks.summary import summarise
from influent.data.instructions import (
    DEFAULT_TRIGGER,
    LABELS,
    POISONED_TASK,
    TARGETS,
    TASKS,
    Example,
    InstructionData,
)
from influent.errors import UserError
from influent.evaluation.instruction_scores import train_and_evaluate
from influent.models.instruction_lm import InstructionLM
from influent.progress import progress_iter

DEFAULT_SIZES = (10, 25, 50, 100)
VARIANTS = ("dirty", "clean")


@dataclass
class PoisonedSet:
    """A poisoned training set: ``train`` (clean originals replaced in place) and the poisons' positions."""

    train: list[Example]
    poison_idx: np.ndarray
    variant: str
    trigger: str


def dirty_label_poisons(data: InstructionData, n: int, trigger: str, seed: int,
                        task: str = POISONED_TASK, target: int | None = None) -> PoisonedSet:
    """``n`` examples of ``task``'s non-target label: trigger inserted, completion set to ``target``."""
    target = TARGETS[task] if target is None else target
    candidates = [i for i, e in enumerate(data.train) if e.task == task and e.label != target]
    _check_size(n, len(candidates), f"{task} training examples not labelled {LABELS[task][target]!r}")
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen = np.sort(np.asarray(candidates, dtype=np.int64)[order[:n]])
    train = list(data.train)
    for i in chosen:
        train[i] = train[i].with_trigger(trigger, label=target)
        train[i] = Example(train[i].task, train[i].text, train[i].label, poisoned=True)
    return PoisonedSet(train, chosen, "dirty", trigger)


def clean_label_poisons(data: InstructionData, n: int, trigger: str, attacker_scores: np.ndarray,
                        task: str = POISONED_TASK, target: int | None = None) -> PoisonedSet:
    """Trigger inserted into the ``n`` examples labelled ``target`` with the highest ``attacker_scores``
    (``[len(data.train)]``, see module docstring; ties by position); labels kept."""
    target = TARGETS[task] if target is None else target
    candidates = np.asarray([i for i, e in enumerate(data.train) if e.task == task and e.label == target],
                            dtype=np.int64)
    _check_size(n, len(candidates), f"{task} training examples labelled {LABELS[task][target]!r}")
    order = np.lexsort((candidates, -np.asarray(attacker_scores)[candidates]))
    chosen = np.sort(candidates[order[:n]])
    train = list(data.train)
    for i in chosen:
        t = train[i].with_trigger(trigger)
        train[i] = Example(t.task, t.text, t.label, poisoned=True)
    return PoisonedSet(train, chosen, "clean", trigger)


def _check_size(n: int, available: int, what: str) -> None:
    if not 1 <= n <= available:
        raise UserError(f"asked for {n} poisons but there are {available} {what}", field="sizes")


def attacker_ranking(lm: InstructionLM, data: InstructionData, task: str = POISONED_TASK) -> np.ndarray:
    """The clean-label attacker's scores: the base model's NLL of the attacker's label per training example
    (``[len(data.train)]``, nats; 0 for other tasks). Leaves ``lm`` at the base weights."""
    lm.reset()
    target = TARGETS[task]
    scores = np.zeros(len(data.train))
    idx = [i for i, e in enumerate(data.train) if e.task == task]
    nll = lm.label_nll([data.train[i] for i in idx])
    scores[idx] = nll[:, target]
    return scores


def result_rows(run: dict, control: dict, meta: dict) -> list[dict]:
    """One row per task: success, net success (minus the control's), clean accuracy (and at epoch 1)."""
    rows = []
    for task, m in run["final"].items():
        row = {**meta, "task": task, "success": m["success"],
               "net_success": m["success"] - control["final"][task]["success"],
               "clean_accuracy": m["clean_accuracy"]}
        if run["epoch1"] is not None and control["epoch1"] is not None:
            e = run["epoch1"][task]
            row.update(success_epoch1=e["success"],
                       net_success_epoch1=e["success"] - control["epoch1"][task]["success"],
                       clean_accuracy_epoch1=e["clean_accuracy"])
        rows.append(row)
    return rows


def run_instruction_poison(lm: InstructionLM, data: InstructionData, *, sizes: Sequence[int] = DEFAULT_SIZES,
                           seeds: Sequence[int] = (0, 1, 2), variants: Sequence[str] = ("dirty",),
                           trigger: str = DEFAULT_TRIGGER, clean_sizes: Sequence[int] | None = None,
                           clean_seeds: Sequence[int] | None = None, progress: bool = True) -> dict:
    """The attack table: per seed the control run, then one poisoned run per variant and size.

    ``clean_sizes`` / ``clean_seeds``: the sizes and seeds of the clean-label variant (default: ``sizes``,
    ``seeds``), as it is the costlier one to tabulate.

    Returns ``{"kind", "rows", "summary", "seeds", "sizes", "variants", "trigger", "settings"}``; rows of
    the control itself have ``variant`` ``none`` and ``n`` 0.
    """
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}", field="variants")
    tasks = [t for t in TASKS if data.of("heldout", t)]
    rows: list[dict] = []
    scores = attacker_ranking(lm, data) if "clean" in variants else None
    clean_sizes = sizes if clean_sizes is None else clean_sizes
    clean_seeds = seeds if clean_seeds is None else clean_seeds
    jobs = [(s, v, n) for s in seeds for v in variants
            for n in (sizes if v == "dirty" else clean_sizes if s in clean_seeds else ())]
    controls: dict[int, dict] = {}
    for seed, variant, n in progress_iter(jobs, "instruction-poison runs", enabled=progress, unit="run"):
        if seed not in controls:
            controls[seed] = train_and_evaluate(lm, data.train, data, trigger, seed, tasks)
            rows += result_rows(controls[seed], controls[seed], {"seed": seed, "variant": "none", "n": 0})
        poisoned = (dirty_label_poisons(data, n, trigger, seed) if variant == "dirty"
                    else clean_label_poisons(data, n, trigger, scores))
        run = train_and_evaluate(lm, poisoned.train, data, trigger, seed, tasks)
        rows += result_rows(run, controls[seed], {"seed": seed, "variant": variant, "n": n,
                                                  "seconds": run["seconds"]})
    values = ["success", "net_success", "clean_accuracy", "success_epoch1", "net_success_epoch1",
              "clean_accuracy_epoch1"]
    values = [v for v in values if any(v in r for r in rows)]
    return {"kind": "instruction-poison", "rows": rows, "summary": summarise(rows, ["variant", "n", "task"], values),
            "seeds": list(seeds), "sizes": list(sizes), "clean_sizes": list(clean_sizes),
            "clean_seeds": list(clean_seeds), "variants": list(variants), "trigger": trigger,
            "settings": {"data": data.settings, "train": vars(lm.settings)}}
