"""fine_tune's learning-rate schedules on a tiny LLaMA-config LM.

Independent truths: the linear schedule's values by hand; the parameters after :func:`fine_tune` equal a
hand-written loop that sets each step's learning rate from the formula (``lr * (T - t) / (T - w)`` after
``w`` warm-up steps ``lr * t / w``) on a plain AdamW; two runs with one seed give identical weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import FACTS, tiny_lm_folder

from influent.data.lm_text import lm_batches, tokenize_documents
from influent.errors import UserError
from influent.models.causal_lm import (
    CausalLMTask,
    fine_tune,
    freeze_all_but_last_blocks,
    load_causal_lm,
    lr_factor,
    trainable_state,
)


def test_linear_factor_by_hand():
    # 10 steps, 2 of warm-up: 0, 1/2, then 8/8, 7/8, ..., 1/8
    got = [lr_factor("linear", t, 10, 2) for t in range(10)]
    assert got == pytest.approx([0.0, 0.5] + [(10 - t) / 8 for t in range(2, 10)])
    assert [lr_factor("linear", t, 4) for t in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor("linear", 12, 10) == 0.0
    assert lr_factor("constant", 7, 10, 3) == 1.0
    with pytest.raises(UserError):
        lr_factor("cosine", 0, 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_lm_folder(tmp_path_factory.mktemp("sched"), "llama")
    model, tokenizer = load_causal_lm(str(folder))
    model = model.double()
    freeze_all_but_last_blocks(model, 1)
    seqs = tokenize_documents(tokenizer, [(f, None) for f in FACTS], max_length=8)
    return model, lm_batches(seqs, 3, tokenizer.pad_token_id), trainable_state(model)


def restore(model, state):
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def order(batches):
    def epoch(gen):
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return epoch


def hand_loop(model, batches, epochs, lr, seed, warmup):
    """Plain AdamW; the learning rate set by hand before every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total, t = epochs * len(batches), 0
    model.train()
    for _ in range(epochs):
        for batch in order(batches)(gen):
            rate = lr * t / warmup if t < warmup else lr * (total - t) / (total - warmup)
            for group in opt.param_groups:
                group["lr"] = rate
            loss = CausalLMTask().per_example_loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += 1
    model.eval()
    return trainable_state(model)


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_schedule_equals_hand_set_learning_rates(tiny, warmup):
    model, batches, base = tiny
    restore(model, base)
    want = hand_loop(model, batches, 3, 0.05, 4, warmup)
    restore(model, base)
    fine_tune(model, order(batches), epochs=3, lr=0.05, seed=4, progress=False, schedule="linear",
              warmup_steps=warmup)
    got = trainable_state(model)
    restore(model, base)
    fine_tune(model, order(batches), epochs=3, lr=0.05, seed=4, progress=False)  # constant: another path
    constant = trainable_state(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
    assert max(float((constant[k] - want[k]).abs().max()) for k in want) > 1e-4


def test_seeded_linear_run_is_deterministic(tiny):
    model, batches, base = tiny
    states = []
    for _ in range(2):
        restore(model, base)
        fine_tune(model, order(batches), epochs=2, lr=0.05, seed=9, progress=False, fused=True, schedule="linear",
                  warmup_steps=1)
        states.append(trainable_state(model))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])
