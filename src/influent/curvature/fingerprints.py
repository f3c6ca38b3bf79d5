"""Fingerprints (short sha256 digests) of tensors, models and training data, for cache keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from influent import store
from influent.task import Batch, batch_leaves


def tensor_fingerprint(tensors: Iterable[torch.Tensor], length: int = 16) -> str:
    """sha256 of the raw bytes of a sequence of tensors (shapes and dtypes included)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:length]


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every parameter and buffer of ``model`` (by name and bytes)."""
    items = sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0])
    return store.fingerprint([k for k, _ in items], tensor_fingerprint([v for _, v in items]))


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """Fingerprint of the bytes of every tensor in every batch (order matters; dict keys sorted)."""
    return tensor_fingerprint([t for b in batches for t in batch_leaves(b, sort_keys=True)])
