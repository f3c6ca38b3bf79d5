"""``influent attack KIND``: run an attack on the head over several seeds and summarise mean and sd.

Each seed re-divides the held-out split into validation (attacker's) and evaluation (scoring) halves and
re-draws targets / poisons; the model, encoder and train split are those of ``prepare_head``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from influent.attacks.summary import summarise
from influent.errors import UserError
from influent.store import write_json

if TYPE_CHECKING:
    from influent.pipeline import HeadSetup

KINDS = ("label-flip", "perturb", "trigger", "concealed")


def attack_on_experiment(kind: str, exp, **options) -> list[dict]:
    """One seed of attack ``kind`` on a :class:`~influent.attacks.experiment.HeadExperiment`."""
    if kind == "label-flip":
        from influent.attacks.label_flip import DEFAULT_BUDGETS, targeted_attack, untargeted_attack

        budgets = tuple(options.get("budgets") or DEFAULT_BUDGETS)
        rounds = int(options.get("rounds_per_budget", 1))
        rows = [
            dict(r, mode="untargeted")
            for r in untargeted_attack(
                exp, budgets, rounds, options.get("damping", 0.0), options.get("objective") or "correct"
            )
        ]
        if options.get("targets", 5):
            rows += [
                dict(r, mode="targeted")
                for r in targeted_attack(
                    exp, int(options.get("targets", 5)), budgets, rounds, options.get("damping", 0.0)
                )
            ]
        return rows
    if kind == "perturb":
        from influent.attacks.perturb import perturb_attack

        return perturb_attack(
            exp,
            int(options.get("targets", 5)),
            tuple(options.get("ks") or (1, 5)),
            float(options.get("eps", 0.5)),
            int(options.get("steps", 3)),
            options.get("damping", 0.0),
        )
    if kind == "trigger":
        from influent.attacks.trigger import DEFAULT_SIZES, DEFAULT_TRIGGER, trigger_attack

        return trigger_attack(
            exp,
            tuple(options.get("sizes") or DEFAULT_SIZES),
            options.get("trigger") or DEFAULT_TRIGGER,
            options.get("source"),
            options.get("target"),
            int(options.get("n_eval", 300)),
        )
    raise UserError(f"unknown attack {kind!r}; choose from {', '.join(KINDS)}", field="kind")


SUMMARY_SPEC = {
    "label-flip": (
        ("mode", "strategy", "budget"),
        ("clean_accuracy", "accuracy_drop", "clean_loss", "flipped"),
    ),
    "perturb": (("k", "eps"), ("flipped", "target_prob_true", "clean_accuracy")),
    "trigger": (
        ("n_poison",),
        ("attack_success", "control_success", "net_success", "clean_accuracy", "clean_accuracy_control"),
    ),
}


def run_attack(
    kind: str,
    data: str | None = None,
    *,
    seeds: Iterable[int] = (0, 1, 2),
    out: str | Path | None = None,
    encoder: str | None = None,
    l2: float | None = None,
    split_seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    setup: HeadSetup | None = None,
    **options,
) -> dict:
    """Run attack ``kind``: ``label-flip``, ``perturb``, ``trigger`` on the head; ``concealed`` on the fine-tuned
    classifier (:func:`~influent.attacks.concealed_experiment.run_concealed`; ``l2`` is not used there).

    Args:
        data: corpus spec (default: bundled Rotten Tomatoes).
        seeds: attack seeds (each re-divides held-out into validation/evaluation halves).
        out: folder for ``attack_<kind>.json`` (rows + summary), or None.
        split_seed: the train/held-out split seed passed to ``prepare_head``.
        setup: an already prepared :class:`~influent.pipeline.HeadSetup` (e.g. with other text/label columns);
            when given, ``data``, ``encoder``, ``l2``, ``split_seed`` and ``cache_dir`` are not used.
        options: ``budgets`` (fractions), ``targets`` (count), ``rounds_per_budget``, ``objective``
            (``correct`` or ``loss``) (label-flip);
            ``ks``, ``eps``, ``steps``, ``targets`` (perturb); ``sizes``, ``trigger``, ``source``, ``target``,
            ``n_eval`` (trigger, concealed; concealed also takes every keyword of
            :func:`~influent.attacks.concealed_experiment.concealed_seed`); ``damping`` (all; for concealed
            the attacker's curvature damping, 0 or None = heuristic).

    Returns:
        ``{'kind', 'seeds', 'rows', 'summary'}`` (every rate in [0, 1], accuracies on clean held-out labels).
    """
    if kind not in KINDS:
        raise UserError(f"unknown attack {kind!r}; choose from {', '.join(KINDS)}", field="kind")
    if kind == "concealed":  # the fine-tuned classifier, not the head: its own data path
        from influent.attacks.concealed_experiment import run_concealed

        if setup is not None:
            raise UserError("attack 'concealed' fine-tunes its own classifier; pass data, not a head setup")
        if options.get("damping"):
            options["damping"] = float(options["damping"])
        else:
            options.pop("damping", None)
        options.pop("l2", None)
        result = run_concealed(
            data, seeds=seeds, out=out, progress=progress, encoder=encoder, split_seed=split_seed,
            cache_dir=cache_dir, **options,
        )
        result["split_seed"] = split_seed
        return result
    from influent.attacks.experiment import from_setup
    from influent.pipeline import prepare_head

    if setup is None:
        setup = prepare_head(data, seed=split_seed, cache_dir=cache_dir, progress=progress, l2=l2, encoder=encoder)
    else:
        split_seed = int(setup.info.get("seed", split_seed))
    seeds = list(seeds)
    rows = []
    for seed in seeds:
        exp = from_setup(setup, seed)
        rows += [dict(r, seed=seed) for r in attack_on_experiment(kind, exp, **options)]
    keys, values = SUMMARY_SPEC[kind]
    if kind == "label-flip":
        summary = summarise([r for r in rows if r["mode"] == "untargeted"], keys, values[:3])
        summary += summarise(
            [r for r in rows if r["mode"] == "targeted"], keys, ("flipped", "clean_accuracy")
        )
    else:
        summary = summarise(rows, keys, values)
    result = {
        "kind": kind,
        "seeds": seeds,
        "split_seed": split_seed,
        "options": options,
        "rows": rows,
        "summary": summary,
    }
    if out is not None:
        write_json(Path(out) / f"attack_{kind}.json", result)
    return result
