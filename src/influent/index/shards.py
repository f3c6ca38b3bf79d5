"""The index on disk: safetensors shards of projected gradients, read memory-mapped, and their manifest.

A shard ``shard-00012.safetensors`` holds ``grads`` (``[rows, width]`` float32 or bfloat16, one row per training
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
import warnings
from pathlib import Path

import numpy as np
import torch

from influent import store
from influent.errors import CacheCorruptError

MANIFEST = "manifest.json"
PRECONDITIONER = "preconditioner.safetensors"
SELF_INFLUENCE = "self_influence.safetensors"  # ``self`` [n] float64, row order
GRADS, ROWS = "grads", "rows"
STORAGE = {"float32": ("F32", np.float32, torch.float32), "bfloat16": ("BF16", np.uint16, torch.bfloat16)}
"""Row storage types: ``name: (safetensors dtype, numpy type mapped, torch type)`` (numpy has no bfloat16:
its rows are mapped as uint16 and viewed as bfloat16 by :func:`as_tensor`)."""


def shard_path(folder: Path, index: int) -> Path:
    """``folder/shard-00012.safetensors``."""
    return Path(folder) / f"shard-{index:05d}.safetensors"


def write_shard(folder: Path, index: int, grads: torch.Tensor, rows: torch.Tensor, key: str,
                storage: str = "float32") -> Path:
    """Write one shard atomically (``grads`` as ``storage``, int64 ``rows``); returns its path."""
    path = shard_path(folder, index)
    store.write_tensors(path, {GRADS: grads.to(STORAGE[storage][2]), ROWS: rows.long()},
                        metadata={"key": key, "shard": index})
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
    """``(grads [rows, width] memory-mapped, rows [rows] int64)`` of a shard (float32 rows, or bfloat16 ones
    mapped as uint16: read them through :func:`as_tensor`)."""
    header, start = _header(path)
    mapped = {code: np_type for code, np_type, _ in STORAGE.values()}
    out = []
    for name in (GRADS, ROWS):
        info = header.get(name)
        if info is None:
            raise CacheCorruptError(f"{path}: no tensor {name!r}")
        dtype = np.int64 if name == ROWS else mapped.get(info.get("dtype"))
        if dtype is None:
            raise CacheCorruptError(f"{path}: tensor {name!r} has the unsupported type {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if (end - begin) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CacheCorruptError(f"{path}: tensor {name!r} has the wrong size")
        out.append(np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape))
    return out[0], np.array(out[1])


def as_tensor(block: np.ndarray) -> torch.Tensor:
    """A view (no copy) of mapped rows as a torch tensor: float32, or bfloat16 for uint16-mapped rows. The
    pages are read-only: do not write to the tensor."""
    with warnings.catch_warnings():  # read-only mapped pages, never written: no copy needed
        warnings.simplefilter("ignore", UserWarning)
        out = torch.from_numpy(block)
    return out.view(torch.bfloat16) if block.dtype == np.uint16 else out


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
