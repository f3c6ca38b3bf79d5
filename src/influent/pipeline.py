"""corpus -> split -> embeddings -> trained head: the frozen-encoder setting, built once and cached.

Every later command (explain, audit, attack, validate) starts from :func:`prepare_head`, which reuses the
saved split, the embedding cache and the saved head when the settings match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from influent import store
from influent.data import Corpus, Split, load_corpus, load_or_make_split, stratified_sample
from influent.errors import CacheCorruptError, UserError
from influent.influence import ExactInfluence, SolverOptions
from influent.models.encoder import DEFAULT_ENCODER, EmbeddingCache, TextEncoder
from influent.models.head import HeadTask, LogisticHead, accuracy, load_head, save_head, train_head
from influent.models.head_data import HeadData, split_heldout
from influent.store import default_cache_dir, fingerprint

DEFAULT_L2 = 1e-3
QUERY_CACHE_ROWS = 20_000  # query embeddings kept on disk (about 30 MB at d = 384)
logger = logging.getLogger(__name__)


@dataclass
class HeadSetup:
    """A trained frozen-encoder classifier and everything it was built from.

    Attributes:
        corpus: all examples; ``train_idx`` / ``test_idx`` index into it.
        train_x, test_x: float64 embeddings ``[n, d]``; train_y, test_y: int64 labels.
        model, task: the trained :class:`LogisticHead` and its :class:`HeadTask` (holds l2).
        info: settings and metrics saved beside the head (test accuracy, gradient norm, ...).
        folder: where the head and its JSON live.
    """

    corpus: Corpus
    train_idx: np.ndarray
    test_idx: np.ndarray
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    model: LogisticHead
    task: HeadTask
    info: dict
    folder: Path
    encoder: TextEncoder = field(repr=False)
    query_cache: EmbeddingCache | None = field(default=None, repr=False)

    @property
    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x, self.train_y

    @property
    def test_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_x, self.test_y

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of new texts (float64, same encoder and pooling).

        Cached in the small query cache (``<cache>/query-embeddings``, newest ``QUERY_CACHE_ROWS`` rows),
        never in the corpus cache, so queries do not grow it.
        """
        return self.encoder.embed(texts, cache=self.query_cache, progress=False, what="query text").double()

    def engine(self, solver: str = "exact", damping: float = 0.0, options: SolverOptions | None = None) -> ExactInfluence:
        """An :class:`ExactInfluence` over the training set with the head's exact Hessian."""
        return ExactInfluence(
            self.model, self.task, self.train_batch, solver=solver, damping=damping,
            options=options or SolverOptions(),
        )

    def head_data(self, seed: int = 0, val_fraction: float = 0.5) -> HeadData:
        """The head's record (:class:`~influent.models.head_data.HeadData`): the training set and the held-out
        split divided (seeded) into a validation and an evaluation half, with texts, ids and the encoder."""
        val, ev = split_heldout(len(self.test_idx), seed, val_fraction)
        texts, ids = self.corpus.texts, self.corpus.ids
        te_texts = [texts[i] for i in self.test_idx]
        return HeadData(
            train_x=self.train_x.double(),
            train_y=self.train_y.long(),
            val_x=self.test_x[val].double(),
            val_y=self.test_y[val].long(),
            eval_x=self.test_x[ev].double(),
            eval_y=self.test_y[ev].long(),
            num_classes=len(self.corpus.label_names),
            l2=float(self.task.l2),
            seed=seed,
            train_texts=[texts[i] for i in self.train_idx],
            val_texts=[te_texts[i] for i in val],
            eval_texts=[te_texts[i] for i in ev],
            embed=self.embed,
            label_names=list(self.corpus.label_names),
            train_ids=[ids[i] for i in self.train_idx],
        )

    def influence(self, solver: str = "exact", damping: float = 0.0, options: SolverOptions | None = None) -> ExactInfluence:
        """The head's :class:`~influent.influence.InfluenceMethod`: exact Hessian, solved by ``solver``."""
        return self.engine(solver=solver, damping=damping, options=options)

    # --- the query side of explain (queries: objects with ``.text`` and optional ``.features``) -------------
    def held_out_features(self, index: int) -> torch.Tensor:
        """Features of the ``index``-th held-out review (as stored, not re-embedded)."""
        return self.test_x[index]

    def query_features(self, queries) -> torch.Tensor:
        """Float64 features ``[Q, d]`` of queries: their ``.features`` when given, else the embedded ``.text``."""
        missing = [q.text for q in queries if q.features is None]
        embedded = iter(self.embed(missing)) if missing else iter(())
        return torch.stack([q.features if q.features is not None else next(embedded) for q in queries]).double()

    def probabilities(self, queries) -> torch.Tensor:
        """Class probabilities ``[Q, K]`` (float64) of the queries under the head."""
        return self.model.probabilities(self.query_features(queries)).detach()

    def query_batches(self, queries, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries as one head batch ``(features, labels)``; ``labels`` pick the loss explained."""
        return self.query_features(queries), torch.as_tensor(labels, dtype=torch.long)


def load_corpus_and_split(
    data: str | None, text_column: str, label_column: str, hf_split: str, test_fraction: float, seed: int,
    cache: Path,
) -> tuple[Corpus, Split]:
    """The corpus and its saved seeded split (shared by every model kind, so they see the same test set)."""
    corpus = load_corpus(data, text_column=text_column, label_column=label_column, hf_split=hf_split)
    return corpus, load_or_make_split(corpus, cache, test_fraction=test_fraction, seed=seed)


def prepare_head(
    data: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    hf_split: str = "train",
    encoder: str | None = None,
    pooling: str = "mean",
    max_length: int = 128,
    l2: float | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    retrain: bool = False,
) -> HeadSetup:
    """Load the corpus, split it (saved), embed it (cached) and train or load the logistic head.

    Args:
        data: corpus spec (None = bundled Rotten Tomatoes; a CSV/JSONL/Parquet path; ``hf:NAME``).
        encoder: Hugging Face encoder name or local path (None: the packaged all-MiniLM-L6-v2).
        pooling: ``'mean'`` or ``'cls'``.
        max_length: tokens kept per text.
        l2: ridge coefficient lambda of the head's objective (None: ``DEFAULT_L2``).
        seed: seeds the train/test split.
        test_fraction: held-out share, stratified by label.
        cache_dir: cache root (default ``$INFLUENT_CACHE_DIR`` or ``~/.cache/influent``).
        progress: show progress bars.
        retrain: ignore a saved head with the same settings.
    """
    encoder = encoder or DEFAULT_ENCODER
    l2 = DEFAULT_L2 if l2 is None else l2
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus, split = load_corpus_and_split(data, text_column, label_column, hf_split, test_fraction, seed, cache)
    enc = TextEncoder(encoder, pooling=pooling, max_length=max_length)
    x = enc.embed(corpus.texts, cache=EmbeddingCache(cache / "embeddings"), progress=progress,
                  what="corpus text", field="data", source_rows=corpus.rows).double()
    y = torch.as_tensor(corpus.labels, dtype=torch.long)
    tr, te = torch.as_tensor(split.train_idx), torch.as_tensor(split.test_idx)
    key = fingerprint(corpus.fingerprint(), enc.key(), split.train_idx.tolist(), l2)
    folder = cache / "heads" / key
    num_classes = len(corpus.label_names)
    loaded = None if retrain else _load_saved_head(folder, x.shape[1], num_classes)
    if loaded is not None:
        model, task, info = loaded
    else:
        model, task, report = train_head(x[tr], y[tr], num_classes, l2)
        info = {
            "data": corpus.source,
            "encoder": encoder,
            "pooling": pooling,
            "max_length": max_length,
            "seed": seed,
            "test_fraction": test_fraction,
            "n_train": len(tr),
            "n_test": len(te),
            "label_names": corpus.label_names,
            "train_accuracy": accuracy(model, x[tr], y[tr]),
            "test_accuracy": accuracy(model, x[te], y[te]),
            "grad_norm": report.grad_norm,
            "newton_iterations": report.iterations,
            "converged": report.converged,
            "train_seconds": report.seconds,
        }
        _save_head_if_possible(model, task, folder, info)
    query_cache = EmbeddingCache(cache / "query-embeddings", max_rows=QUERY_CACHE_ROWS, max_shards=16)
    return HeadSetup(
        corpus, split.train_idx, split.test_idx, x[tr], y[tr], x[te], y[te], model, task, info, folder,
        enc, query_cache,
    )


def _load_saved_head(folder: Path, dim: int, num_classes: int) -> tuple[LogisticHead, HeadTask, dict] | None:
    """The head saved in ``folder``, or None (none saved, or damaged: one-line warning, it is retrained)."""
    if not (folder / "head.json").exists() and not (folder / "head.safetensors").exists():
        return None
    try:
        model, task, info = load_head(folder)
    except CacheCorruptError as exc:
        logger.warning("%s; retraining the head", exc)
        return None
    if model.linear.in_features != dim or model.num_classes != num_classes:
        logger.warning("head cache %s does not fit the embeddings (dim %d, %d classes); retraining the head",
                       folder, dim, num_classes)
        return None
    return model, task, info


def _save_head_if_possible(model: LogisticHead, task: HeadTask, folder: Path, info: dict) -> None:
    try:
        save_head(model, task, folder, info)
    except OSError as exc:  # a read-only cache still gives the trained head; it is just not saved
        logger.warning("head cache %s could not be written (%s); the head is not saved",
                       folder, exc.strerror or type(exc).__name__)


@dataclass
class FinetunedSetup:
    """A fine-tuned transformer classifier, its data and where it is saved.

    Attributes:
        corpus: all examples; ``train_idx`` (the examples it was trained on, possibly a seeded slice of
            the training split) and ``test_idx`` index into it.
        model, tokenizer: the classifier (eval mode; trainable = the fine-tuned layers) and tokenizer.
        settings, metrics: training settings and held-out metrics saved beside the checkpoint.
        folder: the checkpoint folder.
    """

    corpus: Corpus
    train_idx: np.ndarray
    test_idx: np.ndarray
    model: torch.nn.Module
    tokenizer: object
    settings: dict
    metrics: dict
    folder: Path

    def batches(self, indices: np.ndarray | list[int], labels: list[int] | None = None, batch_size: int = 32):
        """Tokenised dict batches of corpus rows ``indices`` (labels default to the gold labels)."""
        from influent.models.finetuned import make_batches

        texts = [self.corpus.texts[i] for i in indices]
        labels = [int(self.corpus.labels[i]) for i in indices] if labels is None else labels
        return make_batches(self.tokenizer, texts, labels, batch_size=batch_size,
                            max_length=self.settings["max_length"])

    def text_batches(self, texts: list[str], labels: list[int], batch_size: int = 32):
        """Tokenised dict batches of free texts with the given labels."""
        from influent.models.finetuned import make_batches

        return make_batches(self.tokenizer, texts, labels, batch_size=batch_size,
                            max_length=self.settings["max_length"])

    def influence(
        self,
        strategy: str = "ekfac",
        modules: str = "trainable",
        fisher: str = "empirical",
        damping: float | None = None,
        *,
        query_rank: int | None = None,
        seed: int = 0,
        train_cache: bool = False,
        train_cache_max_bytes: int | None = None,
        progress: bool = True,
    ):
        """The classifier's :class:`~influent.influence.InfluenceMethod`: factored curvature over its training
        set, fitted once and cached beside the checkpoint.

        Args:
            strategy: ``ekfac``, ``kfac``, ``diagonal`` or ``identity``.
            modules: tracked ``nn.Linear`` modules: ``trainable``, ``all``, ``mlp`` or a name regex.
            fisher: ``empirical`` or ``true`` (labels sampled from the model).
            damping: absolute damping, or None for 0.1 x the mean eigenvalue per module.
            query_rank: optional low-rank compression of preconditioned query gradients.
            seed: seeds the factor fit (sampled labels, ...).
            train_cache: keep the training token factors beside the model
                (:mod:`influent.curvature.token_cache`) so later calls skip the training passes;
                ``train_cache_max_bytes`` caps its size (None: 16 GiB).
        """
        from influent.curvature.config import FactorConfig
        from influent.curvature.token_cache import DEFAULT_MAX_BYTES
        from influent.factored_influence import FactoredInfluence
        from influent.models.finetuned import FinetunedTask

        config = FactorConfig(strategy=strategy, modules=modules, fisher=fisher, damping=damping, seed=seed)
        return FactoredInfluence(
            self.model, FinetunedTask(), self.batches(self.train_idx), config, cache_dir=self.folder,
            train_cache=train_cache, train_cache_max_bytes=train_cache_max_bytes or DEFAULT_MAX_BYTES,
            query_rank=query_rank, progress=progress,
        )

    # --- the query side of explain (queries: objects with ``.text``) -----------------------------------------
    def held_out_features(self, index: int) -> None:
        """The classifier reads text: no stored features (the held-out review's text is used)."""
        return

    def probabilities(self, queries) -> torch.Tensor:
        """Class probabilities ``[Q, K]`` (float64) of the queries' texts under the classifier."""
        from influent.models.finetuned import FinetunedTask

        task = FinetunedTask()
        texts = [q.text for q in queries]
        with torch.no_grad():
            logits = torch.cat([task.model_output(self.model, b) for b in self.text_batches(texts, [0] * len(texts))])
        return logits.double().softmax(-1)

    def query_batches(self, queries, labels: list[int]) -> list[dict]:
        """The queries' texts as tokenised batches; ``labels`` pick the loss explained."""
        return self.text_batches([q.text for q in queries], list(labels))


def prepare_finetuned(
    data: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    hf_split: str = "train",
    encoder: str | None = None,
    last_k: int | None = 2,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    train_size: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    retrain: bool = False,
) -> FinetunedSetup:
    """Fine-tune (or load the saved) transformer classifier on the same split as the head.

    Args:
        encoder: Hugging Face encoder name or local path (default: the packaged all-MiniLM-L6-v2).
        last_k: fine-tune the last k encoder layers + the head (None: all layers).
        epochs, lr, batch_size, max_length: AdamW fine-tuning settings.
        train_size: train on a seeded stratified slice of this many training examples (None: all).
        seed: seeds the split, the slice and the training.
        Other arguments as :func:`prepare_head`.
    """
    from influent.models.finetuned import default_encoder, load_finetuned, train_finetuned, verify_finetuned

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus, split = load_corpus_and_split(data, text_column, label_column, hf_split, test_fraction, seed, cache)
    train_idx = split.train_idx
    if train_size is not None and train_size < len(train_idx):
        train_idx = train_idx[stratified_sample(corpus.labels[train_idx], train_size, seed)]
    encoder = encoder or default_encoder()
    settings = {"encoder": encoder, "last_k": last_k, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                "max_length": max_length, "seed": seed}
    key = fingerprint(corpus.fingerprint(), train_idx.tolist(), split.test_idx.tolist(), settings)
    folder = cache / "finetuned" / key
    if not retrain and (folder / "settings.json").exists():
        try:
            verify_finetuned(folder)
        except CacheCorruptError as exc:
            raise UserError(f"{exc}; delete {folder} or retrain it (--retrain)", field="retrain") from None
    else:
        labels = corpus.labels
        train_finetuned(
            [corpus.texts[i] for i in train_idx], [int(labels[i]) for i in train_idx],
            [corpus.texts[i] for i in split.test_idx], [int(labels[i]) for i in split.test_idx], folder,
            encoder=encoder, last_k=last_k, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
            seed=seed, progress=progress,
        )
    model, tokenizer, saved = load_finetuned(folder)
    return FinetunedSetup(corpus, train_idx, split.test_idx, model, tokenizer, saved,
                          store.read_json(folder / "metrics.json"), folder)
