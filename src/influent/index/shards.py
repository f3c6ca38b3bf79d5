"""The index on disk: safetensors shards of projected gradients, read memory-mapped, and their manifest.

A shard ``shard-00012.safetensors`` holds ``grads`` (``[rows, width]`` float32, one row per training
example: every module's projected gradient flattened, in manifest order) and ``rows`` (``[rows]`` int64,
the examples' positions in the training data). Its safetensors metadata names the build key, so a
resumed build keeps exactly the shards of the same build. Shards are written atomically through
:mod:`influent.store`; the manifest (``manifest.json``, written last) records each shard's sha256.
Reading maps the file (``numpy.memmap`` at the offset the safetensors header gives), so a query touches
only the pages it reads and many processes share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from influent import store
from influent.errors import CacheCorruptError

MANIFEST = "manifest.json"
PRECONDITIONER = "preconditioner.safetensors"
SELF_INFLUENCE = "self_influence.safetensors"  # ``self`` [n] float64, row order
GRADS, ROWS = "grads", "rows"


def shard_path(folder: Path, index: int) -> Path:
    """``folder/shard-00012.safetensors``."""
    return Path(folder) / f"shard-{index:05d}.safetensors"


def write_shard(folder: Path, index: int, grads: torch.Tensor, rows: torch.Tensor, key: str) -> Path:
    """Write one shard atomically (float32 ``grads``, int64 ``rows``); returns its path."""
    path = shard_path(folder, index)
    store.write_tensors(path, {GRADS: grads.float(), ROWS: rows.long()}, metadata={"key": key, "shard": index})
    return path


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of ``path`` and the byte offset where its data begins."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CacheCorruptError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CacheCorruptError(f"{path}: unreadable safetensors header ({exc})") from None
    return header, 8 + size


def shard_key(path: Path) -> str | None:
    """The build key a shard was written for (from its header; None if unreadable)."""
    try:
        header, _ = _header(path)
        return json.loads(header.get("__metadata__", {}).get("key", "null"))
    except (CacheCorruptError, OSError, ValueError):
        return None


def open_shard(path: Path) -> tuple[np.memmap, np.ndarray]:
    """``(grads [rows, width] float32 memory-mapped, rows [rows] int64)`` of a shard."""
    header, start = _header(path)
    out = []
    for name, dtype in ((GRADS, np.float32), (ROWS, np.int64)):
        info = header.get(name)
        if info is None:
            raise CacheCorruptError(f"{path}: no tensor {name!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if (end - begin) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CacheCorruptError(f"{path}: tensor {name!r} has the wrong size")
        out.append(np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape))
    return out[0], np.array(out[1])


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_shard(path: Path, checksum: str) -> None:
    """Raise :class:`~influent.errors.CacheCorruptError` unless the shard's bytes match ``checksum``."""
    if not path.exists() or file_sha256(path) != checksum:
        raise CacheCorruptError(f"index shard {path} does not match its manifest checksum")
