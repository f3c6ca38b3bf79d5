"""The capture pass of ``trace`` on SmolLM2-135M-Instruct: the vocabulary head at every position (full logits)
against the head at the completion-predicting positions only (``causal_lm.plain_head`` / ``target_nll``).

One capture pass = forward + backward to the output gradients of every tracked MLP module (all 30 blocks'
``gate/up/down_proj``), what an EK-FAC fit or a scoring pass pays per batch. ``--pairs`` prompt/completion
pairs (a review-style prompt of about 29 tokens, a one-token completion, the instruction-poison shape), batches
of 8, one thread; the two variants alternate ``--rounds`` times in one process (same load). Prints one JSON
line: seconds per pass of each (the fastest and the median), their ratio, and the largest difference of the
per-sequence losses (the two are the same number up to float rounding).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/lm_head_speed.py``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from influent.curvature.linear_grads import captured_passes, select_linear_modules
from influent.data.lm_text import lm_batches, pair_ids, pair_sequence
from influent.models import causal_lm
from influent.models.causal_lm import CausalLMTask, load_causal_lm, mlp_pattern


def capture_seconds(model, modules, batches) -> tuple[float, torch.Tensor]:
    """Seconds of one capture pass over ``batches`` and the per-sequence losses it differentiated."""
    t0 = time.perf_counter()
    losses = [f.detach() for f, _ in captured_passes(model, CausalLMTask(), modules, batches)]
    return time.perf_counter() - t0, torch.cat(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(None, progress=False)
    prompts = [f"Review: the film number {i} was a long and winding story about love, loss and a dog. "
               "Is this review positive or negative?" for i in range(args.pairs)]
    seqs = [pair_sequence(*pair_ids(tok, p, " negative"), tok) for p in prompts]
    batches = lm_batches(seqs, 8, tok.pad_token_id)
    modules = select_linear_modules(model, mlp_pattern(model))
    targets_head = causal_lm.plain_head
    times: dict[str, list[float]] = {"full_logits": [], "head_at_targets": []}
    losses = {}
    for _ in range(args.rounds):
        for variant, seconds_list in times.items():
            causal_lm.plain_head = targets_head if variant == "head_at_targets" else (lambda m: None)
            seconds, losses[variant] = capture_seconds(model, modules, batches)
            seconds_list.append(round(seconds, 3))
    causal_lm.plain_head = targets_head
    result = {
        "benchmark": "lm_head_speed",
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}", "python", *sys.argv]),
        "settings": vars(args),
        "tokens_per_sequence": float(np.mean([len(s.input_ids) for s in seqs])),
        "tracked_modules": len(modules),
        "seconds": times,
        "speedup_of_best_times": round(min(times["full_logits"]) / min(times["head_at_targets"]), 2),
        "speedup_of_medians": round(float(np.median(times["full_logits"]) / np.median(times["head_at_targets"])), 2),
        "max_loss_difference": float((losses["full_logits"] - losses["head_at_targets"]).abs().max()),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
