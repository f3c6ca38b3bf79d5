"""Training examples' token factors on disk, so that scoring a new query set skips the model passes.

A pairwise or self score needs, per training example and tracked ``nn.Linear``, the activations ``a``
``[T, d_in(+1)]`` and output gradients ``g`` ``[T, d_out]`` of that example's loss
(:mod:`influent.curvature.linear_grads`). The scores only need them in the factors' eigenbasis,
``a Q_A`` and ``g Q_S`` (:meth:`Factors.rotate_tokens`; for diagonal / identity the captured ones), where
the preconditioned queries need no rotation back. :class:`TrainTokenCache` keeps exactly those, one
safetensors file per training batch (the batches as the scoring passes form them, i.e. after
:func:`~influent.task.length_buckets`), so a later query set costs only the per-example dot products:
no forward pass, no backward pass.

Size: per token, the sum over tracked modules of ``d_in + 1 + d_out`` values in the model's dtype
(modules fed the same input, like query / key / value, store it once): about 150 KB per token, 4 MB per
28-token snippet for all 38 linear modules of all-MiniLM-L6-v2 in float32. A cache that would exceed
``max_bytes`` is not written (a warning says so and scoring runs the passes as usual).

The key covers the fitted factors (model, fit data, curvature settings), the bytes of the scored training
batches, the bucketing and the task's class, so a cache is only read for the same examples, model and
basis. Every file is written atomically; a batch whose file is missing is recomputed (and written), so an
interrupted run leaves a usable prefix; one that is damaged (checksum, truncation, contents that do not fit)
is recomputed with a one-line warning, never used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from influent import store
from influent.curvature import keys
from influent.curvature.fingerprints import data_fingerprint
from influent.curvature.linear_grads import module_shapes
from influent.errors import CacheCorruptError

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 2**30

Captured = list[tuple[str, torch.Tensor, torch.Tensor]]


class TrainTokenCache:
    """Per-batch files of training token factors (in the factors' basis) under ``root/train-tokens/<key>``.

    Args:
        root: cache root folder.
        key: :func:`cache_key` of the factors, task and scored batches.
        names: the tracked modules, in capture order.
    """

    def __init__(self, root: str | Path, key: str, names: Sequence[str]):
        self.folder = Path(root) / "train-tokens" / key
        self.names = list(names)

    def file(self, index: int) -> Path:
        return self.folder / f"batch-{index:05d}.safetensors"

    def read(self, index: int, size: int) -> Captured | None:
        """The stored ``(name, a, g)`` of batch ``index``, or None when missing or not matching.

        ``size``: the batch's number of examples. Modules that shared their activations when written get
        the same tensor object back.
        """
        path = self.file(index)
        if not path.exists():
            return None
        try:
            tensors, meta = store.read_tensors_with_metadata(path)
            out = self._unpack(tensors, meta.get("activations_of"), size)
        except (CacheCorruptError, Exception) as exc:  # noqa: BLE001 - an unreadable file is recomputed
            warnings.warn(
                f"training token cache file {path} is damaged ({type(exc).__name__}); recomputing it",
                stacklevel=2,
            )
            return None
        return out

    def _unpack(self, tensors: dict, act_of, size: int) -> Captured:
        """``(name, a, g)`` per module from a file's tensors; CacheCorruptError if they do not fit."""
        if not isinstance(act_of, dict) or list(act_of) != self.names:
            raise CacheCorruptError("modules do not match")
        out: Captured = []
        for name in self.names:
            a = tensors.get(keys.tensor_key(act_of[name], keys.TOKENS_A))
            g = tensors.get(keys.tensor_key(name, keys.TOKENS_G))
            if a is None or g is None or a.shape[0] != size or g.shape[0] != size:
                raise CacheCorruptError("tensors missing or of the wrong size")
            out.append((name, a, g))
        return out

    def write(self, index: int, captured: Captured) -> None:
        """Store batch ``index``'s ``(name, a, g)``; an ``a`` that is the previous module's is stored once."""
        tensors: dict[str, torch.Tensor] = {}
        act_of: dict[str, str] = {}
        last_a, last_name = None, None
        for name, a, g in captured:
            if a is last_a:
                act_of[name] = last_name
            else:
                tensors[keys.tensor_key(name, keys.TOKENS_A)] = a
                act_of[name] = last_name = name
                last_a = a
            tensors[keys.tensor_key(name, keys.TOKENS_G)] = g
        store.write_tensors(self.file(index), tensors, metadata={"activations_of": act_of})


def cache_key(factors_key: str, task, train_fingerprint: str, bucket: bool) -> str:
    """Key of the token cache for these factors, task class, scored training batches and bucketing."""
    task_class = f"{type(task).__module__}.{type(task).__qualname__}"
    return store.fingerprint("train-tokens", FORMAT_VERSION, factors_key, task_class, train_fingerprint, bucket)


def estimated_bytes(task, batches: Sequence, modules: dict, itemsize: int) -> int:
    """Upper estimate of the cache's size for the passes' ``batches``: every position of every example
    (padding included; :meth:`~influent.task.Task.token_mask`, one position per example
    without a mask) times ``sum(d_in(+1) + d_out)`` over ``modules``, ``itemsize`` bytes each."""
    per_token = sum(d_out + d_in for d_out, d_in in module_shapes(modules).values())
    positions = 0
    for batch in batches:
        mask = task.token_mask(batch)
        positions += mask.numel() if mask is not None else task.batch_size(batch)
    return int(positions * per_token * itemsize)


def open_cache(
    root: str | Path | None,
    *,
    task,
    factors_key: str,
    modules: dict,
    train_batches: Sequence,
    pass_batches: Sequence,
    bucket: bool,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    train_fingerprint: str | None = None,
) -> TrainTokenCache | None:
    """The :class:`TrainTokenCache` for scoring ``train_batches``, or None (no ``root``, or too large).

    ``pass_batches``: the batches the passes run over (``train_batches`` re-formed by length when
    ``bucket``); their :func:`estimated_bytes` over ``max_bytes`` (None: no limit) gives a warning and
    None, so the caller scores without the cache. ``train_fingerprint``: the
    :func:`~influent.curvature.fingerprints.data_fingerprint` of ``train_batches`` if already computed.
    """
    if root is None:
        return None
    itemsize = next(iter(modules.values())).weight.element_size()
    size = estimated_bytes(task, pass_batches, modules, itemsize)
    if max_bytes is not None and size > max_bytes:
        warnings.warn(
            f"training token cache skipped: it would take about {size / 2**30:.1f} GiB, over the "
            f"limit of {max_bytes / 2**30:.1f} GiB (raise the limit train_cache_max_bytes)",
            stacklevel=3,
        )
        return None
    if train_fingerprint is None:
        train_fingerprint = data_fingerprint(train_batches)
    return TrainTokenCache(root, cache_key(factors_key, task, train_fingerprint, bucket), list(modules))


DEFAULT_MEMORY_BYTES = 2 * 2**30


def captured_bytes(captured: Captured) -> int:
    """Bytes held by ``captured``'s tensors (an activation tensor shared by consecutive modules once)."""
    seen: set[int] = set()
    total = 0
    for _, a, g in captured:
        for t in (a, g):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class MemoryTokens:
    """Training token factors held in memory, per batch of the passes (the in-memory :class:`TrainTokenCache`).

    The EK-FAC fit keeps its first pass's captured ``(name, a, g)`` here, computes the eigenvalue
    correction from them instead of a second forward/backward pass, and leaves the tokens rotated into
    the final eigenbasis (:meth:`Factors.rotate_tokens`), which scoring then reads like the token cache.
    Nothing is kept unless the whole set is expected to fit: :meth:`reserve` with the
    :func:`estimated_bytes` of the passes' batches, at most ``max_bytes`` (``None``: no limit; ``0``: off).
    ``stamp`` is free for the owner to record what the tokens belong to (e.g. the model's state).

    Args:
        max_bytes: memory budget in bytes (default :data:`DEFAULT_MEMORY_BYTES`, 2 GiB).
    """

    def __init__(self, max_bytes: int | None = DEFAULT_MEMORY_BYTES):
        self.max_bytes = max_bytes
        self.active = False
        self.stamp = None
        self._batches: dict[int, Captured] = {}
        self.nbytes = 0

    def reserve(self, estimate: int) -> bool:
        """Start keeping batches (dropping any held) if ``estimate`` bytes fit the budget; returns whether."""
        self.clear()
        self.active = self.max_bytes is None or estimate <= self.max_bytes
        return self.active

    def clear(self) -> None:
        """Drop every held batch and stop keeping new ones (``stamp`` is left to its owner)."""
        self._batches.clear()
        self.nbytes = 0
        self.active = False

    def __len__(self) -> int:
        return len(self._batches)

    def read(self, index: int, size: int) -> Captured | None:
        """The held ``(name, a, g)`` of batch ``index`` (``size`` examples), or None."""
        captured = self._batches.get(index)
        if captured is None or any(a.shape[0] != size for _, a, _ in captured):
            return None
        return captured

    def write(self, index: int, captured: Captured) -> None:
        """Hold batch ``index``'s ``captured`` (replacing what was held for it) while keeping is on."""
        if not self.active:
            return
        old = self._batches.pop(index, None)
        self.nbytes += captured_bytes(captured) - (0 if old is None else captured_bytes(old))
        self._batches[index] = list(captured)
