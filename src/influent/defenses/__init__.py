"""Rankers of suspicious training examples (influence-based and baselines), their evaluation, the audit."""

from influent.defenses.audit import run_audit
from influent.defenses.inputs import factored_audit_inputs, head_audit_inputs
from influent.defenses.rankers import RANKERS, AuditInputs, score_all, score_rankers

__all__ = ["RANKERS", "AuditInputs", "factored_audit_inputs", "head_audit_inputs", "run_audit", "score_all",
           "score_rankers"]
