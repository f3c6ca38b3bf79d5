"""The options of :func:`~influent.attacks.run.run_attack`, validated before any model work.

Every field is ``None`` for "the attack's default". A field that the chosen kind does not read is refused
(an option given to the wrong attack is a mistake, not something to ignore silently). Errors are
:class:`~influent.errors.UserError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from influent.attacks.run import KINDS
from influent.checks import check_choice, check_number, check_numbers, check_text
from influent.errors import UserError

_TRIGGERED = ("trigger", "concealed")
# The attacks that read each option.
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "budgets": ("label-flip",), "rounds_per_budget": ("label-flip",), "objective": ("label-flip",),
    "targets": ("label-flip", "perturb"), "ks": ("perturb",), "eps": ("perturb",), "steps": ("perturb",),
    "sizes": _TRIGGERED, "trigger": _TRIGGERED, "source": _TRIGGERED, "target": _TRIGGERED, "n_eval": _TRIGGERED,
    "damping": KINDS,
    "train_size": ("concealed",), "epochs": ("concealed",), "n_adv": ("concealed",), "curvature": ("concealed",),
    "candidates": ("concealed",), "last_k": ("concealed",),
}
_AT_LEAST = {"rounds_per_budget": 1, "steps": 1, "n_eval": 1, "train_size": 2, "epochs": 1, "n_adv": 1,
             "candidates": 1, "last_k": 1}


@dataclass(frozen=True)
class AttackOptions:
    """One attack's settings.

    Attributes:
        kind: ``label-flip``, ``perturb``, ``trigger`` (the head) or ``concealed`` (the fine-tuned classifier).
        seeds: attack seeds, each >= 0.
        damping: added to the Hessian's diagonal (>= 0).
        budgets: label-flip budgets, fractions of the training set in (0, 1).
        targets: targeted reviews per seed (label-flip >= 0, perturb >= 1).
        rounds_per_budget, objective: label-flip's greedy rounds (>= 1) and surrogate (``correct`` | ``loss``).
        ks, eps, steps: perturb's poison counts (>= 1), relative L2 radius (> 0) and ascent steps (>= 1).
        sizes, trigger, source, target, n_eval: trigger / concealed poison counts (>= 1), phrase, classes
            (name or index; checked against the data by the caller) and scored reviews (>= 1).
        train_size, epochs, n_adv, curvature, candidates, last_k: the concealed attack's victim and attacker.
    """

    kind: str
    seeds: tuple[int, ...] | list[int] = (0, 1, 2)
    damping: float | None = None
    budgets: list[float] | None = None
    targets: int | None = None
    rounds_per_budget: int | None = None
    objective: str | None = None
    ks: list[int] | None = None
    eps: float | None = None
    steps: int | None = None
    sizes: list[int] | None = None
    trigger: str | None = None
    source: str | None = None
    target: str | None = None
    n_eval: int | None = None
    train_size: int | None = None
    epochs: int | None = None
    n_adv: int | None = None
    curvature: str | None = None
    candidates: int | None = None
    last_k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown attack {self.kind!r}; choose from {', '.join(KINDS)}")
        for name, kinds in APPLIES_TO.items():
            if getattr(self, name) is not None and self.kind not in kinds:
                raise UserError(f"{name} applies to {' and '.join(kinds)}, not to {self.kind}", field=name)
        check_numbers("seeds", self.seeds, low=0, integer=True)
        self._check_numbers()
        if self.objective is not None:
            check_choice("objective", self.objective, ("correct", "loss"))
        if self.curvature is not None:
            check_choice("curvature", self.curvature, ("ekfac", "kfac", "diagonal", "identity"))
        check_text("trigger", self.trigger)

    def _check_numbers(self) -> None:
        if self.damping is not None:
            check_number("damping", self.damping, low=0)
        if self.budgets is not None and not (self.budgets and all(0.0 < b < 1.0 for b in self.budgets)):
            raise UserError(f"budgets needs one or more fractions strictly between 0 and 1, got {list(self.budgets)}",
                            field="budgets")
        if self.targets is not None:
            check_number("targets", self.targets, low=1 if self.kind == "perturb" else 0, integer=True)
        for name, low in _AT_LEAST.items():
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=low, integer=True)
        for name in ("ks", "sizes"):
            check_numbers(name, getattr(self, name), low=1, integer=True)
        if self.eps is not None:
            check_number("eps", self.eps, low=0, low_open=True)

    def as_kwargs(self) -> dict:
        """The options given (not None) as :func:`~influent.attacks.run.run_attack` keywords (no kind, seeds)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in APPLIES_TO and getattr(self, f.name) is not None}
