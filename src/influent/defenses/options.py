"""The options of :func:`~influent.defenses.audit.run_audit`, validated before any model work.

Errors are :class:`~influent.errors.UserError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from influent.checks import check_choice, check_number, check_text
from influent.defenses.audit import QUERY_MODES
from influent.defenses.rankers import QUERY_RANKERS, RANKERS
from influent.errors import UserError


@dataclass(frozen=True)
class AuditOptions:
    """Settings of one audit (every training example ranked by suspicion).

    Attributes:
        rankers: ranker names (None: every one the data allows).
        primary: the ranker that orders the list (None: the audit's default).
        queries_from: ``validation``, ``misclassified`` or ``none``.
        trigger: suspected trigger phrase, or None.
        query_file: the user's own labelled queries, or None.
        damping: added to the Hessian before inverting (>= 0).
        folds: folds of the out-of-fold baselines (>= 2).
        top: write only the ``top`` most suspicious rows (>= 1) or None (all).
        l2: the head's ridge coefficient (> 0) or None (the default).
        seed: seeds the split, folds and tie-breaking (>= 0).
        truth: the known-bad examples (a file of ids or a column of the data), or None; needs every row
            written (no ``top``).
    """

    rankers: tuple[str, ...] | list[str] | None = None
    primary: str | None = None
    queries_from: str = "validation"
    trigger: str | None = None
    query_file: str | None = None
    damping: float = 0.0
    folds: int = 5
    top: int | None = None
    l2: float | None = None
    seed: int = 0
    truth: str | None = None

    def __post_init__(self) -> None:
        if self.rankers is not None:
            if not self.rankers:
                raise UserError("rankers needs one or more ranker names", field="rankers")
            for name in self.rankers:
                check_choice("rankers", name, RANKERS)
        if self.primary is not None:
            check_choice("primary", self.primary, RANKERS)
            has_queries = self.trigger is not None or self.query_file is not None or self.queries_from != "none"
            if self.primary in QUERY_RANKERS and not has_queries:
                raise UserError(f"primary {self.primary!r} needs queries (queries_from, trigger or query_file)",
                                field="primary")
        check_choice("queries_from", self.queries_from, QUERY_MODES)
        check_text("trigger", self.trigger)
        check_number("damping", self.damping, low=0)
        check_number("folds", self.folds, low=2, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        if self.top is not None:
            check_number("top", self.top, low=1, integer=True)
        check_text("truth", self.truth)
        if self.truth is not None and self.top is not None:
            raise UserError("truth needs every example ranked (precision and recall against the share checked); "
                            "drop top", field="truth")
        if self.l2 is not None:
            check_number("l2", self.l2, low=0, low_open=True)

    def as_kwargs(self) -> dict:
        """:func:`~influent.defenses.audit.run_audit` keywords."""
        return asdict(self)
