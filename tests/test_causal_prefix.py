"""The cached-prefix fast path of a causal LM equals the full model (losses, gradients, influence, training)."""

from __future__ import annotations

import pytest
import torch
from lm_fixtures import tiny_tokenizer

from influent.data.lm_text import lm_batches, pair_ids, pair_sequence
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import CausalLMTask, fine_tune, freeze_all_but_last_blocks, trainable_state
from influent.models.causal_prefix import (
    CachedCausalTask,
    CausalSuffix,
    HeadNLL,
    PrefixCache,
    ScoredPair,
    TrainingCausalTask,
    cached_batches,
    first_target_logprobs,
    pair_losses,
)

PAIRS = [("the capital of france is", "paris"), ("the cat sat on the", "mat"),
         ("where is the big old", "city and river"), ("the dog ran to", "the sea"),
         ("what is the capital of", "italy"), ("a small new", "city")]


def tiny_llama(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=12, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return LlamaForCausalLM(config).double().eval(), tok


def both(tok):
    ids = [pair_ids(tok, p, c) for p, c in PAIRS]
    full = lm_batches([pair_sequence(p, c, tok) for p, c in ids], 3, tok.pad_token_id)
    scored = [ScoredPair(tuple(p), tuple(c)) for p, c in ids]
    return full, scored


def grads(model, task, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in batches:
        for i in range(task.batch_size(b)):
            row = {k: v[i:i + 1] for k, v in b.items()}
            out.append(torch.cat([g.flatten() for g in torch.autograd.grad(task.per_example_loss(model, row).sum(),
                                                                          params)]))
    return torch.stack(out)


@pytest.mark.parametrize("last_k", [1, 2])
def test_losses_and_gradients_equal_the_full_model(last_k):
    model, tok = tiny_llama()
    freeze_all_but_last_blocks(model, last_k)
    full, scored = both(tok)
    suffix = CausalSuffix(model, last_k)
    cache = PrefixCache(model, last_k)
    fast = cached_batches(cache, scored, 4)  # other batching than the full model's: padding must not matter
    full_loss = torch.cat([CausalLMTask().per_example_loss(model, b) for b in full]).detach()
    torch.testing.assert_close(pair_losses(suffix, fast), full_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(suffix, CachedCausalTask(), fast), grads(model, CausalLMTask(), full),
                               rtol=1e-7, atol=1e-10)
    # the suffix trains the full model's own parameters (shared, not copied)
    assert {id(p) for p in suffix.parameters() if p.requires_grad} == \
        {id(p) for p in model.parameters() if p.requires_grad}


def test_influence_on_the_fast_path_equals_the_full_model():
    model, tok = tiny_llama()
    freeze_all_but_last_blocks(model, 2)
    full, scored = both(tok)
    suffix = CausalSuffix(model, 2)
    fast = cached_batches(PrefixCache(model, 2), scored, 3)
    mlp = r"\.mlp\.(gate_proj|up_proj|down_proj)$"  # the suffix's blocks 0, 1 are the full model's 1, 2
    config = FactorConfig(strategy="identity", modules=r"layers\.[12]" + mlp, damping=0.0)
    slow = FactoredInfluence(model, CausalLMTask(), full, config, progress=False).pairwise_scores(full[:1])
    config = FactorConfig(strategy="identity", modules=mlp, damping=0.0)
    quick = FactoredInfluence(suffix, CachedCausalTask(), fast, config, progress=False,
                              bucket=False).pairwise_scores(fast[:1])
    torch.testing.assert_close(quick[:3], slow, rtol=1e-7, atol=1e-12)


def tuned_on_both_paths(last_k: int, epochs: int, seed: int, task, **fast_options) -> list[dict]:
    """Trainable weights after plain ``fine_tune`` of the full model, then after tuning its
    :class:`CausalSuffix` on cached prefix states with ``task`` and ``fast_options``."""
    runs = []
    for path in ("full", "fast"):
        model, tok = tiny_llama()
        freeze_all_but_last_blocks(model, last_k)
        full, scored = both(tok)
        if path == "full":
            fine_tune(model, lambda g, full=full: full, epochs=epochs, lr=1e-2, seed=seed, progress=False)
        else:
            suffix = CausalSuffix(model, last_k)
            fast = cached_batches(PrefixCache(model, last_k), scored, 3)
            fine_tune(suffix, lambda g, fast=fast: fast, epochs=epochs, lr=1e-2, seed=seed, progress=False,
                      task=task, **fast_options)
        runs.append(trainable_state(model))
    return runs


def test_fine_tuning_on_the_fast_path_equals_the_full_model():
    runs = tuned_on_both_paths(2, epochs=2, seed=3, task=CachedCausalTask())
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-6, atol=1e-9)


def test_chunked_head_nll_equals_log_softmax_and_autograd(monkeypatch):
    import influent.models.causal_prefix as cp

    monkeypatch.setattr(cp, "HEAD_CHUNK", 7)  # 31 rows: 5 chunks, the last one partial
    torch.manual_seed(1)
    weight = torch.randn(31, 5, dtype=torch.float64) * 3
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 30, 7, 6, 13, 13])
    want = -torch.log_softmax(x @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    got = HeadNLL.apply(x, weight, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_fused_optimizer_and_frozen_head_train_the_same_weights_as_the_plain_full_model(monkeypatch):
    """The instruction victim's training loop (fused AdamW, the chunked head loss on the fast path) against
    plain AdamW on the full model with its own ``lm_head`` call: same weights after 3 epochs."""
    import influent.models.causal_prefix as cp

    monkeypatch.setattr(cp, "HEAD_CHUNK", 5)
    runs = tuned_on_both_paths(1, epochs=3, seed=5, task=TrainingCausalTask(), fused=True)
    for k in runs[0]:
        assert not torch.equal(runs[0][k], tiny_llama()[0].state_dict()[k])  # it did train
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-6, atol=1e-9)


def test_frozen_head_follows_its_weight_and_one_pass_scores_equal_pair_losses():
    model, tok = tiny_llama()
    freeze_all_but_last_blocks(model, 1)
    suffix = CausalSuffix(model, 1)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(suffix.head(x), model.lm_head(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # an in-place change of the (tied) weight must not leave a stale transposed copy
        model.lm_head.weight.mul_(2.0)
    torch.testing.assert_close(suffix.head(x), model.lm_head(x), rtol=1e-12, atol=1e-12)
    _, scored = both(tok)
    single = [p for p in scored if len(p.completion_ids) == 1]
    cache = PrefixCache(model, 1)
    candidates = sorted({p.completion_ids[0] for p in single})
    logp = first_target_logprobs(suffix, cached_batches(cache, single, 2), candidates)
    for j, c in enumerate(candidates):
        as_pairs = [ScoredPair(p.prompt_ids, (c,)) for p in single]
        torch.testing.assert_close(-logp[:, j], pair_losses(suffix, cached_batches(cache, as_pairs, 3)),
                                   rtol=1e-12, atol=1e-12)


def test_prefix_cache_round_trips_through_safetensors(tmp_path):
    model, tok = tiny_llama()
    _, scored = both(tok)
    cache = PrefixCache(model, 2, tmp_path / "prefix.safetensors")
    first = cache.get(p.input_ids for p in scored)
    cache.save()
    again = PrefixCache(model, 2, tmp_path / "prefix.safetensors")
    assert len(again.states) == len(scored)
    for a, b in zip(first, again.get(p.input_ids for p in scored)):
        assert torch.equal(a, b)
