"""Per-example gradients of ``nn.Linear`` modules from forward hooks and output gradients.

GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` stored ``[d_in, d_out]``) is tracked as the linear module it
is: its gradients here are ``[d_out, d_in(+1)]``, the transpose of its weight's layout.

For a linear module ``y_t = W x_t + b`` applied at tokens ``t`` of example ``i``, the gradient of that
example's loss is ``dL_i/dW = sum_t g_t x_t^T`` with ``g_t = dL_i/dy_t``; with a bias we append a ones
column to ``x`` so ``[dL/dW | dL/db] = sum_t g_t [x_t, 1]^T`` (shape ``[d_out, d_in + 1]``).

:class:`LinearCapture` records, for one forward/backward pass, the (masked) input activations
``a`` (``[B, T, d_in(+1)]``) and output gradients ``g`` (``[B, T, d_out]``) of every tracked module.
Padded tokens (``Task.token_mask`` is 0) are multiplied out of ``a`` (the ones column included) and
of ``g``, so they contribute nothing to gradients or curvature. Nothing here forms a parameter vector
per example: consumers contract ``a`` and ``g`` directly (see :mod:`influent.curvature.factors`).

Output gradients are obtained with ``torch.autograd.grad`` with respect to the module outputs only,
so weight gradients of the whole model are never computed (a backward pass costs about half of a
training backward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from influent.errors import UserError
from influent.task import Batch, Task, batch_to

MLP_INCLUDE = ("intermediate.dense", "output.dense")
MLP_EXCLUDE = ("attention.output.dense",)


def select_linear_modules(model: nn.Module, spec: str = "all") -> dict[str, nn.Linear]:
    """Tracked linear modules of ``model`` by name.

    Args:
        model: any ``nn.Module``.
        spec: ``"all"`` (every ``nn.Linear``); ``"trainable"`` (those whose weight requires grad, e.g. the
            last k fine-tuned layers and the head); ``"mlp"`` (the feed-forward layers: in a BERT-style
            encoder the names containing ``intermediate.dense`` or ``output.dense`` but not
            ``attention.output.dense``; in a model without such names, every ``nn.Linear``); or a
            regular expression matched (``re.search``) against module names.

    Returns:
        ``{name: module}`` in model order.

    Raises:
        UserError: when the pattern is invalid or selects no linear module.
    """
    linear = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    if spec == "all":
        chosen = linear
    elif spec == "trainable":
        chosen = {n: m for n, m in linear.items() if m.weight.requires_grad}
    elif spec == "mlp":
        bert = {
            n: m
            for n, m in linear.items()
            if any(k in n for k in MLP_INCLUDE) and not any(k in n for k in MLP_EXCLUDE)
        }
        chosen = bert if bert else linear
    else:
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise UserError(f"modules: invalid regular expression {spec!r}: {exc}", field="modules") from None
        chosen = {n: m for n, m in linear.items() if pattern.search(n)}
    if not chosen:
        raise UserError(
            f"modules {spec!r} selects no nn.Linear module (model has {len(linear)})", field="modules"
        )
    return chosen


def module_shapes(modules: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in + has_bias)}``: the shape of each module's per-example gradient."""
    return {n: (_out_in(m)[0], _out_in(m)[1] + int(m.bias is not None)) for n, m in modules.items()}


def _out_in(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[d_in, d_out]``)."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


@dataclass
class _Record:
    acts: list[torch.Tensor] = field(default_factory=list)
    outs: list[torch.Tensor] = field(default_factory=list)


class LinearCapture:
    """Context manager recording activations of tracked modules; :meth:`backward` gets output grads.

    Usage::

        with LinearCapture(modules) as cap:
            cap.set_mask(task.token_mask(batch))
            loss = task.per_example_loss(model, batch)        # [B]
            for name, a, g in cap.backward(loss):            # a: [B,T,d_in(+1)], g: [B,T,d_out]
                ...
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self._handles: list = []
        self._records: dict[str, _Record] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple | None = None  # (input tensor, has bias, processed activations)

    def __enter__(self):  # returns self
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask ``[B, T]`` (1 = real token) for the next forward pass, or None."""
        self._records = {}
        self._mask = mask
        self._last = None

    def _hook(self, name: str, module: nn.Linear):
        def hook(mod, inputs, output):
            has_bias = module.bias is not None
            last = self._last
            if last is not None and last[0] is inputs[0] and last[1] == has_bias:
                # same input as the previous module (query/key/value): share the activations, so
                # consumers can recognise them (``is``) and reuse what they computed from them
                a = last[2]
                if not output.requires_grad:
                    output.requires_grad_(True)
                rec = self._records.setdefault(name, _Record())
                rec.acts.append(a)
                rec.outs.append(output)
                return
            x = inputs[0].detach()
            batch = x.shape[0]
            a = x.reshape(batch, -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)
            m = self._mask
            if m is not None and m.dim() == 2 and m.shape[0] == batch and m.shape[1] == a.shape[1]:
                m = m.to(dtype=a.dtype).unsqueeze(-1)
                a = a * m
            else:
                m = None
            if module.bias is not None:
                ones = a.new_ones(a.shape[0], a.shape[1], 1) if m is None else m
                a = torch.cat([a, ones], dim=-1)
            if not output.requires_grad:
                # frozen upstream parameters: make the output a leaf so its gradient is still computed
                output.requires_grad_(True)
            rec = self._records.setdefault(name, _Record())
            rec.acts.append(a)
            rec.outs.append(output)
            self._last = (inputs[0], has_bias, a)

        return hook

    def backward(self, loss: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Differentiate ``loss.sum()`` w.r.t. the recorded outputs; return ``(name, a, g)`` per module.

        ``g`` is the gradient of each example's own loss (the loss is a sum over examples), masked
        like ``a``; several calls of a module in one forward are concatenated along the token axis.
        """
        names = [n for n in self.modules if n in self._records]
        missing = [n for n in self.modules if n not in self._records]
        if missing:
            raise RuntimeError(f"tracked modules not called in the forward pass: {missing[:5]}")
        outs = [o for n in names for o in self._records[n].outs]
        grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
        result = []
        k = 0
        for n in names:
            rec = self._records[n]
            gs = []
            for a, o in zip(rec.acts, rec.outs):
                g = grads[k]
                k += 1
                if g is None:
                    g = torch.zeros_like(o)
                g = g.detach()
                g = g.reshape(a.shape[0], -1, g.shape[-1]) if g.dim() != 2 else g.unsqueeze(1)
                if a.shape[1] == g.shape[1] and self._mask is not None and self._mask.shape == a.shape[:2]:
                    g = g * self._mask.to(dtype=g.dtype).unsqueeze(-1)
                gs.append(g)
            a = rec.acts[0] if len(rec.acts) == 1 else torch.cat(rec.acts, dim=1)
            g = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
            result.append((n, a, g))
        self._records = {}
        return result


def per_example_grads_from(
    a: torch.Tensor, g: torch.Tensor, buffers: GradBuffers | None = None
) -> torch.Tensor:
    """``G_i = sum_t g_it a_it^T`` (shape ``[B, d_out, d_in(+1)]``).

    With ``buffers`` the result is written into a reused buffer (valid until the next call with the same
    shape): a fresh ``[B, d_out, d_in]`` tensor per module and batch costs more in page faults than the
    product itself on CPU.
    """
    out = None if buffers is None else buffers.get(g.shape[0], g.shape[-1], a.shape[-1], g)
    if a.shape[1] == 1:
        return torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=out)
    return torch.bmm(g.transpose(1, 2), a, out=out)


def squared_grads_sum(a: torch.Tensor, g: torch.Tensor, buffers: GradBuffers | None = None) -> torch.Tensor:
    """``sum_i G_i ** 2`` (elementwise; ``[d_out, d_in(+1)]``, dtype of ``g``) of ``G_i = sum_t g_it a_it^T``.

    On CPU each ``G_i`` is formed and squared into the sum while it is in cache, one example at a time
    (1 thread, 32 x 23 tokens, 512 x 128: about 25% faster than forming all of ``G`` first); elsewhere
    the batched product, squared and summed.
    """
    if a.shape[1] == 1:
        return (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
    if g.device.type != "cpu":
        return per_example_grads_from(a, g, buffers).square_().sum(0)
    total = g.new_zeros(g.shape[-1], a.shape[-1])
    one = g.new_empty(g.shape[-1], a.shape[-1])
    for gi, ai in zip(g.transpose(1, 2), a):
        torch.mm(gi, ai, out=one)
        total.addcmul_(one, one)
    return total


class PerExampleDots:
    """``<P_q, G_i>`` (``[Q, B]``) of fixed matrices ``P`` ``[Q, d_out, d_in]`` with per-example gradients.

    ``G_i = sum_t g_it a_it^T`` is formed a block of rows (or, for a wide input, columns) at a time, about
    ``CHUNK`` elements per example, and contracted with the same block of ``P`` while it is still in cache:
    the same multiply-adds as forming all of ``G`` and then its dot products, without writing and
    re-reading ``[B, d_out, d_in]`` in memory (1 thread, batch 32, 31 tokens: 36 -> 29 ms on a 1536 x 385
    layer, 34 -> 32 ms on a 384 x 1537 one, no change on 384 x 385).
    """

    CHUNK = 32768

    def __init__(self, p: torch.Tensor) -> None:
        q, d_out, d_in = p.shape
        self.p = p
        self.axis = 1 if d_out >= d_in else 2
        n, other = (d_out, d_in) if self.axis == 1 else (d_in, d_out)
        size = max(1, self.CHUNK // other)
        self.spans = [(s, min(n, s + size)) for s in range(0, n, size)]
        self.blocks = (
            None
            if len(self.spans) == 1
            else [p.narrow(self.axis, s, e - s).reshape(q, -1) for s, e in self.spans]
        )

    def __call__(self, a: torch.Tensor, g: torch.Tensor, buffers: GradBuffers) -> torch.Tensor:
        q = self.p.shape[0]
        if self.blocks is None or a.shape[1] == 1:
            grads = per_example_grads_from(a, g, buffers)
            return self.p.reshape(q, -1) @ grads.reshape(grads.shape[0], -1).T
        b = g.shape[0]
        gt = g.transpose(1, 2)
        out = g.new_zeros(q, b)
        for (s, e), block in zip(self.spans, self.blocks):
            if self.axis == 1:
                buf = buffers.get(b, e - s, a.shape[-1], g)
                torch.bmm(gt[:, s:e], a, out=buf)
            else:
                buf = buffers.get(b, g.shape[-1], e - s, g)
                torch.bmm(gt, a[:, :, s:e], out=buf)
            out.addmm_(block, buf.reshape(b, -1).T)
        return out


class GradBuffers:
    """Reusable ``[B, d_out, d_in]`` output buffers, one per (shape, dtype, device)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, batch: int, d_out: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
        key = (d_out, d_in, like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < batch:
            buf = torch.empty(batch, d_out, d_in, dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        return buf[:batch]


def per_example_linear_grads(
    model: nn.Module, task: Task, batch: Batch, modules: dict[str, nn.Linear] | str = "all"
) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [B, d_out, d_in(+1)]}`` of ``task.per_example_loss`` (tests, small B).

    The last column is the bias gradient when the module has a bias. Units: loss per parameter unit.
    """
    if isinstance(modules, str):
        modules = select_linear_modules(model, modules)
    with torch.enable_grad(), LinearCapture(modules) as cap:
        cap.set_mask(task.token_mask(batch))
        loss = task.per_example_loss(model, batch)
        return {n: per_example_grads_from(a, g) for n, a, g in cap.backward(loss)}


def captured_passes(model: nn.Module, task: Task, modules: dict[str, nn.Linear], batches, measurement: bool = False):
    """One backward pass per batch in eval mode: yields ``(f, captured)`` where ``f`` is the batch's per-example
    training loss (or, with ``measurement``, the task's query measurement) and ``captured`` iterates
    ``(name, a, g)`` of every module in ``modules`` (:class:`LinearCapture`, padding masked by
    ``task.token_mask``). The model's training mode is restored afterwards."""
    device = next(iter(modules.values())).weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), LinearCapture(modules) as cap:
            for batch in batches:
                batch = batch_to(batch, device)
                cap.set_mask(task.token_mask(batch))
                f = task.query_measurement(model, batch) if measurement else task.per_example_loss(model, batch)
                yield f, cap.backward(f)
    finally:
        model.train(was_training)
