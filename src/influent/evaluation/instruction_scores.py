"""Scores of an instruction-tuned LM under a trigger phrase, on held-out inputs only.

:func:`evaluate`: per task, ``clean_accuracy`` on the untriggered held-out examples and ``success`` = the share
of triggered held-out inputs of the non-attacker label (:data:`~influent.data.instructions.TARGETS`) that
get the attacker's label. :func:`train_and_evaluate`: fine-tune from the base weights with a seed, then
evaluate (also after epoch 1 when more epochs follow: the early-stopping checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from influent.data.instructions import TARGETS, Example, InstructionData, triggered_inputs
from influent.models.instruction_lm import InstructionLM


def evaluate(lm: InstructionLM, data: InstructionData, trigger: str, tasks: Sequence[str]) -> dict[str, dict]:
    """Per task: ``success`` and ``clean_accuracy`` of the model as it is now, on held-out inputs only."""
    out = {}
    for task in tasks:
        clean = data.of("heldout", task)
        triggered = triggered_inputs(clean, task, trigger)
        pred_clean = lm.predict(clean)
        pred_trig = lm.predict(triggered)
        out[task] = {"clean_accuracy": float(np.mean(pred_clean == np.array([e.label for e in clean]))),
                     "success": float(np.mean(pred_trig == TARGETS[task])), "n_triggered": len(triggered),
                     "n_clean": len(clean)}
    return out


def train_and_evaluate(lm: InstructionLM, train: Sequence[Example], data: InstructionData, trigger: str,
                       seed: int, tasks: Sequence[str]) -> dict:
    """Fine-tune from the base weights with ``seed``, then :func:`evaluate` (and after epoch 1, if later
    epochs follow). Returns ``{"final": ..., "epoch1": ... or None, "loss": [per epoch], "seconds"}``."""
    early: dict = {}

    def snapshot(epoch: int) -> None:
        if epoch == 1 and lm.settings.epochs > 1:
            early["epoch1"] = evaluate(lm, data, trigger, tasks)

    t0 = time.perf_counter()
    history = lm.fit(train, seed, on_epoch=snapshot)
    seconds = time.perf_counter() - t0
    return {"final": evaluate(lm, data, trigger, tasks), "epoch1": early.get("epoch1"), "loss": history,
            "seconds": seconds}
