"""The settings that determine fitted factors (kronfluence's ``factor/config.py`` in spirit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from influent.curvature.strategies import get_strategy
from influent.errors import UserError

FISHER_TYPES = ("empirical", "true")


@dataclass(frozen=True)
class FactorConfig:
    """Settings that determine the fitted factors (all of them go into the cache key).

    Attributes:
        strategy: a registered strategy (:mod:`influent.curvature.strategies`): ``identity``,
            ``diagonal``, ``kfac`` or ``ekfac``.
        modules: module selection (``all``, ``trainable``, ``mlp`` or a regex; see ``select_linear_modules``).
        fisher: ``empirical`` (training labels) or ``true`` (labels sampled from the model, seeded).
        damping: absolute damping added to the curvature (loss per squared parameter unit), or None for
            the heuristic.
        damping_fraction: heuristic damping = this fraction of each module's mean eigenvalue
            (kronfluence's rule).
        seed: seed of the sampled labels (true Fisher).
    """

    strategy: str = "ekfac"
    modules: str = "all"
    fisher: str = "empirical"
    damping: float | None = None
    damping_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`~influent.errors.UserError` naming the field of the first bad setting."""
        get_strategy(self.strategy)
        if self.fisher not in FISHER_TYPES:
            raise UserError(
                f"fisher: expected one of {', '.join(FISHER_TYPES)}, got {self.fisher!r}", field="fisher"
            )
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}", field="damping")
        if not (math.isfinite(self.damping_fraction) and self.damping_fraction > 0):
            raise UserError(
                f"damping_fraction must be a finite number > 0, got {self.damping_fraction}",
                field="damping_fraction",
            )
