"""An encoder classifier fine-tuned in its last k layers, (re)trained cheaply on cached prefix hidden states.

Experiments that retrain the same fine-tuned classifier many times (poison attacks, k-fold baselines,
remove-and-retrain defences) build one :class:`SuffixClassifier`: the encoder + a classification head
initialised with ``torch.manual_seed(seed)``, embeddings and all but the last ``last_k`` layers frozen. Texts
are run through the frozen prefix once (:meth:`cache`); every training is a seeded AdamW replay (dropout on)
of the trainable suffix only (:class:`~influent.models.training.MinibatchTrainer`), from the same
initial parameters ``theta0`` unless told otherwise, so two trainings differ only by their data. For
``last_k == 1`` on a BERT-like model, training runs the last layer at the first token only (same function;
:func:`~influent.models.frozen_prefix.first_token_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from influent.errors import UserError
from influent.gradients import ParameterSpace
from influent.models.classifier import fraction_correct
from influent.models.finetuned import default_encoder, freeze_all_but_last, make_batches
from influent.models.frozen_prefix import (
    CachedPrefixTask,
    cache_hidden_states,
    first_token_model,
    split_frozen_prefix,
    supports_first_token,
    supports_frozen_prefix,
)
from influent.models.training import MinibatchTrainer
from influent.quiet import expected_load_notes_hidden
from influent.task import iter_chunks


class SuffixClassifier:
    """See the module docstring.

    Args:
        encoder: Hugging Face name or local folder (None: the packaged all-MiniLM-L6-v2).
        num_labels: classes.
        last_k: trainable encoder layers (>= 1), plus pooler and head.
        seed: seeds the head's initialisation, the shuffling and the dropout masks.
        epochs, lr, batch_size: AdamW settings.
        max_length: tokens per text.
    """

    def __init__(
        self,
        encoder: str | None,
        num_labels: int,
        *,
        last_k: int = 1,
        seed: int = 0,
        epochs: int = 3,
        lr: float = 1e-4,
        batch_size: int = 32,
        max_length: int = 48,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if last_k < 1:
            raise UserError(f"last_k must be >= 1 for prefix-cached retraining, got {last_k}", field="last_k")
        self.encoder = encoder or default_encoder()
        self.last_k, self.seed, self.max_length = last_k, seed, max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.encoder)
            torch.manual_seed(seed)
            # eager attention: double backward / forward-mode AD through attention work on CPU
            with expected_load_notes_hidden():  # the new head's weights are MISSING: we train them
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    self.encoder, num_labels=num_labels, attn_implementation="eager"
                )
        except (OSError, ValueError) as exc:
            raise UserError(
                f"encoder {self.encoder!r}: cannot load a tokenizer and model ({exc})", field="encoder"
            ) from None
        freeze_all_but_last(self.model, last_k)
        self.model.eval()
        if not supports_frozen_prefix(self.model):
            raise UserError(f"{type(self.model).__name__}: prefix caching needs a BERT-like encoder", field="encoder")
        self.task = CachedPrefixTask()
        self.suffix = split_frozen_prefix(self.model, last_k)
        use_first = last_k == 1 and supports_first_token(self.suffix)
        self.fit_model = first_token_model(self.suffix) if use_first else self.suffix
        self.theta0 = ParameterSpace(self.suffix, self.task).flat()
        self.trainer = MinibatchTrainer(
            self.fit_model, self.task, self.theta0, epochs=epochs, lr=lr, batch_size=batch_size,
            optimizer="adamw", dropout=True, seed=seed,
        )
        self._fit_space = ParameterSpace(self.fit_model, self.task)

    def cache(self, texts: Sequence[str], labels: Sequence[int]) -> dict:
        """Prefix hidden states of ``texts`` (one batch padded to its longest text), with ``labels``."""
        (b,) = make_batches(
            self.tokenizer, list(texts), list(labels), batch_size=max(len(texts), 1), max_length=self.max_length
        )
        return cache_hidden_states(self.model, b, self.last_k)

    def fit(
        self, batch: dict, keep: torch.Tensor | None = None, start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Train on the rows ``keep`` of ``batch`` (default all) from ``start`` (default ``theta0``)."""
        n = int(batch["attention_mask"].shape[0])
        keep = torch.arange(n) if keep is None else torch.as_tensor(keep, dtype=torch.long)
        return self.trainer.fit(batch, keep, self.theta0 if start is None else start)

    @torch.no_grad()
    def logits(self, theta: torch.Tensor, batch: dict, chunk: int = 256) -> torch.Tensor:
        """Logits ``[B, K]`` of the classifier with parameters ``theta`` (eval mode)."""
        self._fit_space.load(theta)
        n = int(batch["attention_mask"].shape[0])
        return torch.cat([self.task.model_output(self.fit_model, b) for _, b in iter_chunks(batch, n, chunk)])

    def predict(self, theta: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.logits(theta, batch).argmax(-1)

    def accuracy(self, theta: torch.Tensor, batch: dict) -> float:
        """Share of rows of ``batch`` whose predicted class (parameters ``theta``) equals ``batch['labels']``."""
        return fraction_correct(self.predict(theta, batch), batch["labels"])

    def load_suffix(self, theta: torch.Tensor) -> torch.nn.Module:
        """The (whole-layer) suffix model holding ``theta``: the model influence is computed on."""
        ParameterSpace(self.suffix, self.task).load(theta)
        return self.suffix

    def load_full(self, theta: torch.Tensor) -> torch.nn.Module:
        """The full classifier (embeddings + all layers) holding ``theta`` in its trainable part."""
        ParameterSpace(self.model, self.task).load(theta)
        return self.model
