"""Fine-tune (or load) a causal LM on a text file: the set-up that ``influent train --model lm`` and
``influent trace`` share, so that trace finds the model train fitted on the same file with the same options.

The checkpoint lives in ``<cache>/lm/<key>/`` where the key is a fingerprint of the base model, the training
sequences' ids and token ids, and the fine-tuning settings (:func:`influent.models.causal_lm.save_checkpoint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent import store
from influent.data.lm_text import LMSequence, lm_batches, read_documents, tokenize_documents
from influent.errors import UserError
from influent.models.causal_lm import (
    CausalLMTask,
    context_length,
    fine_tune,
    freeze_all_but_last_blocks,
    load_causal_lm,
    load_checkpoint,
    resolve_lm,
    save_checkpoint,
)

DEFAULT_MAX_LENGTH = 128


@dataclass
class LMSettings:
    """What determines a fine-tuned LM (all of it goes into the checkpoint key)."""

    data: str
    base_model: str | None = None
    text_column: str = "text"
    prompt_column: str | None = None
    completion_column: str | None = None
    hf_split: str = "train"
    max_length: int | None = None  # None: 128 or the model's context, whichever is smaller
    last_k: int | None = 2
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}", field=name)
        if not (self.lr > 0 and self.lr < float("inf")):
            raise UserError(f"lr must be a positive finite number, got {self.lr}", field="lr")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"max_length must be at least 2, got {self.max_length}", field="max_length")


@dataclass
class LMSetup:
    """A fine-tuned causal LM with its tokenizer, task, training sequences and their batches."""

    model: nn.Module
    tokenizer: object
    sequences: list[LMSequence]
    settings: LMSettings
    folder: Path | None
    metrics: dict = field(default_factory=dict)
    task: CausalLMTask = field(default_factory=CausalLMTask)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def batches(self, sequences: list[LMSequence] | None = None) -> list[dict[str, torch.Tensor]]:
        """Right-padded batches of ``sequences`` (default: every training sequence, in order)."""
        seqs = self.sequences if sequences is None else sequences
        return lm_batches(seqs, self.settings.batch_size, self.pad_id)


def fit_sample(sequences: list[LMSequence], size: int | None, seed: int) -> list[LMSequence]:
    """The sequences the curvature is fitted on: every one (``size`` None or the corpus size), else ``size``
    of them drawn without replacement by ``numpy.random.default_rng(seed)``, kept in corpus order.

    Raises:
        UserError: (field ``fit_size``) ``size`` below 1 or above the number of sequences.
    """
    n = len(sequences)
    if size is None:
        return list(sequences)
    if not 1 <= size <= n:
        raise UserError(f"fit_size must be between 1 and the {n} training sequences, got {size}", field="fit_size")
    chosen = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return [sequences[int(i)] for i in chosen]


def prepare_lm(settings: LMSettings, *, cache_dir: str | Path | None = None, retrain: bool = False,
               progress: bool = True) -> LMSetup:
    """Load the base model, tokenize the data, then fine-tune it (or load the checkpoint of an earlier run).

    Raises:
        UserError: unknown model, unreadable data or data with no text, bad settings, ``max_length``
            beyond the model's context.
    """
    settings.validate()
    documents = read_documents(settings.data, text_column=settings.text_column,
                               prompt_column=settings.prompt_column, completion_column=settings.completion_column,
                               hf_split=settings.hf_split)
    model, tokenizer = load_causal_lm(settings.base_model, progress=progress)
    if settings.max_length is None:
        settings.max_length = min(DEFAULT_MAX_LENGTH, context_length(model))
    if settings.max_length > context_length(model):
        raise UserError(f"max_length {settings.max_length} exceeds the model's context of {context_length(model)}",
                        field="max_length")
    sequences = tokenize_documents(tokenizer, documents, settings.max_length)
    setup = LMSetup(model, tokenizer, sequences, settings, None)
    source, gguf = resolve_lm(settings.base_model)
    key = store.fingerprint(source, gguf, [(s.id, s.input_ids, s.loss_mask) for s in sequences],
                            {k: v for k, v in vars(settings).items() if k not in ("data", "base_model")})
    root = Path(cache_dir) if cache_dir is not None else store.default_cache_dir()
    setup.folder = root / "lm" / key
    if not retrain and (setup.folder / "settings.json").exists():
        load_checkpoint(setup.folder, model)
        setup.metrics = store.read_json(setup.folder / "metrics.json")
        return setup
    freeze_all_but_last_blocks(model, settings.last_k)

    def epoch_batches(gen: torch.Generator):
        order = torch.randperm(len(sequences), generator=gen).tolist()
        return lm_batches([sequences[i] for i in order], settings.batch_size, setup.pad_id)

    t0 = time.perf_counter()
    history = fine_tune(model, epoch_batches, epochs=settings.epochs, lr=settings.lr, seed=settings.seed,
                        progress=progress)
    setup.metrics = {"n_sequences": len(sequences), "epoch_loss": history, "seconds": time.perf_counter() - t0,
                     "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    saved = {**vars(settings), "source": source, "gguf_file": gguf, "optimizer": "AdamW"}
    save_checkpoint(setup.folder, model, saved, setup.metrics)
    return setup
