"""On-disk cache: tensors through safetensors, metadata through JSON, every write atomic.

A write goes to a temporary file in the destination folder and is renamed over the target, so a run
killed mid-write never leaves a half file that a later run would read. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save named tensors to a safetensors file atomically (tensors made contiguous, on CPU)."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
        save_file(clean, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the tensors of a safetensors file (on CPU)."""
    return load_file(str(path))


def read_tensors_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata (each value JSON-decoded) of a file written by :func:`write_tensors`."""
    with safe_open(str(path), framework="pt") as fh:
        meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
        return {k: fh.get_tensor(k) for k in fh.keys()}, meta  # noqa: SIM118 - safe_open has no iterator


def fingerprint(*parts: Any, length: int = 16) -> str:
    """Stable hex digest of JSON-serialisable parts (never Python's salted ``hash``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def default_cache_dir() -> Path:
    """``$INFLUENT_CACHE_DIR`` if set, else ``~/.cache/influent``."""
    env = os.environ.get("INFLUENT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "influent"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
