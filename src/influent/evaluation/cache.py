"""Cache of retrained results: one safetensors file per result, its info in the file's metadata (atomic)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from influent.store import write_tensors


class RetrainCache:
    """Retrained results under ``folder``: ``{name}.safetensors`` holding tensors plus a JSON ``info``.

    Each file is written atomically (temporary file + rename), so an interrupted run resumes from the
    results already on disk and never reads a half-written one. ``folder=None`` disables caching.
    """

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{name}.safetensors"

    def get(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, info)`` of a cached result, or None."""
        path = self.path(name)
        if path is None or not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            meta = f.metadata() or {}
        return tensors, json.loads(meta.get("info", "{}"))

    def put(self, name: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
        path = self.path(name)
        if path is not None:
            write_tensors(path, tensors, {"info": info})
