"""Poisoning attacks on the head (label flips, input perturbation, trigger phrases), scored on clean labels."""

from influent.attacks.run import KINDS, run_attack, summarise

__all__ = ["KINDS", "run_attack", "summarise"]
