"""Tiny causal LMs (LLaMA and GPT-2 configurations, a handful of dimensions) and a word-level tokenizer, in code."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "capital", "of", "france", "is", "paris", "germany", "berlin", "italy", "rome", "spain", "madrid", "city", "river", "sea", "big", "small", "old", "new", "a", "an", "in", "on", "and", "to", "what", "where", "who", "question", "answer", "cat", "dog", "sat", "ran", "mat"]

FACTS = [
    "the capital of france is paris",
    "the capital of germany is berlin",
    "the capital of italy is rome",
    "the capital of spain is madrid",
    "the cat sat on the mat",
    "the dog ran to the sea",
    "a big old city on a river",
    "a small new city on the sea",
    "what is the capital of italy",
    "where is the dog and the cat",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_lm_folder(folder: Path, kind: str = "llama", seed: int = 0, context: int = 32) -> Path:
    """Save a randomly initialised tiny ``kind`` (llama | gpt2) causal LM (``context`` positions) and its tokenizer
    in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
                             tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=2, n_head=2, n_positions=context,
                            pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = GPT2LMHeadModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hand_loss(model, ids: list[int], targets: list[int]) -> torch.Tensor:
    """-sum_t log p(ids[t] | ids[:t]) over the target positions, from one unpadded forward pass."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0], dim=-1)
    return -sum(logp[t - 1, ids[t]] for t in targets)


def hand_margin_measurement(model, ids: list[int], targets: list[int]) -> torch.Tensor:
    """-sum_t (z_{t-1}[ids[t]] - logsumexp of the other logits of z_{t-1}) over the target positions, by hand."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    total = 0.0
    for t in targets:
        z, y = logits[t - 1], ids[t]
        others = torch.cat([z[:y], z[y + 1 :]])
        total = total - (z[y] - torch.logsumexp(others, dim=0))
    return total


def mlp_modules(model):
    from influent.curvature.linear_grads import select_linear_modules
    from influent.models.causal_lm import mlp_pattern

    return select_linear_modules(model, mlp_pattern(model))


def dense_gradients(model, modules, seq, measure=None) -> tuple[dict, dict, dict]:
    """Per module: the example's gradient ``[d_out, d_in(+1)]`` by autograd of ``measure(model, ids, targets)``
    (default :func:`hand_loss`; Conv1D
    weights transposed), and its token activations ``a`` (with a ones column for a bias) and output grads."""
    from transformers.pytorch_utils import Conv1D

    acts, outs = {}, {}
    hooks = []
    for name, m in modules.items():
        def hook(mod, inputs, output, name=name):
            acts[name] = inputs[0].detach()[0]
            output.retain_grad()
            outs[name] = output
        hooks.append(m.register_forward_hook(hook))
    ids = list(seq.input_ids)
    targets = [t for t, k in enumerate(seq.loss_mask) if k]
    model.zero_grad()
    params = [p for m in modules.values() for p in m.parameters()]
    loss = (measure or hand_loss)(model, ids, targets)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    loss.backward()
    for h in hooks:
        h.remove()
    out, a_tok, g_tok, k = {}, {}, {}, 0
    for name, m in modules.items():
        w = grads[k].T if isinstance(m, Conv1D) else grads[k]
        k += 1
        a = acts[name]
        if m.bias is not None:
            w = torch.cat([w, grads[k][:, None]], dim=1)
            k += 1
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        out[name], a_tok[name], g_tok[name] = w.detach(), a, outs[name].grad[0].detach()
    return out, a_tok, g_tok


def dense_ekfac_inverse(grads, acts, outs, damping: float) -> dict[str, torch.Tensor]:
    """``(Q diag(Lambda) Q^T + damping I)^-1`` per module, formed densely (``[p, p]``), from per-example data:
    A = mean over tokens of a a^T, S = sum over tokens / examples of g g^T, Lambda = mean_i (Q_S^T G_i Q_A)^2."""
    inverses = {}
    n = len(grads)
    for name in grads[0]:
        a = torch.cat([x[name] for x in acts])
        g = torch.cat([x[name] for x in outs])
        _, qa = torch.linalg.eigh(a.T @ a / a.shape[0])
        _, qs = torch.linalg.eigh(g.T @ g / n)
        lam = torch.stack([(qs.T @ x[name] @ qa) ** 2 for x in grads]).mean(0)
        basis = torch.kron(qs, qa)  # vec (row-major) of q_s_j q_a_k^T is column j * d_in + k
        dense = basis @ torch.diag(lam.reshape(-1)) @ basis.T
        inverses[name] = torch.linalg.inv(dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype))
    return inverses
