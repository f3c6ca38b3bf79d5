"""What the user supplies to the engine: how a batch becomes losses and query measurements.

The engine never looks inside a batch. A batch is any pytree (tensor, tuple, dict) of tensors whose
leading dimension indexes examples; the engine only slices it along that dimension (``vmap`` for
per-example gradients) and hands it back to the task, through one pytree walker (:func:`map_batch`,
:func:`batch_leaves`). The one exception is :func:`length_buckets`
(used by the factored-influence passes): dict batches with a right-padded ``attention_mask`` are
re-formed into batches of similar length with their padding trimmed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from influent.errors import UserError

Batch = Any


class Task:
    """How losses and query measurements are computed for one model.

    Subclasses implement :meth:`per_example_loss`. The training objective the engine differentiates is

        J(theta) = mean_i per_example_loss(z_i) + (l2 / 2) * ||theta_tracked||^2

    so ``l2`` is the ridge coefficient lambda (dimensionless, per parameter). Set ``l2 = 0`` for a model
    trained without weight decay.
    """

    l2: float = 0.0

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each example in ``batch`` (shape ``[B]``, natural log units, no regularisation).

        Default: :meth:`output_loss` of :meth:`model_output`. Override either this or both of those.
        """
        return self.output_loss(self.model_output(model, batch), batch)

    def model_output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The network's output for ``batch`` (e.g. logits ``[B, C]``); needed for Gauss-Newton curvature."""
        raise NotImplementedError(f"{type(self).__name__} does not define model_output")

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[B]`` from :meth:`model_output`'s outputs (convex in the outputs for GN)."""
        raise NotImplementedError(f"{type(self).__name__} does not define output_loss")

    def perturbable_input(self, batch: Batch) -> torch.Tensor:
        """The continuous input features of ``batch`` that ``I_pert,loss`` differentiates against."""
        raise NotImplementedError(f"{type(self).__name__} has no continuous input to perturb")

    def replace_input(self, batch: Batch, features: torch.Tensor) -> Batch:
        """``batch`` with its continuous input features replaced by ``features``."""
        raise NotImplementedError(f"{type(self).__name__} has no continuous input to perturb")

    def query_measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Measurement ``f(z_query)`` whose change influence predicts (shape ``[B]``); default: the loss."""
        return self.per_example_loss(model, batch)

    def tracked_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters influence is computed over; default: every parameter that requires grad."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in ``batch`` (the leading dimension of its first tensor)."""
        first = next(batch_leaves(batch), None)
        if first is None:
            _not_a_batch(batch)
        return int(first.shape[0])

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """Which positions of ``batch`` are real tokens, ``[B, T]`` (1 = real, 0 = padding), or None.

        Used by the factored curvature (:mod:`influent.curvature.linear_grads`): every tracked
        ``nn.Linear`` whose input has ``T`` positions gets the mask's zeros multiplied out of its
        activations and output gradients, so padding adds nothing to gradients or curvature. Default:
        ``batch["attention_mask"]`` for a dict batch that has one, else None (every position counts).
        """
        if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"]
        return None

    def sampled_loss(self, model: nn.Module, batch: Batch, uniforms: torch.Tensor) -> torch.Tensor:
        """Per-example loss ``[B]`` at labels sampled from the model (for the true Fisher / Gauss-Newton).

        ``uniforms`` ``[B]`` in [0, 1) are the example's fixed random numbers (seeded per example, so the
        sampled label does not depend on batching). Default: :meth:`model_output` as the logits of a
        categorical distribution, ``y_i`` drawn by inverse CDF at ``uniforms[i]``, cross-entropy at
        ``y_i`` (nats). Override for another likelihood (regression, sequence outputs).

        Raises:
            UserError: (field ``fisher``) when the task has neither this nor :meth:`model_output`.
        """
        try:
            logits = self.model_output(model, batch)
        except NotImplementedError:
            raise UserError(
                f"the true Fisher needs {type(self).__name__}.sampled_loss or model_output (logits); "
                "use the empirical Fisher",
                field="fisher",
            ) from None
        return categorical_sampled_loss(logits, uniforms)


def categorical_sampled_loss(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[B, C]`` at labels drawn by inverse CDF at ``uniforms`` ``[B]``."""
    with torch.no_grad():
        cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1)
        y = (
            torch.searchsorted(cdf, uniforms.to(cdf).unsqueeze(-1))
            .squeeze(-1)
            .clamp_max(logits.shape[-1] - 1)
        )
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


# ------------------------------------------------------------------------- the one batch-pytree walker
def _not_a_batch(leaf: Any) -> Any:
    raise TypeError(f"batch must be a tensor, dict, list or tuple of tensors, got {type(leaf).__name__}")


def map_batch(
    fn: Callable[[torch.Tensor], Any], batch: Batch, other: Callable[[Any], Any] = _not_a_batch
) -> Batch:
    """``batch`` with ``fn`` applied to every tensor, the structure (dict / list / tuple) kept.

    ``other(leaf)`` handles anything else found in the pytree: by default a ``TypeError``; pass
    ``lambda leaf: leaf`` to keep such leaves as they are.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_batch(fn, v, other) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_batch(fn, v, other) for v in batch)
    return other(batch)


def batch_leaves(batch: Batch, sort_keys: bool = False) -> Iterator[torch.Tensor]:
    """The tensors of ``batch`` in order (dict keys in insertion order, or sorted with ``sort_keys``);
    anything that is not a tensor, dict, list or tuple is skipped."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for k in sorted(batch) if sort_keys else batch:
            yield from batch_leaves(batch[k], sort_keys)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from batch_leaves(v, sort_keys)


def slice_batch(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Rows ``index`` of every tensor in ``batch`` (the only way the engine touches a batch)."""
    return map_batch(lambda t: t[index], batch)


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor moved to ``device`` (other leaves kept as they are)."""
    return map_batch(lambda t: t.to(device), batch, other=lambda leaf: leaf)


def iter_chunks(batch: Batch, n: int, chunk: int) -> Iterable[tuple[int, Batch]]:
    """Yield ``(start, rows start:start+chunk)`` over a batch of ``n`` examples."""
    for start in range(0, n, chunk):
        yield start, slice_batch(batch, slice(start, min(n, start + chunk)))


def length_buckets(
    batches: Sequence[Batch], mask_key: str = "attention_mask"
) -> tuple[list[Batch], torch.Tensor] | None:
    """The examples of ``batches`` re-formed into batches of similar length with less padding, or None.

    Applies to dict batches holding a right-padded ``mask_key`` ``[B, T]`` (each row: ones, then zeros)
    and only tensors with that leading dimension ``B``; a tensor whose first two dimensions are
    ``[B, T]`` is per token. The examples are sorted by their number of real tokens (longest first,
    stable) and cut into batches of the largest input batch size, each trimmed to its own longest
    example; positions past an example's end are filled, per key, with the value found at a padded
    position of the input (the mask with 0). The result is the same for a model in which padded
    positions do not change the real ones (an attention-masked encoder; influence passes also mask
    padding out of every tracked module).

    Returns:
        ``(new batches, order)`` with ``order[j]`` the position, in the input batches concatenated, of
        the j-th example of the new batches (so ``out[..., order] = new_scores`` restores the input
        order); None when the batches do not have this form or re-forming them would not remove padding.
    """
    batches = list(batches)
    if not batches or not all(isinstance(b, dict) for b in batches):
        return None
    keys = list(batches[0])
    kinds: dict[str, tuple] = {}  # per key: (per token, dtype, device, trailing shape), equal in all batches
    masks, sizes = [], []
    for b in batches:
        mask = b.get(mask_key)
        if list(b) != keys or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        real = mask != 0
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            return None  # not right-padded (left padding, holes): leave as is
        for k in keys:
            v = b[k]
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != mask.shape[0]:
                return None
            tok = v.dim() >= 2 and v.shape[:2] == mask.shape
            kind = (tok, v.dtype, v.device, tuple(v.shape[2:] if tok else v.shape[1:]))
            if kinds.setdefault(k, kind) != kind:
                return None
        masks.append(real)
        sizes.append(int(mask.shape[0]))
    per_token = {k: kind[0] for k, kind in kinds.items()}
    lengths = torch.cat([m.sum(1) for m in masks]).cpu()
    size = max(sizes)
    order = torch.sort(lengths, descending=True, stable=True).indices
    widths = [max(1, int(lengths[order[s : s + size]].max())) for s in range(0, len(order), size)]
    before = sum(n * int(m.shape[1]) for n, m in zip(sizes, masks))
    if sum(min(size, len(order) - i * size) * w for i, w in enumerate(widths)) >= before:
        return None
    width = max(int(m.shape[1]) for m in masks)
    full: dict[str, torch.Tensor] = {}
    for k in keys:
        parts = [b[k] for b in batches]
        if not per_token[k]:
            full[k] = torch.cat(parts)
            continue
        padded = next(((p, m) for p, m in zip(parts, masks) if not bool(m.all())), None)
        if padded is None:
            return None  # no padded position to copy a fill value from
        fill = padded[0][~padded[1]][0]
        out = fill.new_empty((len(order), width, *fill.shape))
        out[:] = fill
        row = 0
        for p in parts:
            out[row : row + p.shape[0], : p.shape[1]] = p
            row += p.shape[0]
        full[k] = out
    new = []
    for i, w in enumerate(widths):
        idx = order[i * size : (i + 1) * size].to(batches[0][mask_key].device)
        new.append({k: (v[idx, :w].contiguous() if per_token[k] else v[idx]) for k, v in full.items()})
    return new, order
