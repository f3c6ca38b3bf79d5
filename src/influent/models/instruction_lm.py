"""A causal LM instruction-tuned on :mod:`influent.data.instructions` examples, on the cached-prefix fast path.

:class:`InstructionLM` holds the full model (only its last ``K`` blocks train), the suffix
(:class:`~influent.models.causal_prefix.CausalSuffix`) and the prefix cache. :meth:`InstructionLM.fit`
always starts from the base model's weights (restored in place), so every run, including a retrain after
removing examples, is a from-scratch run with its seed: seeded AdamW (weight decay 0) over the mean
completion NLL, batches in an order drawn from ``torch.Generator().manual_seed(seed)``.

Prediction: the label word with the lower summed NLL (nats) among the task's label words given the prompt
(:meth:`InstructionLM.label_nll`); with single-token label words this is the argmax of the two words'
next-token probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent.data.instructions import LABELS, Example
from influent.models.causal_lm import fine_tune, freeze_all_but_last_blocks, trainable_state
from influent.models.causal_prefix import (
    CachedCausalTask,
    CausalSuffix,
    PrefixCache,
    ScoredPair,
    TrainingCausalTask,
    cached_batches,
    first_target_logprobs,
    last_states,
    pair_losses,
)


@dataclass
class TrainSettings:
    """Fine-tuning settings of the victim (all of a run but the data and the seed).

    Defaults are the victim chosen by ``benchmarks/results/instruction-victim-pilot`` (never-poisoned runs
    only): the last block (K = 2 needs a second prefix pass and cost 4.5x more per step), 5 epochs, the lr
    decayed linearly from 1e-3 to 0 (clean accuracy 75.3 ± 1.6% over 3 seeds; a random 5% removal moves the
    triggered success by +1.3 ± 6.3 points, against +16.1 ± 18.1 with the earlier constant 5e-4 for 3 epochs).
    ``schedule`` / ``warmup_steps``: the learning-rate schedule of
    :func:`~influent.models.causal_lm.fine_tune` (``constant``, or ``linear`` decay to 0 after the warm-up).
    """

    last_k: int = 1
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 8
    schedule: str = "linear"
    warmup_steps: int = 0


class InstructionLM:
    """A causal LM, its tokenizer and the fast path for instruction examples.

    Args:
        model, tokenizer: e.g. from :func:`~influent.models.causal_lm.load_causal_lm` (model in float32/64).
        settings: the fine-tuning settings.
        cache_path: optional safetensors file for the prefix cache (read now, written by :meth:`save_cache`).
        eval_batch_size: batch size of everything but training (scores, losses, representations); larger
            batches read the vocabulary head's weight once for more examples (same numbers up to rounding).
    """

    def __init__(self, model: nn.Module, tokenizer, settings: TrainSettings | None = None,
                 cache_path: str | Path | None = None, eval_batch_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.eval_batch_size = eval_batch_size
        self.settings = settings or TrainSettings()
        freeze_all_but_last_blocks(model, self.settings.last_k)
        self.suffix = CausalSuffix(model, self.settings.last_k)
        self.cache = PrefixCache(model, self.settings.last_k, cache_path)
        self.base_state = trainable_state(model)
        self.task = CachedCausalTask()
        self._ids: dict[str, tuple[int, ...]] = {}

    def _encode(self, text: str, special: bool) -> tuple[int, ...]:
        key = f"{int(special)}\x00{text}"
        if key not in self._ids:
            self._ids[key] = tuple(int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return self._ids[key]

    def pair(self, example: Example, label: int | None = None) -> ScoredPair:
        """``example``'s prompt with the completion ``" " + label word`` (default its own label)."""
        word = LABELS[example.task][example.label if label is None else label]
        return ScoredPair(self._encode(example.prompt, True), self._encode(" " + word, False))

    def batches(self, examples: Sequence[Example], labels: Sequence[int] | None = None,
                batch_size: int | None = None) -> list[dict]:
        """Cached batches of the examples (with ``labels`` instead of their own, if given), in order; of the
        training batch size unless ``batch_size`` is given."""
        labels = [None] * len(examples) if labels is None else list(labels)
        return cached_batches(self.cache, [self.pair(e, y) for e, y in zip(examples, labels)],
                              batch_size or self.settings.batch_size)

    def reset(self) -> None:
        """Put the base model's trainable weights back (in place)."""
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.base_state.items():
                own[name].copy_(value)

    def fit(self, examples: Sequence[Example], seed: int, on_epoch: Callable[[int], None] | None = None,
            progress: bool = False) -> list[float]:
        """Fine-tune from the base weights on ``examples`` (see module docstring); mean loss per epoch."""
        self.reset()
        batches_all = self.batches(examples)
        rows = [(b, i) for b in batches_all for i in range(b["attention_mask"].shape[0])]

        def epoch_batches(gen: torch.Generator):
            order = torch.randperm(len(rows), generator=gen).tolist()
            size = self.settings.batch_size
            return [_stack([rows[j] for j in order[s:s + size]]) for s in range(0, len(order), size)]

        s = self.settings
        return fine_tune(self.suffix, epoch_batches, epochs=s.epochs, lr=s.lr, seed=seed, progress=progress,
                         task=TrainingCausalTask(), on_epoch=on_epoch, fused=True, schedule=s.schedule,
                         warmup_steps=s.warmup_steps)

    def label_nll(self, examples: Sequence[Example]) -> np.ndarray:
        """``[N, 2]``: summed NLL (nats) of each of the task's label words as the completion."""
        out = np.zeros((len(examples), 2))
        size = self.eval_batch_size
        by_task: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            by_task.setdefault(e.task, []).append(i)
        for task, idx in by_task.items():
            part = [examples[i] for i in idx]
            words = [self._encode(" " + w, False) for w in LABELS[task]]
            if all(len(w) == 1 for w in words):  # both candidates from one pass (they share the input)
                logp = first_target_logprobs(self.suffix, self.batches(part, [0] * len(part), size),
                                             [w[0] for w in words])
                out[idx] = -logp.double().numpy()
                continue
            for label in (0, 1):
                out[idx, label] = pair_losses(self.suffix, self.batches(part, [label] * len(part), size)).numpy()
        return out

    def predict(self, examples: Sequence[Example]) -> np.ndarray:
        """The label with the lower summed NLL, ``[N]`` int (ties: label 0)."""
        nll = self.label_nll(examples)
        return (nll[:, 1] < nll[:, 0]).astype(np.int64)

    def losses(self, examples: Sequence[Example]) -> np.ndarray:
        """Each example's loss at its own label (nats), ``[N]``."""
        return pair_losses(self.suffix, self.batches(examples, batch_size=self.eval_batch_size)).double().numpy()

    def representations(self, examples: Sequence[Example]) -> np.ndarray:
        """The final-norm hidden state that predicts each example's completion, ``[N, H]``."""
        return last_states(self.suffix, self.batches(examples, batch_size=self.eval_batch_size)).double().numpy()

    def save_cache(self) -> None:
        self.cache.save()


def _stack(rows: list[tuple[dict, int]]) -> dict:
    """One batch from rows of cached batches (re-padded to the longest of them)."""
    width = max(int(b["attention_mask"][i].sum()) for b, i in rows)
    c = max(b["target_pos"].shape[1] for b, _ in rows)
    out = {}
    for key in ("inputs_embeds", "attention_mask"):
        parts = [b[key][i, :width] for b, i in rows]
        out[key] = torch.stack([torch.nn.functional.pad(p, _pad(p, width)) for p in parts])
    for key in ("target_pos", "target_ids", "target_mask"):
        out[key] = torch.stack([torch.nn.functional.pad(b[key][i], (0, c - b[key].shape[1])) for b, i in rows])
    return out


def _pad(t: torch.Tensor, width: int) -> tuple[int, ...]:
    """``F.pad`` amounts that extend dimension 0 of ``t`` to ``width``."""
    return (0, 0) * (t.dim() - 1) + (0, width - t.shape[0])


def load_instruction_lm(base_model: str | None = None, settings: TrainSettings | None = None, *,
                        cache_dir: str | Path | None = None, progress: bool = True) -> InstructionLM:
    """Load the base causal LM (default SmolLM2-135M-Instruct) as an :class:`InstructionLM` whose prefix
    cache lives in ``<cache>/lm-prefix/<key>.safetensors`` (key: the model source and ``last_k``)."""
    from influent import store
    from influent.models.causal_lm import load_causal_lm, resolve_lm

    settings = settings or TrainSettings()
    model, tokenizer = load_causal_lm(base_model, progress=progress)
    root = Path(cache_dir) if cache_dir is not None else store.default_cache_dir()
    key = store.fingerprint(*resolve_lm(base_model), settings.last_k)
    return InstructionLM(model, tokenizer, settings, root / "lm-prefix" / f"{key}.safetensors")
