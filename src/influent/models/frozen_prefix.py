"""Cache the frozen prefix of a partially fine-tuned encoder: retrain only the trainable suffix.

With ``--fine-tune-last K`` the embeddings and the first ``L - K`` encoder layers never change, so their
output (the hidden states entering the first trainable layer) is a fixed function of the input. Computing it
once and running only the last ``K`` layers, the pooler and the head on it is the same computation as the
full model, at a fraction of the cost per retrain (the embedding lookup and ``L - K`` layers are skipped;
for MiniLM with K = 1 about 6x less work per step).

:func:`split_frozen_prefix` builds the *suffix model*: a copy of the classifier whose embeddings module
passes ``inputs_embeds`` through unchanged and whose layer list holds only the trainable layers, so the
Hugging Face forward (attention-mask construction, pooler, dropout, classifier) is reused as is.
:func:`cache_hidden_states` runs the frozen prefix once (eval mode) and returns batches with
``inputs_embeds`` (the cached hidden states), ``attention_mask`` and ``labels``; :class:`CachedPrefixTask`
feeds them to the suffix model. Tracked parameters come in the same order as in the full model, so flat
parameter vectors are interchangeable.

Dropout: the cached prefix is deterministic (eval mode). Training the full model with dropout on would
also drop units inside the frozen layers; the procedure used here is "dropout in the trainable layers
only", which the full model reproduces exactly when the prefix's dropout probabilities are 0
(:func:`disable_prefix_dropout`; tested to float tolerance).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from influent.errors import UserError
from influent.models.finetuned import FinetunedTask, encoder_layers
from influent.task import slice_batch


class _PassThroughEmbeddings(nn.Module):
    """Stands in for the embeddings module: returns ``inputs_embeds`` (the cached hidden states) as is."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            raise ValueError("the frozen-prefix suffix model takes inputs_embeds (cached hidden states)")
        return inputs_embeds


def supports_frozen_prefix(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face encoder classifier whose prefix can be cut (BERT-like layout)."""
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(base, "embeddings"):
        return False
    try:
        encoder_layers(model)
    except UserError:
        return False
    return True


def _layer_list_owner(model: nn.Module) -> tuple[nn.Module, str]:
    layers = encoder_layers(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise ValueError("cannot locate the encoder layer list")


def split_frozen_prefix(model: nn.Module, last_k: int) -> nn.Module:
    """The suffix model: a copy of ``model`` running only its last ``last_k`` layers on cached hidden states.

    The copy has ``requires_grad`` as in ``model`` (the trainable layers, pooler and head) and is in eval mode.
    """
    layers = encoder_layers(model)
    if not 1 <= last_k <= len(layers):
        raise UserError(f"last_k must be between 1 and {len(layers)}, got {last_k}", field="last_k")
    base = model.base_model
    # deep-copy without the (large, frozen) embeddings and prefix layers
    owner, attr = _layer_list_owner(model)
    saved_emb, saved_layers = base.embeddings, getattr(owner, attr)
    try:
        base.embeddings = _PassThroughEmbeddings()
        setattr(owner, attr, nn.ModuleList(list(saved_layers)[len(saved_layers) - last_k :]))
        suffix = copy.deepcopy(model)
    finally:
        base.embeddings = saved_emb
        setattr(owner, attr, saved_layers)
    return suffix.eval()


def prefix_hidden_states(
    model: nn.Module,
    last_k: int,
    attention_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hidden states entering the first of the last ``last_k`` layers, ``[B, T, H]``.

    Runs the embeddings and the frozen layers only (the forward stops at the first trainable layer). Under
    grad mode the result stays differentiable w.r.t. ``inputs_embeds`` (word embeddings; position and
    token-type embeddings are added by the model), which the HotFlip search of the concealed-poison attack
    uses. The model should be in eval mode (dropout off) for a deterministic prefix.
    """
    layers = encoder_layers(model)
    first = layers[len(layers) - last_k]
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the forward pass never reached the first trainable layer")
    return captured[0]


@torch.no_grad()
def cache_hidden_states(model: nn.Module, batch: dict, last_k: int, chunk: int = 128) -> dict:
    """Hidden states entering the first of the last ``last_k`` layers, for every row of ``batch`` (eval mode).

    Returns ``{"inputs_embeds": [B, T, H], "attention_mask": [B, T], "labels": [B]}`` (labels if present).
    """
    was = model.training
    model.eval()
    n = int(batch["input_ids"].shape[0])
    captured = []
    try:
        for s in range(0, n, chunk):
            part = slice_batch(batch, slice(s, s + chunk))
            captured.append(
                prefix_hidden_states(model, last_k, part["attention_mask"], input_ids=part["input_ids"])
                .detach()
                .clone()
            )
    finally:
        model.train(was)
    out = {"inputs_embeds": torch.cat(captured, 0), "attention_mask": batch["attention_mask"]}
    if "labels" in batch:
        out["labels"] = batch["labels"]
    return out


class _Captured(Exception):
    """Stops the forward pass once the prefix output is captured."""


def disable_prefix_dropout(model: nn.Module, last_k: int) -> None:
    """Set every dropout probability in the embeddings and the frozen layers to 0 (in place).

    Makes the full model's training (dropout on) the same procedure as training the suffix model on cached
    hidden states.
    """
    layers = encoder_layers(model)
    frozen = [model.base_model.embeddings, *list(layers)[: len(layers) - last_k]]
    for part in frozen:
        for m in part.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


class _FirstTokenLayer(nn.Module):
    """The last encoder layer evaluated at the first token only (BERT layout; wraps the layer as ``inner``).

    The pooler reads only position 0 of the last layer's output, so its query projection, attention output,
    feed-forward block and LayerNorms are needed at that position only; keys and values still cover every
    token. Same function as the full layer (to float rounding), several times cheaper for T tokens.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from transformers.models.bert.modeling_bert import eager_attention_forward

        att = self.inner.attention
        sa = att.self
        b, t, _ = hidden_states.shape
        d = sa.attention_head_size
        first = hidden_states[:, :1]
        q = sa.query(first).view(b, 1, -1, d).transpose(1, 2)
        k = sa.key(hidden_states).view(b, t, -1, d).transpose(1, 2)
        v = sa.value(hidden_states).view(b, t, -1, d).transpose(1, 2)
        mask = attention_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
            if mask.dim() == 4 and mask.shape[2] > 1:
                mask = mask[:, :, :1]
        ctx, _ = eager_attention_forward(
            sa, q, k, v, mask, dropout=sa.dropout.p if sa.training else 0.0, scaling=sa.scaling
        )
        attn = att.output(ctx.reshape(b, 1, -1), first)
        return self.inner.output(self.inner.intermediate(attn), attn)


def first_token_model(suffix: nn.Module) -> nn.Module:
    """A copy of ``suffix`` whose last layer runs at the first token only (for retraining and the PBRF).

    Same outputs as ``suffix`` to float rounding in eval mode and the same tracked parameters in the same
    order; with dropout on it draws masks only for the positions that reach the output (same procedure in
    distribution, different random numbers). BERT-like layers only (``attention.self``/``attention.output``/
    ``intermediate``/``output``).
    """
    model = copy.deepcopy(suffix)
    layers = encoder_layers(model)
    layers[len(layers) - 1] = _FirstTokenLayer(layers[len(layers) - 1])
    return model.eval()


def supports_first_token(model: nn.Module) -> bool:
    """Whether the last layer has the BERT layout and the classifier reads the pooler (position 0)."""
    try:
        last = encoder_layers(model)[-1]
    except UserError:
        return False
    att = getattr(last, "attention", None)
    return (
        getattr(model.base_model, "pooler", None) is not None
        and att is not None
        and hasattr(att, "self")
        and hasattr(att, "output")
        and hasattr(last, "intermediate")
        and hasattr(last, "output")
        and hasattr(getattr(att, "self", None), "query")
    )


class CachedPrefixTask(FinetunedTask):
    """:class:`FinetunedTask` on batches of cached hidden states (``inputs_embeds``) for a suffix model."""

    def model_output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
