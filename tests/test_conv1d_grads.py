"""GPT-2's ``Conv1D`` is tracked like ``nn.Linear``: per-example gradients against autograd, one example at a time."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import tiny_lm_folder

from influent.curvature.linear_grads import module_shapes, per_example_linear_grads, select_linear_modules
from influent.data.lm_text import lm_batches, tokenize_documents
from influent.models.causal_lm import CausalLMTask, load_causal_lm


def test_conv1d_per_example_grads_are_the_transposed_weight_grads(tmp_path):
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = load_causal_lm(str(tiny_lm_folder(tmp_path, "gpt2")))
    model = model.double()
    modules = select_linear_modules(model, "all")
    conv = {n: m for n, m in modules.items() if isinstance(m, Conv1D)}
    assert len(conv) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj in each of 2 blocks
    assert module_shapes({"x": conv["transformer.h.0.mlp.c_fc"]}) == {"x": (32, 9)}
    seqs = tokenize_documents(tokenizer, [("the cat sat on the mat and the dog", None), ("paris is big", None)], 16)
    task = CausalLMTask()
    batch = lm_batches(seqs, 2, tokenizer.pad_token_id)[0]  # the second example is padded
    got = per_example_linear_grads(model, task, batch, conv)
    for i, seq in enumerate(seqs):
        single = lm_batches([seq], 1, tokenizer.pad_token_id)[0]
        model.zero_grad()
        task.per_example_loss(model, single).sum().backward()
        for name, m in conv.items():
            want = torch.cat([m.weight.grad.T, m.bias.grad[:, None]], dim=1)
            assert torch.allclose(got[name][i], want, rtol=1e-8, atol=1e-12), name
