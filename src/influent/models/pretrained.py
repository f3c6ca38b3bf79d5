"""Loading Hugging Face models and tokenizers without hub retries, and their length limits.

``from_pretrained`` on a name that is neither a local folder nor reachable retries the hub for tens of
seconds before failing. :func:`load_pretrained` tries local files first (the folder, or the local Hugging
Face cache), asks the hub only when one TCP connection to it succeeds, and turns every failure into one
:class:`~influent.errors.UserError` line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from influent.errors import UserError


def looks_like_path(name: str) -> bool:
    """A name meant as a folder (``./x``, ``/x``, ``~/x``, ``a/b/c``, an existing path), not a hub id."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or Path(name).exists()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached now: False at once under ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``, else one TCP connection to the hub endpoint (no retries)."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_pretrained(name: str, model_loader: Callable, tokenizer_loader: Callable, **model_kwargs):
    """``(tokenizer, model)`` of ``name`` (a local folder or a hub id), failing fast.

    Args:
        name: folder or hub id.
        model_loader, tokenizer_loader: e.g. ``AutoModel.from_pretrained``, ``AutoTokenizer.from_pretrained``.
        model_kwargs: passed to ``model_loader`` (e.g. ``num_labels``).

    Raises:
        UserError: ``unknown model name or path: NAME (why)``, field ``encoder``.
    """
    try:
        return tokenizer_loader(name, local_files_only=True), model_loader(name, local_files_only=True, **model_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        local_error = exc
    if Path(name).is_dir() or looks_like_path(name):
        why = _first_line(local_error) if Path(name).is_dir() else "no such folder"
        raise UserError(f"unknown model name or path: {name} ({why})", field="encoder") from None
    if not hub_reachable():
        raise UserError(
            f"unknown model name or path: {name} (not a local folder, not in the local Hugging Face cache, "
            "and the hub is unreachable or HF_HUB_OFFLINE is set)",
            field="encoder",
        ) from None
    try:
        return tokenizer_loader(name), model_loader(name, **model_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"unknown model name or path: {name} ({_first_line(exc)})", field="encoder") from None


def position_limit(model, tokenizer) -> int | None:
    """Most tokens per text the model can take: its absolute position embeddings (less RoBERTa's padding
    offset), capped by the tokenizer's ``model_max_length``; None when neither states a limit."""
    limits = []
    n = getattr(model.config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        base = getattr(model, "base_model", model)
        positions = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
        padding_idx = getattr(positions, "padding_idx", None)
        limits.append(n - (padding_idx + 1) if isinstance(padding_idx, int) else n)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else None


def check_max_length(max_length: int, model, tokenizer, name: str) -> None:
    """UserError (field ``max_length``) unless ``2 <= max_length <= position_limit(model, tokenizer)``."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"max_length must be an integer >= 2, got {max_length}", field="max_length")
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise UserError(
            f"max_length {max_length} is more than encoder {name} can take ({limit} positions)", field="max_length"
        )


def module_list_at(root, paths: tuple[str, ...]):
    """The first ``torch.nn.ModuleList`` found at one of the dotted attribute ``paths`` of ``root``, or None
    (where a Hugging Face model keeps its transformer blocks: ``encoder.layer``, ``model.layers``, ...)."""
    from torch import nn

    for path in paths:
        obj = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None
