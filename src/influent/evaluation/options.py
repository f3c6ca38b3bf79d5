"""The options of :func:`~influent.evaluation.validate.run_validate`, validated before any model work.

Errors are :class:`~influent.errors.UserError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from influent.checks import check_choice, check_number
from influent.errors import UserError

MODELS = ("head", "finetuned")
SOLVERS = ("exact", "cg", "lissa")
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


@dataclass(frozen=True)
class ValidateOptions:
    """Settings of one validation run (influence against retraining).

    Attributes:
        model: ``head`` or ``finetuned``.
        strategies: curvature strategies compared (fine-tuned model).
        solvers: solvers compared (head).
        examples: training examples removed (>= 3).
        subsets: random half-size subsets for the LDS (0 skips it, else >= 10).
        queries: held-out queries (>= 1).
        epochs: fine-tuning epochs of each retrain (>= 1).
        fine_tune_last: layers fine-tuned (>= 1).
        train_size: seeded stratified training slice (>= 2) or None.
        damping: added to the curvature's diagonal (>= 0) or None (the method's default).
        seed: seeds the split, the slices, the draws and the training (>= 0).
    """

    model: str = "head"
    strategies: tuple[str, ...] | list[str] = STRATEGIES
    solvers: tuple[str, ...] | list[str] = SOLVERS
    examples: int = 30
    subsets: int = 50
    queries: int = 5
    epochs: int = 1
    fine_tune_last: int = 1
    train_size: int | None = None
    damping: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODELS)
        for name, values, known in (("strategies", self.strategies, STRATEGIES), ("solvers", self.solvers, SOLVERS)):
            if not values:
                raise UserError(f"{name} needs one or more of {', '.join(known)}", field=name)
            for value in values:
                check_choice(name, value, known)
        for name, low in (("examples", 3), ("subsets", 0), ("queries", 1), ("epochs", 1), ("fine_tune_last", 1),
                          ("seed", 0)):
            check_number(name, getattr(self, name), low=low, integer=True)
        if 0 < self.subsets < 10:
            raise UserError(f"subsets must be 0 (skip the LDS) or >= 10 for a meaningful rank correlation, "
                            f"got {self.subsets}", field="subsets")
        if self.train_size is not None:
            check_number("train_size", self.train_size, low=2, integer=True)
        if self.damping is not None:
            check_number("damping", self.damping, low=0)

    def as_kwargs(self) -> dict:
        """:func:`~influent.evaluation.validate.run_validate` keywords (``model`` is its positional argument)."""
        kwargs = asdict(self)
        del kwargs["model"]
        return kwargs
