"""The fast path of a causal LM whose last K blocks train: cached prefix, vocabulary head at the targets only.

With only the last ``K`` transformer blocks trainable, the embeddings and the first ``L - K`` blocks are a
fixed function of the input: the hidden states entering block ``L - K`` are computed once per input
(:class:`PrefixCache`, eval mode, kept in memory and optionally saved as safetensors through
:mod:`influent.store`) and training, evaluation and influence run through the *suffix* only
(:class:`CausalSuffix`: the last ``K`` blocks, the final norm and the vocabulary head). The head (for
SmolLM2 a tied ``49152 x 576`` matrix, per token as costly as about 8 blocks) is evaluated only at the
positions that predict a target token, so a prompt/completion pair with a one-word completion costs one
head evaluation instead of ``T``.

A *scored pair* (:class:`ScoredPair`) is a prompt and a completion: the suffix's input is
``prompt + completion[:-1]`` (the last completion token predicts nothing that counts) and its targets are
the completion tokens, predicted at positions ``len(prompt) - 1 ...``. All completions of one prompt whose
length is one token share one cached input. The per-example loss (:class:`CachedCausalTask`) is the summed
negative log-likelihood of the completion tokens (nats), the same number as
:class:`~influent.models.causal_lm.CausalLMTask` on ``prompt + completion`` with the completion as the loss
mask (tested, with the trainable parameters' gradients, against the full model).

For LLaMA-style Hugging Face models (``model.model`` with ``layers``, ``norm``, ``rotary_emb``) the suffix holds
the full model's own modules (training the suffix trains the full model): the first ``K - 1`` of the last ``K``
blocks are called as they are, with a causal mask built here and rotary positions ``0..T-1`` (as the full
model has them for right-padded inputs); the last block is evaluated at the target positions only
(:func:`target_block`). No dropout is drawn (SmolLM2 has none; attention dropout is not applied here).
With single-token completions the EK-FAC factors of the last block's MLP are then fitted on the target
position only (its other positions carry zero gradient; the full model's factors would also average their
activations), so factored influence on the fast path uses a slightly different, gradient-supported
activation covariance for that block; the gradients themselves are the full model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influent import store
from influent.errors import UserError
from influent.models.causal_lm import transformer_blocks
from influent.task import Task


@dataclass(frozen=True)
class ScoredPair:
    """A prompt and a completion as token ids (prompt with the tokenizer's special tokens)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    def __post_init__(self):
        if not self.prompt_ids or not self.completion_ids:
            raise UserError("a scored pair needs at least one prompt token and one completion token",
                            field="data")

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the suffix reads: ``prompt + completion[:-1]``."""
        return self.prompt_ids + self.completion_ids[:-1]

    @property
    def target_positions(self) -> tuple[int, ...]:
        """Positions whose output predicts each completion token."""
        start = len(self.prompt_ids) - 1
        return tuple(range(start, start + len(self.completion_ids)))


def supports_causal_prefix(model: nn.Module) -> bool:
    """Whether ``model`` has the LLaMA-style layout the suffix copy needs."""
    base = getattr(model, "model", None)
    return all(hasattr(base, a) for a in ("layers", "norm", "rotary_emb")) and hasattr(model, "lm_head")


class CausalSuffix(nn.Module):
    """The last ``K`` blocks + final norm + vocabulary head, parameters shared with the full model.

    ``forward(batch)`` takes a cached batch (:func:`cached_batches`) and returns the logits at its target
    positions, ``[B, C, V]``. The first ``K - 1`` blocks run at every position (their outputs are the last
    block's keys and values); the **last block runs at the target positions only** (its keys and values
    still cover every position: :func:`target_block`), since nothing else of its output reaches the loss.
    """

    def __init__(self, model: nn.Module, last_k: int):
        super().__init__()
        if not supports_causal_prefix(model):
            raise UserError(f"the cached-prefix fast path needs a LLaMA-style model, not {type(model).__name__}",
                            field="base_model")
        blocks = transformer_blocks(model)
        if not 1 <= last_k <= len(blocks):
            raise UserError(f"last_k must be between 1 and {len(blocks)}, got {last_k}", field="last_k")
        self.layers = nn.ModuleList(list(blocks)[len(blocks) - last_k:])
        self.norm, self.rotary_emb, self.lm_head = model.model.norm, model.model.rotary_emb, model.lm_head
        self.last_k = last_k
        self._head_t: tuple[tuple, torch.Tensor] | None = None  # (weight identity and version, weight.T copy)

    def target_states(self, batch: dict) -> torch.Tensor:
        """The final-norm hidden states at the target positions, ``[B, C, H]``."""
        h, att, pos = batch["inputs_embeds"], batch["attention_mask"], batch["target_pos"]
        b, t, _ = h.shape
        position_ids = torch.arange(t, device=h.device)[None].expand(b, t)
        cos, sin = self.rotary_emb(h, position_ids)
        keys = torch.arange(t, device=h.device)
        allowed = (keys[None, None, :] <= keys[None, :, None]) & att[:, None, :].bool()  # [B, T(query), T(key)]
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed,
                                                                                     torch.finfo(h.dtype).min)
        for layer in list(self.layers)[:-1]:
            h = layer(h, attention_mask=mask[:, None], position_ids=position_ids, position_embeddings=(cos, sin))
        return self.norm(target_block(self.layers[-1], h, att, pos, cos, sin))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.target_states(batch))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The vocabulary head's logits of states ``x`` ``[..., H]`` -> ``[..., V]``.

        A frozen, bias-free head (SmolLM2's tied embedding) runs as :class:`FrozenLinear` on a contiguous
        transposed copy of its weight (refreshed when the weight changes): the same logits and input
        gradient as ``lm_head(x)`` up to float rounding, about 2x faster on CPU at small batches.
        """
        w = self.lm_head.weight
        if w.requires_grad or getattr(self.lm_head, "bias", None) is not None:
            return self.lm_head(x)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._head_t is None or self._head_t[0] != key:
            self._head_t = (key, w.detach().t().contiguous())
        return FrozenLinear.apply(x, w.detach(), self._head_t[1])


class FrozenLinear(torch.autograd.Function):
    """``x @ weight.T`` for a weight that takes no gradient, given also as ``weight_t`` (``weight.T``,
    contiguous): the forward multiplies by ``weight_t`` and the backward by ``weight``, each the fast
    memory layout of a dense matmul. Works under ``torch.func`` transforms (vmap, jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, weight_t):
        return x @ weight_t

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, weight_t_tangent):
        (weight_t,) = ctx.saved_tensors
        return x_tangent @ weight_t


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows ``pos`` ``[B, C]`` of ``x`` ``[B, T, D]`` -> ``[B, C, D]``."""
    return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))


def target_block(layer: nn.Module, h, attention_mask, pos, cos, sin) -> torch.Tensor:
    """A LLaMA decoder block's output at positions ``pos`` only, ``[B, C, H]``.

    Queries, the attention output, the residual stream and the MLP at ``pos``; keys and values (rotary
    embedded) at every position, causally masked (key ``j`` visible to position ``p`` iff ``j <= p`` and ``j``
    is a real token). Same function as the block's own forward at those positions (tested to float rounding).
    """
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    attn = layer.self_attn
    b, t, _ = h.shape
    d = attn.head_dim
    x = layer.input_layernorm(h)
    xq = _at(x, pos)
    q = attn.q_proj(xq).view(b, pos.shape[1], -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    cq, sq = _at(cos, pos)[:, None], _at(sin, pos)[:, None]
    q = q * cq + rotate_half(q) * sq
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, heads, C, T]
    keys = torch.arange(t, device=h.device)
    allowed = (keys[None, None, :] <= pos[:, :, None]) & attention_mask[:, None, :].bool()
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    ctx = (weights @ v).transpose(1, 2).reshape(b, pos.shape[1], -1)
    r = _at(h, pos) + attn.o_proj(ctx)
    return r + layer.mlp(layer.post_attention_layernorm(r))


class CachedCausalTask(Task):
    """Summed completion-token NLL (nats per pair) of a :class:`CausalSuffix` on cached batches; no L2."""

    l2 = 0.0

    def model_output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    def output_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        logp = torch.log_softmax(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), dim=-1)
        nll = -logp.gather(-1, batch["target_ids"][..., None]).squeeze(-1)
        return (nll * batch["target_mask"].to(nll.dtype)).sum(1)

    def token_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


class TrainingCausalTask(CachedCausalTask):
    """:class:`CachedCausalTask` for training only: the same per-pair losses, with a frozen bias-free head
    evaluated by :class:`HeadNLL` (one chunked pass over the vocabulary for the loss and its gradient; the
    logits are never materialised). Not for curvature (no :meth:`model_output` path, no double backward)."""

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        head = getattr(model, "lm_head", None)
        if not isinstance(model, CausalSuffix) or head.weight.requires_grad or getattr(head, "bias", None) is not None:
            return super().per_example_loss(model, batch)
        states = model.target_states(batch)  # [B, C, H]
        b, c, h = states.shape
        nll = HeadNLL.apply(states.reshape(b * c, h), head.weight.detach(), batch["target_ids"].reshape(-1))
        return (nll.view(b, c) * batch["target_mask"].to(nll.dtype)).sum(1)


class HeadNLL(torch.autograd.Function):
    """``-log softmax(x @ weight.T)[target]`` per row (nats, float32 or wider) and its gradient in ``x``,
    from one pass over the vocabulary in chunks of ``HEAD_CHUNK`` rows of ``weight`` (an online softmax:
    running max, normaliser and softmax-weighted sum of weight rows). Each chunk is multiplied twice while
    it is in cache, so the ``V x H`` weight is read from memory once per step instead of twice (forward
    and backward); the result equals ``log_softmax`` and autograd up to float rounding (tested).
    ``weight`` takes no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        dtype = torch.promote_types(x.dtype, torch.float32)
        n = x.shape[0]
        m = torch.full((n, 1), -torch.inf, dtype=dtype, device=x.device)
        z = torch.zeros(n, 1, dtype=dtype, device=x.device)
        acc = torch.zeros(n, x.shape[1], dtype=dtype, device=x.device)
        for c in range(0, weight.shape[0], HEAD_CHUNK):
            w = weight[c:c + HEAD_CHUNK]
            logits = (x @ w.t()).to(dtype)
            new_m = torch.maximum(m, logits.amax(-1, keepdim=True))
            decay, e = torch.exp(m - new_m), torch.exp(logits - new_m)
            z = z * decay + e.sum(-1, keepdim=True)
            acc = acc * decay + (e.to(w.dtype) @ w).to(dtype)
            m = new_m
        w_y = weight[targets]
        nll = (m + torch.log(z)).squeeze(-1) - (x * w_y).sum(-1).to(dtype)
        ctx.save_for_backward((acc / z - w_y.to(dtype)).to(x.dtype))
        return nll

    @staticmethod
    def backward(ctx, grad):
        (dx,) = ctx.saved_tensors
        return grad[:, None].to(dx.dtype) * dx, None, None


HEAD_CHUNK = 512  # rows of the head per step of HeadNLL: 1.2 MB of SmolLM2's float32 head, within L2


class _Captured(Exception):
    """Stops the forward pass once the prefix output is captured."""


class PrefixCache:
    """Hidden states entering block ``L - K`` per distinct input (``[T, H]`` float32, eval mode).

    Args:
        model: the full causal LM (its first ``L - K`` blocks must not change while the cache lives).
        last_k: the number of trainable blocks K.
        path: optional safetensors file: read on creation if present, written by :meth:`save`.
    """

    def __init__(self, model: nn.Module, last_k: int, path: str | Path | None = None, chunk: int = 16):
        self.model, self.last_k, self.chunk = model, last_k, chunk
        self.path = Path(path) if path is not None else None
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            tensors = store.read_tensors(self.path)
            for key, value in tensors.items():
                if key.startswith("ids/"):
                    self.states[tuple(int(i) for i in value.tolist())] = tensors["h/" + key[4:]]

    def save(self) -> None:
        """Write every cached state to :attr:`path` (atomic); nothing when nothing is new or no path."""
        if self.path is None or not self.dirty:
            return
        tensors = {}
        for i, (ids, h) in enumerate(self.states.items()):
            tensors[f"ids/{i}"] = torch.tensor(ids, dtype=torch.long)
            tensors[f"h/{i}"] = h
        store.write_tensors(self.path, tensors)
        self.dirty = False

    def get(self, inputs: Iterable[Sequence[int]]) -> list[torch.Tensor]:
        """The cached states of ``inputs`` (computed now where missing), in order."""
        inputs = [tuple(int(i) for i in x) for x in inputs]
        missing = sorted({x for x in inputs if x not in self.states}, key=len)
        for s in range(0, len(missing), self.chunk):
            part = missing[s:s + self.chunk]
            for ids, h in zip(part, self._compute(part)):
                self.states[ids] = h
            self.dirty = True
        return [self.states[x] for x in inputs]

    @torch.no_grad()
    def _compute(self, inputs: list[tuple[int, ...]]) -> list[torch.Tensor]:
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        mask = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        h = prefix_states(self.model, self.last_k, ids, mask)
        return [h[i, :len(x)].clone() for i, x in enumerate(inputs)]


def prefix_states(model: nn.Module, last_k: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Hidden states entering the first of the last ``last_k`` blocks, ``[B, T, H]`` (the forward stops there;
    the model is put in eval mode for the pass and restored)."""
    blocks = transformer_blocks(model)
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Captured

    handle = blocks[len(blocks) - last_k].register_forward_pre_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
        model.train(was)
    if not captured:
        raise RuntimeError("the forward pass never reached the first trainable block")
    return captured[0].detach()


def cached_batches(cache: PrefixCache, pairs: Sequence[ScoredPair], batch_size: int) -> list[dict]:
    """Right-padded cached batches of ``pairs`` in order: ``inputs_embeds`` ``[B, T, H]`` (zeros past the end),
    ``attention_mask`` ``[B, T]``, ``target_pos`` / ``target_ids`` / ``target_mask`` ``[B, C]`` (long).

    Pass ``bucket=False`` to the factored engine with these: the target arrays are not per-token.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    states = cache.get(p.input_ids for p in pairs)
    out = []
    for s in range(0, len(pairs), batch_size):
        part, hs = pairs[s:s + batch_size], states[s:s + batch_size]
        width, c = max(h.shape[0] for h in hs), max(len(p.completion_ids) for p in part)
        emb = hs[0].new_zeros(len(part), width, hs[0].shape[1])
        att = torch.zeros(len(part), width, dtype=torch.long)
        pos, tid, tmask = (torch.zeros(len(part), c, dtype=torch.long) for _ in range(3))
        for i, (p, h) in enumerate(zip(part, hs)):
            emb[i, :h.shape[0]] = h
            att[i, :h.shape[0]] = 1
            n = len(p.completion_ids)
            pos[i, :n] = torch.tensor(p.target_positions)
            tid[i, :n] = torch.tensor(p.completion_ids)
            tmask[i, :n] = 1
        out.append({"inputs_embeds": emb, "attention_mask": att, "target_pos": pos, "target_ids": tid,
                    "target_mask": tmask})
    return out


@torch.no_grad()
def pair_losses(suffix: CausalSuffix, batches: Sequence[dict]) -> torch.Tensor:
    """:class:`CachedCausalTask`'s loss of every pair in ``batches`` (``[N]`` float32 nats; eval mode)."""
    was = suffix.training
    suffix.eval()
    try:
        task = CachedCausalTask()
        return torch.cat([task.per_example_loss(suffix, b) for b in batches]) if batches else torch.zeros(0)
    finally:
        suffix.train(was)


@torch.no_grad()
def first_target_logprobs(suffix: CausalSuffix, batches: Sequence[dict], token_ids: Sequence[int]) -> torch.Tensor:
    """``log p(token | input)`` at each pair's first target position for every token of ``token_ids``,
    ``[N, len(token_ids)]`` (float32 or wider, nats; eval mode). For single-token completions ``-`` this is
    :func:`pair_losses` of each candidate completion, all candidates from one pass."""
    was = suffix.training
    suffix.eval()
    try:
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        out = []
        for b in batches:
            logits = suffix.head(suffix.target_states({**b, "target_pos": b["target_pos"][:, :1]}))[:, 0]
            out.append(torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)[:, ids])
        return torch.cat(out) if out else torch.zeros(0, len(ids))
    finally:
        suffix.train(was)


@torch.no_grad()
def last_states(suffix: CausalSuffix, batches: Sequence[dict]) -> torch.Tensor:
    """The suffix's final-norm hidden state at each pair's first target position, ``[N, H]`` (the
    representation that predicts the completion; for spectral signatures)."""
    out = [suffix.target_states(b)[:, 0] for b in batches]
    return torch.cat(out) if out else torch.zeros(0)
