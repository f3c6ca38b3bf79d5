"""On-disk cache: tensors through safetensors, metadata through JSON, every write atomic and checksummed.

A write goes to a temporary file in the destination folder and is renamed over the target, so a run
killed mid-write never leaves a half file that a later run would read. Nothing is ever unpickled.

Every file carries a SHA-256 checksum of its content and every read verifies it, so a damaged cache
file is never returned as data:

- safetensors (:func:`write_tensors`): the metadata entry ``influent_sha256`` holds the SHA-256 of every
  tensor (name, dtype, shape, raw bytes, in name order) and of the other metadata entries.
- JSON (:func:`write_json`): the top-level key ``"_checksum"`` holds ``"sha256:<hex>"`` of the canonical
  JSON of the rest of the object (sorted keys, no whitespace), so formatting is free but no value can
  change unnoticed. A value that is not a dict is stored as ``{"_value": ..., "_checksum": ...}``.

A checksum mismatch, a missing checksum (a damaged file, or one written by an older influent), a
truncated or unparsable file raises :class:`~influent.errors.CacheCorruptError`, one line naming the file.
A file that does not exist raises ``FileNotFoundError`` as usual: absent is not corrupt. Callers recompute
where they can (catch ``CacheCorruptError``, warn in one line, rebuild) and let it through where they cannot.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from influent.errors import CacheCorruptError

CHECKSUM_KEY = "_checksum"  # top-level key of a JSON cache file
TENSOR_CHECKSUM_KEY = "influent_sha256"  # metadata entry of a safetensors cache file
_VALUE_KEY = "_value"


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _canonical_json_sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, with its checksum (see the module notes)."""
    path = Path(path)
    plain = json.loads(json.dumps(obj, default=_json_default))  # the form a reader will see
    body = dict(plain) if isinstance(plain, dict) else {_VALUE_KEY: plain}
    body.pop(CHECKSUM_KEY, None)
    body[CHECKSUM_KEY] = _canonical_json_sha256(body)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    """Read and verify a JSON file written by :func:`write_json` (the checksum key removed).

    Raises:
        CacheCorruptError: unreadable, unparsable (empty, truncated), no checksum, or checksum mismatch.
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CacheCorruptError(f"cache file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "empty" if not raw.strip() else f"not valid JSON: {str(exc).splitlines()[0]}"
        raise CacheCorruptError(f"cache file {path} is damaged ({reason})") from None
    if not isinstance(body, dict) or not isinstance(body.get(CHECKSUM_KEY), str):
        raise CacheCorruptError(f"cache file {path} has no checksum (damaged, or written by an older influent)")
    expected = body.pop(CHECKSUM_KEY)
    if _canonical_json_sha256(body) != expected:
        raise CacheCorruptError(f"cache file {path} is damaged (checksum mismatch)")
    if set(body) == {_VALUE_KEY}:
        return body[_VALUE_KEY]
    return body


def tensors_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 hex digest of named tensors (name, dtype, shape, raw bytes, in name order) and string metadata.

    Exact: two tensor dicts get the same digest only if every tensor is bit-for-bit equal.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps(metadata or {}, sort_keys=True).encode())
    return h.hexdigest()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Save named tensors to a safetensors file atomically (on CPU, contiguous), with their checksum.

    ``metadata`` values are stored JSON-encoded; the checksum covers tensors and metadata.

    Returns:
        The file's checksum (hex), for a manifest that wants to pin this exact file
        (``read_tensors_with_metadata(path, expect_sha256=...)``).
    """
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
        meta.pop(TENSOR_CHECKSUM_KEY, None)
        meta[TENSOR_CHECKSUM_KEY] = tensors_sha256(clean, meta)
        save_file(clean, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta[TENSOR_CHECKSUM_KEY]


def read_tensors_with_metadata(
    path: str | Path, expect_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (on CPU) and metadata (each value JSON-decoded) of a file written by :func:`write_tensors`,
    verified against its checksum (the checksum entry is not returned).

    Args:
        path: the file.
        expect_sha256: the checksum a manifest recorded for this file (as returned by
            :func:`write_tensors`); a file with another checksum is rejected even if intact.

    Raises:
        CacheCorruptError: truncated or unparsable file, no checksum, or checksum mismatch.
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CacheCorruptError(f"cache file {path} is damaged (unreadable safetensors: {first})") from None
    expected = raw_meta.pop(TENSOR_CHECKSUM_KEY, None)
    if expected is None:
        raise CacheCorruptError(f"cache file {path} has no checksum (damaged, or written by an older influent)")
    if tensors_sha256(tensors, raw_meta) != expected:
        raise CacheCorruptError(f"cache file {path} is damaged (checksum mismatch)")
    if expect_sha256 is not None and expected != expect_sha256:
        raise CacheCorruptError(f"cache file {path} is not the file its manifest lists (checksum differs)")
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except ValueError:
        raise CacheCorruptError(f"cache file {path} is damaged (metadata is not JSON)") from None
    return tensors, meta


def recorded_checksum(path: str | Path) -> str | None:
    """The checksum a safetensors file written by :func:`write_tensors` records (header only; not verified)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(TENSOR_CHECKSUM_KEY)
    except Exception:  # noqa: BLE001 - unreadable header: no checksum to report
        return None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load and verify the tensors of a file written by :func:`write_tensors` (on CPU).

    Raises:
        CacheCorruptError: see :func:`read_tensors_with_metadata`.
        FileNotFoundError: no file at ``path``.
    """
    return read_tensors_with_metadata(path)[0]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes (for files written by other libraries, e.g. ``save_pretrained``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
