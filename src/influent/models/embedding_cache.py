"""On-disk cache of sentence embeddings that many processes can share and that never returns a wrong row.

Layout: ``<root>/<key slug>-<key digest>/`` holds ``shard-XXXX.safetensors`` files and ``manifest.json``.
A shard holds one float32 tensor ``"embeddings" [n, d]`` and, in its (checksummed) metadata, the encoder
key and the ids of its rows in order, so every shard describes itself. The manifest lists, for each
shard, its file, its ids and its checksum. Guarantees:

- *Nothing lost under concurrency*: writers take a lock (``filelock``) on ``<folder>/.lock``, re-read the
  manifest under it, write a new shard and replace the manifest atomically; readers take no lock (shards
  are never rewritten; a shard removed by a compaction between reading the manifest and opening it is
  retried with the new manifest).
- *No wrong answer*: every file is verified on read (:mod:`influent.store` checksums), the shard must be the
  one the manifest pins (same checksum), its stored ids must equal the manifest's, its key the requested
  key and its shape ``[len(ids), dim]``. A damaged shard is dropped with a one-line warning (its rows are
  recomputed by the caller); a damaged manifest is rebuilt from the shards with a one-line warning.
- *Read-only caches serve reads*: :meth:`EmbeddingCache.get` never writes unless it repairs; a
  :meth:`~EmbeddingCache.put` that cannot write warns once (one line) and the caller continues.
- *Bounded growth* (optional): with ``max_rows`` the cache keeps the newest rows only; beyond ``max_shards``
  shards they are merged into one (so one-row writes do not pile up files).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from influent.errors import CacheCorruptError
from influent.store import (
    fingerprint,
    read_json,
    read_tensors_with_metadata,
    recorded_checksum,
    write_json,
    write_tensors,
)

logger = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"shard-(\d+)\.safetensors")
LOCK_TIMEOUT_S = 300.0


class EmbeddingCache:
    """Embeddings ``[d]`` (float32) stored under string ids, one folder per encoder key.

    Args:
        root: cache root; one sub-folder per key (see :meth:`folder`).
        max_rows: keep at most this many rows per key (the newest); None: unbounded.
        max_shards: merge all shards of a key into one when there are more than this many.
    """

    def __init__(self, root: str | Path, max_rows: int | None = None, max_shards: int = 64):
        self.root = Path(root)
        self.max_rows = max_rows
        self.max_shards = max(1, int(max_shards))
        self.write_failed = False  # set (and warned once) when a write was impossible

    def folder(self, key: str) -> Path:
        """Folder that holds the embeddings of encoder key ``key``."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:60].strip("._") or "encoder"
        return self.root / f"{slug}-{fingerprint(key)}"

    # -- reading -------------------------------------------------------------------------------------

    def get(self, ids: Sequence[str], key: str) -> tuple[np.ndarray, torch.Tensor]:
        """Look up ``ids``.

        Returns:
            ``(found_mask, embeddings)``: ``found_mask`` is a bool array ``[len(ids)]``; ``embeddings`` is a
            float32 tensor ``[found_mask.sum(), d]`` holding the cached rows in the order of the found
            ids (``[0, 0]`` when nothing is found). Rows of damaged shards count as not found.
        """
        for attempt in range(3):
            manifest = self._manifest(key)
            try:
                return self._lookup(manifest, ids, key, last_try=attempt == 2)
            except FileNotFoundError:
                continue  # a concurrent compaction replaced a shard: read the new manifest
        raise AssertionError("unreachable")  # pragma: no cover - the last try never raises FileNotFoundError

    def _lookup(self, manifest: dict, ids: Sequence[str], key: str, last_try: bool):
        where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            for r, id_ in enumerate(shard["ids"]):
                where.setdefault(id_, (s, r))
        found = np.array([id_ in where for id_ in ids], dtype=bool)
        needed: dict[int, list[tuple[int, int]]] = {}
        for k in np.flatnonzero(found):
            s, r = where[ids[k]]
            needed.setdefault(s, []).append((int(k), r))
        dim = manifest["dim"] or 0
        tables: dict[int, torch.Tensor] = {}
        damaged: list[str] = []
        for s, pairs in needed.items():
            shard = manifest["shards"][s]
            try:
                tables[s] = self._read_shard(key, shard, dim)
                continue
            except FileNotFoundError:
                if not last_try:
                    raise
                reason = f"shard {self.folder(key) / shard['file']} is missing"
            except CacheCorruptError as exc:
                reason = str(exc)
            logger.warning("embedding cache: %s; its %d embeddings are recomputed", reason, len(shard["ids"]))
            damaged.append(shard["file"])
            found[[k for k, _ in pairs]] = False
        if damaged:
            self._drop_shards(key, damaged)
        slot = np.full(len(ids), -1, dtype=np.int64)
        slot[found] = np.arange(int(found.sum()))
        out = torch.zeros(int(found.sum()), dim, dtype=torch.float32)
        for s, table in tables.items():
            pairs = needed[s]
            out[torch.from_numpy(slot[[k for k, _ in pairs]])] = table[torch.tensor([r for _, r in pairs])]
        return found, out

    def _read_shard(self, key: str, shard: dict, dim: int) -> torch.Tensor:
        """The verified ``[n, dim]`` table of a manifest entry (CacheCorruptError if anything disagrees)."""
        path = self.folder(key) / shard["file"]
        tensors, meta = read_tensors_with_metadata(path, expect_sha256=shard.get("sha256"))
        table = tensors.get("embeddings")
        if meta.get("key") != key:
            raise CacheCorruptError(f"cache file {path} belongs to another encoder key")
        if meta.get("ids") != shard["ids"]:
            raise CacheCorruptError(f"cache file {path} holds other ids than its manifest lists")
        if table is None or tuple(table.shape) != (len(shard["ids"]), dim):
            shape = None if table is None else tuple(table.shape)
            raise CacheCorruptError(f"cache file {path} has shape {shape}, expected ({len(shard['ids'])}, {dim})")
        return table.to(torch.float32)

    def _read_manifest(self, key: str) -> tuple[dict, str | None]:
        """``(manifest, None)`` when the manifest of ``key`` is intact (an empty one if there is none and no
        shard), else ``(None, why it cannot be used)``."""
        folder = self.folder(key)
        path = folder / "manifest.json"
        try:
            manifest = read_json(path)
        except FileNotFoundError:
            if any(folder.glob("shard-*.safetensors")):
                return None, f"manifest {path} is missing"
            return {"key": key, "dim": None, "shards": []}, None
        except CacheCorruptError as exc:
            return None, str(exc)
        problem = _manifest_problem(manifest)
        if problem is None and manifest["key"] != key:
            problem = "manifest belongs to another encoder key"
        return (manifest, None) if problem is None else (None, f"{path}: {problem}")

    def _manifest(self, key: str) -> dict:
        """The manifest of ``key`` for a reader; a damaged one is rebuilt from the shards (and saved if the
        cache is writable), with a one-line warning."""
        manifest, problem = self._read_manifest(key)
        if problem is None:
            return manifest
        self._write_locked(key, lambda current: None)  # rebuilds under the lock, warns, saves
        manifest, still = self._read_manifest(key)
        if still is None:
            return manifest
        rebuilt = self._rebuild(key)
        logger.warning("embedding cache: %s; using %d intact shards", problem, len(rebuilt["shards"]))
        return rebuilt

    def _rebuild(self, key: str) -> dict:
        """A manifest listing every intact shard of ``key`` (shards describe themselves)."""
        folder = self.folder(key)
        shards, dim, seen = [], None, set()
        for path in sorted(folder.glob("shard-*.safetensors"), key=_shard_number):
            try:
                tensors, meta = read_tensors_with_metadata(path)
            except (CacheCorruptError, OSError):
                continue
            table, ids = tensors.get("embeddings"), meta.get("ids")
            if meta.get("key") != key or table is None or table.ndim != 2 or not isinstance(ids, list):
                continue
            if len(ids) != table.shape[0] or (dim is not None and table.shape[1] != dim):
                continue
            dim = int(table.shape[1])
            fresh = [i for i in ids if i not in seen]
            seen.update(ids)
            if fresh:
                shards.append({"file": path.name, "ids": list(ids), "sha256": recorded_checksum(path)})
        return {"key": key, "dim": dim, "shards": shards}

    # -- writing -------------------------------------------------------------------------------------

    def put(self, ids: Sequence[str], embeddings: torch.Tensor, key: str) -> int:
        """Store ``embeddings [len(ids), d]`` under ``ids`` (ids already cached are skipped).

        Safe to call from several processes at once. When the cache cannot be written (read-only folder,
        full disk, lock timeout) it warns once in one line, sets :attr:`write_failed` and returns 0.

        Returns:
            The number of rows written.
        """
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(f"embeddings must be [len(ids)={len(ids)}, d], got {tuple(embeddings.shape)}")
        rows = embeddings.detach().to("cpu", torch.float32)
        written = [0]

        def update(manifest: dict) -> dict | None:
            dim = int(rows.shape[1])
            if manifest["dim"] not in (None, dim):
                raise ValueError(f"embedding width {dim} differs from cached width {manifest['dim']}")
            known = {id_ for shard in manifest["shards"] for id_ in shard["ids"]}
            keep: list[int] = []
            for k, id_ in enumerate(ids):
                if id_ not in known:
                    known.add(id_)
                    keep.append(k)
            if not keep:
                return None
            new_ids = [ids[k] for k in keep]
            name = self._next_shard_name(key, manifest)
            sha = write_tensors(
                self.folder(key) / name, {"embeddings": rows[torch.tensor(keep)]}, {"key": key, "ids": new_ids}
            )
            manifest = {**manifest, "dim": dim, "shards": [*manifest["shards"], {"file": name, "ids": new_ids, "sha256": sha}]}
            written[0] = len(keep)
            return self._bounded(key, manifest)

        self._write_locked(key, update)
        return written[0]

    def _write_locked(self, key: str, update) -> None:
        """Under the folder lock: read the manifest (rebuilt if damaged), ``update(manifest) -> new
        manifest | None``, save it, then delete the shard files it does not list (merged, damaged, or left
        by a writer killed between its shard and its manifest)."""
        if self.write_failed:
            return
        folder = self.folder(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(folder / ".lock", timeout=LOCK_TIMEOUT_S):
                current, problem = self._read_manifest(key)
                if problem is not None:
                    current = self._rebuild(key)
                    logger.warning(
                        "embedding cache: %s; rebuilt it from %d intact shards (%d embeddings)",
                        problem, len(current["shards"]), sum(len(s["ids"]) for s in current["shards"]),
                    )
                new = update(current)
                if new is None:
                    if problem is None:
                        return
                    new = current  # save the repair
                write_json(folder / "manifest.json", new)
                listed = {s["file"] for s in new["shards"]}
                for path in folder.glob("shard-*.safetensors"):  # under the lock, unlisted = garbage
                    if path.name not in listed:
                        path.unlink(missing_ok=True)
        except OSError as exc:  # read-only or full file system, lock timeout (filelock.Timeout is an OSError)
            self.write_failed = True
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            logger.warning(
                "embedding cache %s is not writable (%s); embeddings are computed but not saved", folder, reason
            )

    def _drop_shards(self, key: str, files: list[str]) -> None:
        """Remove damaged shards from the manifest (so their rows are written again) and delete them."""

        def update(manifest: dict) -> dict | None:
            kept = [s for s in manifest["shards"] if s["file"] not in files]
            return None if len(kept) == len(manifest["shards"]) else {**manifest, "shards": kept}

        self._write_locked(key, update)
        if not self.write_failed:
            for name in files:
                (self.folder(key) / name).unlink(missing_ok=True)

    def _next_shard_name(self, key: str, manifest: dict) -> str:
        folder = self.folder(key)
        numbers = [_shard_number(Path(s["file"])) for s in manifest["shards"]]
        numbers += [_shard_number(p) for p in folder.glob("shard-*.safetensors")]
        return f"shard-{max(numbers, default=-1) + 1:04d}.safetensors"

    def _bounded(self, key: str, manifest: dict) -> dict:
        """``manifest`` with its shards merged into one when there are too many shards or rows."""
        total = sum(len(s["ids"]) for s in manifest["shards"])
        too_many_rows = self.max_rows is not None and total > self.max_rows
        if len(manifest["shards"]) <= self.max_shards and not too_many_rows:
            return manifest
        ids: list[str] = []
        tables: list[torch.Tensor] = []
        for shard in manifest["shards"]:
            try:
                tables.append(self._read_shard(key, shard, manifest["dim"]))
            except (CacheCorruptError, FileNotFoundError):
                continue  # a damaged shard is left out of the merge; its rows are recomputed later
            ids.extend(shard["ids"])
        table = torch.cat(tables) if tables else torch.zeros(0, manifest["dim"])
        if self.max_rows is not None and len(ids) > self.max_rows:
            ids, table = ids[len(ids) - self.max_rows :], table[len(ids) - self.max_rows :]
        name = self._next_shard_name(key, manifest)
        sha = write_tensors(self.folder(key) / name, {"embeddings": table}, {"key": key, "ids": ids})
        return {**manifest, "shards": [{"file": name, "ids": ids, "sha256": sha}]}


def _shard_number(path: Path) -> int:
    match = _SHARD_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _manifest_problem(manifest) -> str | None:
    """Why ``manifest`` is malformed (None if it is well formed)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), str):
        return "manifest is not an object with a key"
    dim = manifest.get("dim")
    if dim is not None and (not isinstance(dim, int) or dim < 1):
        return f"manifest has an invalid dim {dim!r}"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "manifest has no shard list"
    for s in shards:
        if not (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and _SHARD_NAME.fullmatch(s["file"])
            and isinstance(s.get("ids"), list)
            and isinstance(s.get("sha256"), str)
        ):
            return "manifest has a malformed shard entry"
    if shards and dim is None:
        return "manifest lists shards but no dim"
    return None
