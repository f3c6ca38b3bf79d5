"""Rankers of suspicious training examples (influence-based and baselines), their evaluation, the audit."""

from influent.defenses.audit import run_audit
from influent.defenses.rankers import RANKERS, HeadAuditData, score_all

__all__ = ["RANKERS", "HeadAuditData", "run_audit", "score_all"]
