"""The instruction victim's tuning loop and label scoring: the plain path against the fast one, one process.

Plain: the vocabulary head as ``lm_head`` (logits at the target positions, ``log_softmax``), single-tensor
AdamW, both label words scored by two passes at the training batch size (8). Fast (the default since this
change): :class:`~influent.models.causal_prefix.HeadNLL` in training, fused AdamW, both label words from one
pass at batch 64. Both tune SmolLM2-135M-Instruct's last block for one epoch over the same 240 pairs with
seed 0, alternating plain, fast, plain, fast. Prints per run the seconds and, last, one JSON object with
them, the largest weight difference relative to the largest weight, the largest NLL difference (nats) and
the share of equal predictions on 150 held-out inputs.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/instruction_tuning_speed.py``
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch


def main() -> None:
    torch.set_num_threads(1)
    import influent.models.instruction_lm as il
    from influent.data.instructions import build_instructions
    from influent.models.causal_lm import fine_tune, trainable_state
    from influent.models.causal_prefix import CachedCausalTask, pair_losses

    data = build_instructions({"sentiment": (150, 10, 50), "kind": (75, 4, 25)}, max_words=20, seed=0)
    lm = il.load_instruction_lm(None, il.TrainSettings(epochs=1), progress=False)
    train, held = data.train[:240], data.heldout[:150]
    lm.batches(train)
    lm.batches(held)

    def plain_label_nll(examples):
        out = np.zeros((len(examples), 2))
        for label in (0, 1):
            out[:, label] = pair_losses(lm.suffix, lm.batches(examples, [label] * len(examples))).numpy()
        return out

    res: dict = {}
    for name in ("plain", "fast", "plain", "fast"):
        if name == "plain":
            lm.suffix.head = lm.suffix.lm_head  # the module call instead of FrozenLinear
            il.fine_tune = lambda *a, **k: fine_tune(*a, **{**k, "fused": False, "task": CachedCausalTask()})
        else:
            del lm.suffix.head
            il.fine_tune = fine_tune
        t = time.perf_counter()
        lm.fit(train, 0)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        nll = plain_label_nll(held) if name == "plain" else lm.label_nll(held)
        res.setdefault(name, []).append({"fit_s": fit_s, "eval_s": time.perf_counter() - t,
                                         "load": os.getloadavg()[0]})
        res.setdefault(name + "_w", trainable_state(lm.model))
        res.setdefault(name + "_nll", nll)
        print(name, res[name][-1], file=sys.stderr, flush=True)
    w0, w1 = res["plain_w"], res["fast_w"]
    pred = [(res[k][:, 1] < res[k][:, 0]) for k in ("plain_nll", "fast_nll")]
    print(json.dumps({"plain": res["plain"], "fast": res["fast"],
                      "max_rel_weight_diff": max(float((w0[k] - w1[k]).abs().max() / w0[k].abs().max()) for k in w0),
                      "max_nll_diff": float(np.abs(res["plain_nll"] - res["fast_nll"]).max()),
                      "pred_agree": float(np.mean(pred[0] == pred[1]))}))


if __name__ == "__main__":
    main()
