"""The fine-tuned classifier's side of the fidelity evaluation (identity/diagonal/K-FAC/EK-FAC curvature).

The model: the encoder (default: packaged all-MiniLM-L6-v2) + a classification head, initialised with
``torch.manual_seed(seed)`` and fine-tuned in its last ``k`` encoder layers (+ pooler and head) by
:class:`~influent.models.training.MinibatchTrainer` (AdamW, dropout on, seeded) on a stratified slice of
the training split. Because the original training *is* that replay, cold-start leave-one-out reruns exactly
the same procedure (same initial weights, optimiser, epochs, seed and shuffling, one example absent); warm
start continues the same AdamW schedule from the trained weights; changes are taken against the same
retraining on all examples (:meth:`GroundTruth.baseline`). The PBRF is solved approximately by minibatch
SGD (``pbrf_epochs`` passes; p is in the millions). Scores come from one
:class:`~influent.factored_influence.FactoredInfluence` per strategy over the trainable ``nn.Linear`` modules;
the comparison itself is :func:`influent.evaluation.fidelity.evaluate_fidelity`, as for the head.

By default (``frozen_prefix=True``) the frozen embeddings and layers run once: the hidden states entering
the first trainable layer are cached and every training, scoring, retraining and PBRF step runs only the
trainable suffix (:mod:`influent.models.frozen_prefix`); dropout then acts in the trainable layers only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent.curvature.config import FactorConfig
from influent.data import load_corpus, load_or_make_split
from influent.data.split import stratified_sample
from influent.errors import UserError
from influent.evaluation.fidelity import FidelityRun, FidelitySubject, ScoredMethods, evaluate_fidelity
from influent.evaluation.groundtruth import GroundTruth, tensor_digest
from influent.evaluation.metrics import correlations, relative_error
from influent.factored_influence import FactoredInfluence
from influent.gradients import ParameterSpace, full_gradient
from influent.models.finetuned import FinetunedTask, default_encoder, freeze_all_but_last, make_batches
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
from influent.store import default_cache_dir, fingerprint, read_tensors, write_json, write_tensors
from influent.task import Batch, Task, iter_chunks, slice_batch


def trainable_module_regex(model: nn.Module) -> str:
    """Regex selecting the ``nn.Linear`` modules whose weights are trainable (``re.search`` on names)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not names:
        raise UserError("the model has no trainable nn.Linear module to score", field="fine_tune_last")
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


# ------------------------------------------------------------------------------------ the model being built
@dataclass
class FidelityRows:
    """Corpus rows of a fine-tuned fidelity run: the stratified training slice, the queries, the held-out set."""

    train: np.ndarray
    queries: np.ndarray
    heldout: np.ndarray


def fidelity_rows(labels: np.ndarray, split, train_size: int, queries: int, heldout: int, seed: int) -> FidelityRows:
    """Seeded draws: ``train_size`` stratified training rows, ``queries`` test rows, ``heldout`` other test rows."""
    train_rows = np.asarray(split.train_idx)[stratified_sample(labels[split.train_idx], train_size, seed)]
    rng = np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(np.asarray(split.test_idx), queries, replace=False))
    rest = np.setdiff1d(np.asarray(split.test_idx), query_rows)
    heldout_rows = np.sort(np.random.default_rng(seed + 1).choice(rest, min(heldout, len(rest)), replace=False))
    return FidelityRows(train_rows, query_rows, heldout_rows)


@dataclass
class FinetunedClassifier:
    """A classifier fine-tuned (or loaded from the cache) for the fidelity evaluation, and its data.

    Attributes:
        model: the model scored (the trainable suffix with ``frozen_prefix``, else the full classifier).
        fit_model: the model trained, retrained and PBRF-solved (``model`` or its first-token variant; same
            tracked parameters in the same order).
        task: the task of both; trainer: the seeded AdamW replay (cold start = ``trainer.init_theta``).
        train_batch, query_batch, heldout_batch: tokenized (or prefix-cached) batches.
        theta_s: the fine-tuned tracked parameters; key: fingerprint of the fine-tuning (cache key).
        trainable: trainable parameters of the full classifier.
        frozen_prefix, first_token: which speed-ups are on.
        rows: the corpus rows of the training slice, the queries and the held-out set.
        encoder, fine_tune_last, max_length: what was fine-tuned and how texts were cut.
        query_accuracy, heldout_accuracy: the fine-tuned model's accuracy on the queries and the held-out set.
    """

    model: nn.Module
    fit_model: nn.Module
    task: Task
    trainer: MinibatchTrainer
    train_batch: Batch
    query_batch: Batch
    heldout_batch: Batch
    theta_s: torch.Tensor
    key: str
    trainable: int
    frozen_prefix: bool
    first_token: bool
    rows: FidelityRows
    encoder: str
    fine_tune_last: int
    max_length: int
    query_accuracy: float = float("nan")
    heldout_accuracy: float = float("nan")

    @property
    def n_train(self) -> int:
        return self.task.batch_size(self.train_batch)

    @torch.no_grad()
    def accuracy(self, batch: Batch) -> float:
        """Fraction of ``batch`` the scored model classifies correctly (NaN for an empty batch)."""
        n = self.task.batch_size(batch)
        if not n:
            return float("nan")
        hits = [self.task.model_output(self.model, b).argmax(-1) == b["labels"] for _, b in iter_chunks(batch, n, 128)]
        return float(torch.cat(hits).double().mean())


def _tokenize(tokenizer, corpus, labels: np.ndarray, rows: np.ndarray, max_length: int) -> dict:
    (batch,) = make_batches(
        tokenizer, [corpus.texts[i] for i in rows], labels[rows].tolist(), batch_size=max(len(rows), 1),
        max_length=max_length,
    )
    return batch


def _fine_tune_cached(trainer: MinibatchTrainer, train_batch: Batch, n: int, folder: Path) -> torch.Tensor:
    """The fine-tuned parameters from ``folder`` if saved there, else trained from ``trainer.init_theta`` and saved."""
    if (folder / "theta.safetensors").exists():
        return read_tensors(folder / "theta.safetensors")["theta"]
    theta_s, info = trainer.fit(train_batch, torch.arange(n), trainer.init_theta)
    write_tensors(folder / "theta.safetensors", {"theta": theta_s})
    write_json(folder / "train.json", info)
    return theta_s


def build_finetuned_classifier(
    corpus, labels: np.ndarray, rows: FidelityRows, *, encoder: str, fine_tune_last: int, seed: int, epochs: int,
    lr: float, batch_size: int, max_length: int, frozen_prefix: bool, first_token: bool, cache: Path,
) -> FinetunedClassifier:
    """Tokenize, build the classifier (``torch.manual_seed(seed)``), cache the frozen prefix, fine-tune (cached)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    batches = [_tokenize(tokenizer, corpus, labels, r, max_length) for r in (rows.train, rows.queries, rows.heldout)]
    torch.manual_seed(seed)
    # eager attention: the PBRF step size uses forward-mode AD, which SDPA kernels lack on CPU
    with expected_load_notes_hidden():  # the new head's weights are MISSING: we train them
        model = AutoModelForSequenceClassification.from_pretrained(
            encoder, num_labels=int(labels.max()) + 1, attn_implementation="eager"
        )
    trainable = freeze_all_but_last(model, fine_tune_last)
    model.eval()
    task = FinetunedTask()
    frozen_prefix = bool(frozen_prefix and supports_frozen_prefix(model))
    if frozen_prefix:
        # everything below the first trainable layer is fixed: cache its output once, train the suffix only
        batches = [cache_hidden_states(model, b, fine_tune_last) for b in batches]
        model = split_frozen_prefix(model, fine_tune_last)
        task = CachedPrefixTask()
    first_token = bool(first_token and frozen_prefix and fine_tune_last == 1 and supports_first_token(model))
    fit_model = first_token_model(model) if first_token else model
    space = ParameterSpace(model, task)
    trainer = MinibatchTrainer(
        fit_model, task, space.flat(), epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw",
        dropout=True, seed=seed,
    )
    key = fingerprint(
        encoder, corpus.fingerprint(), rows.train.tolist(), fine_tune_last, trainer.settings, max_length,
        *(["frozen-prefix"] if frozen_prefix else []), *(["first-token"] if first_token else []),
    )
    theta_s = _fine_tune_cached(trainer, batches[0], len(rows.train), cache / "validate" / f"finetuned-{key}")
    space.load(theta_s)
    if fit_model is not model:
        ParameterSpace(fit_model, task).load(theta_s)
    clf = FinetunedClassifier(
        model, fit_model, task, trainer, *batches, theta_s, key, trainable, frozen_prefix, first_token, rows,
        encoder, fine_tune_last, max_length,
    )
    clf.query_accuracy, clf.heldout_accuracy = clf.accuracy(clf.query_batch), clf.accuracy(clf.heldout_batch)
    return clf


# ------------------------------------------------------------------------------------------ the subject
def mean_module_damping(method: FactoredInfluence, fallback: float | None) -> float:
    """Mean over modules of a fitted factored method's absolute damping (``fallback`` or 0 if none recorded)."""
    per_module = method.describe().get("damping_per_module", {})
    return float(np.mean(list(per_module.values()))) if per_module else float(fallback or 0.0)


class FinetunedFidelity(FidelitySubject):
    """The fine-tuned classifier's side: one :class:`FactoredInfluence` per strategy, AdamW replay retraining.

    Args:
        clf: the fine-tuned classifier and its batches.
        strategies: curvature strategies compared (the last one is the reference).
        damping: absolute damping of the factored curvature (None: each module's heuristic); the PBRF
            proximity term uses the mean per-module damping of the reference strategy.
        seed: seeds the factor fits and the PBRF's SGD.
        pbrf_epochs, pbrf_lr: the PBRF's SGD solve (minibatches of the fine-tuning's batch size).
        cache: cache root (factors under ``factors/``, retraining under ``validate/``).
        progress: progress bars.
    """

    label = "finetuned"
    lds_start = "cold"

    def __init__(
        self, clf: FinetunedClassifier, *, strategies: Sequence[str], damping: float | None, seed: int,
        pbrf_epochs: int, pbrf_lr: float | None, cache: Path, progress: bool,
    ):
        self.clf, self.queries = clf, clf.query_batch
        self.strategies, self.damping, self.seed = list(strategies), damping, seed
        self.pbrf_options = {"epochs": pbrf_epochs, "lr": pbrf_lr, "batch_size": clf.trainer.batch_size, "seed": seed}
        self.pbrf_epochs, self.cache, self.progress = pbrf_epochs, cache, progress

    def methods(self) -> dict[str, FactoredInfluence]:
        clf = self.clf
        chunks = [c for _, c in iter_chunks(clf.train_batch, clf.n_train, 64)]
        regex = trainable_module_regex(clf.model)
        return {
            s: FactoredInfluence(
                clf.model, clf.task, chunks, FactorConfig(strategy=s, modules=regex, damping=self.damping, seed=self.seed),
                cache_dir=self.cache / "factors", progress=self.progress,
            )
            for s in self.strategies
        }

    def reference(self, names: list[str]) -> str:
        return names[-1]

    def ground_truth(self, scored: ScoredMethods) -> GroundTruth:
        clf = self.clf
        return GroundTruth(
            clf.fit_model, clf.task, clf.train_batch, clf.query_batch, clf.trainer,
            damping=mean_module_damping(scored.methods[scored.reference], self.damping), pbrf_method="sgd",
            pbrf_options=self.pbrf_options, cache_dir=self.cache / "validate", store_params=0,
            progress=self.progress,
        )

    def estimate_info(self, name: str, scored: ScoredMethods) -> dict:
        return {"damping (mean over modules)": mean_module_damping(scored.methods[name], self.damping)}

    def plot_title(self, reference: str) -> str:
        return f"fine-tuned: {reference}"

    def example_info(self, indices: list[int]) -> dict:
        return {"train_rows": self.clf.rows.train[indices].tolist()}

    def settings(self, run: FidelityRun) -> dict:
        clf, trainer, ref = self.clf, self.clf.trainer, run.scored.reference
        ref_damping = mean_module_damping(run.scored.methods[ref], self.damping)
        return {
            "encoder": clf.encoder,
            "fine_tune_last": clf.fine_tune_last,
            "trainable_parameters": clf.trainable,
            "n_train": clf.n_train,
            "queries": len(clf.rows.queries),
            "examples": len(run.indices),
            "subsets": run.subsets,
            "epochs": trainer.epochs,
            "lr": trainer.lr,
            "batch_size": trainer.batch_size,
            "max_length": clf.max_length,
            "frozen_prefix": "cached hidden states at the first trainable layer (prefix in eval mode)"
            if clf.frozen_prefix
            else "off (full model every step)",
            "first_token": "training/retraining/PBRF run the last layer at the first token only"
            if clf.first_token
            else False,
            "seed": self.seed,
            "damping": self.damping,
            "pbrf": f"SGD, {self.pbrf_epochs} epochs, proximity = mean {ref} damping {ref_damping:.3g}",
            "cold start": "AdamW replay from the same initial weights and seed",
            "warm start": "AdamW from the trained weights, same schedule",
            "LDS retraining": "cold start",
            "query accuracy": clf.query_accuracy,
            f"held-out accuracy ({len(clf.rows.heldout)} test reviews)": clf.heldout_accuracy,
            "theta digest": tensor_digest(clf.theta_s),
        }

    def gap(self, run: FidelityRun) -> dict:
        clf, scored, ref = self.clf, run.scored, run.scored.reference
        cold, warm, pbrf = run.truths["loo_cold"], run.truths["loo_warm"], run.truths["pbrf"]
        est_ref = run.estimate(ref)
        space = ParameterSpace(clf.model, clf.task)
        first = slice_batch(clf.train_batch, slice(0, min(clf.n_train, 256)))
        infos = run.ground_truth.infos
        return {
            "warm vs cold start": {
                "relative error of warm vs cold": relative_error(warm, cold),
                "Pearson(warm, cold)": correlations(warm, cold)["pearson"],
            },
            "convergence": {
                "gradient norm of the training loss at theta_s (first 256 examples)": float(
                    full_gradient(space, clf.theta_s, first).norm()
                ),
                "cold replay on all data: distance to theta_s": infos.get("baseline-cold", {}).get(
                    "distance_to_theta_s"
                ),
                "warm retrain on all data: distance to theta_s": infos.get("baseline-warm", {}).get(
                    "distance_to_theta_s"
                ),
            },
            "linearisation": {
                f"relative error of {ref} vs PBRF": relative_error(est_ref, pbrf),
                f"Pearson({ref}, PBRF)": correlations(est_ref, pbrf)["pearson"],
                f"Pearson({ref}, cold LOO)": correlations(est_ref, cold)["pearson"],
            },
            "curvature approximation": {
                f"Pearson({name}, {ref}) over all training examples": correlations(
                    scored.scores[name].T, scored.scores[ref].T
                )["pearson"]
                for name in scored.scores
                if name != ref
            },
        }


def validate_finetuned(
    *,
    strategies: Sequence[str] = ("identity", "diagonal", "kfac", "ekfac"),
    examples: int = 12,
    subsets: int = 0,
    queries: int = 3,
    epochs: int = 1,
    fine_tune_last: int = 1,
    train_size: int = 1000,
    damping: float | None = None,
    seed: int = 0,
    data: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    encoder: str | None = None,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 48,
    pbrf_epochs: int = 2,
    pbrf_lr: float | None = None,
    subset_fraction: float = 0.5,
    frozen_prefix: bool = True,
    first_token: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    heldout: int = 500,
) -> dict:
    """Factored influence vs cold/warm leave-one-out, PBRF and LDS on a fine-tuned classifier.

    Args:
        strategies: curvature strategies compared.
        examples: training examples retrained without (a third top / bottom by the last strategy's scores).
        subsets: random subsets retrained (cold start) for the LDS; 0 skips it.
        queries: test examples used as queries.
        epochs, lr, batch_size: the fine-tuning (and retraining) schedule (AdamW, seeded, dropout on).
        fine_tune_last: encoder layers fine-tuned (with pooler and head).
        train_size: training examples (stratified slice of the saved split).
        damping: absolute damping of the factored curvature (None: each module's heuristic); the PBRF
            proximity term uses the mean of the per-module damping of the last strategy.
        max_length: tokens kept per text.
        pbrf_epochs: SGD passes of the approximate PBRF solve.
        pbrf_lr: their step size (None: ``1 / lambda_max`` by power iteration).
        data, encoder: corpus spec and encoder (defaults: bundled Rotten Tomatoes, packaged MiniLM).
        text_column, label_column: columns of a local ``data`` file.
        frozen_prefix: compute the hidden states entering the first trainable layer once and run only the
            trainable suffix (last ``fine_tune_last`` layers, pooler, head) in training, scoring, retraining
            and the PBRF (:mod:`influent.models.frozen_prefix`; same results as the full model with
            the frozen layers' dropout off, several times cheaper). False: run the full model each step
            (dropout then also fires in the frozen layers).
        first_token: with ``frozen_prefix`` and ``fine_tune_last == 1`` on a BERT-like model, train, retrain
            and solve the PBRF with the last layer evaluated at the first token only (the pooler reads
            nothing else; :func:`~influent.models.frozen_prefix.first_token_model`); scores still use
            the whole layer. Same function to float rounding; dropout masks are drawn for the used positions
            only.
        cache_dir: cache root (trained model, factors and retraining results live under it).
        heldout: test reviews (outside the queries, seeded draw) on which the trained model's accuracy is
            reported.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    encoder = encoder or default_encoder()
    corpus = load_corpus(data, text_column=text_column, label_column=label_column)
    split = load_or_make_split(corpus, cache, seed=seed)
    labels = np.asarray(corpus.labels)
    rows = fidelity_rows(labels, split, train_size, queries, heldout, seed)
    clf = build_finetuned_classifier(
        corpus, labels, rows, encoder=encoder, fine_tune_last=fine_tune_last, seed=seed, epochs=epochs, lr=lr,
        batch_size=batch_size, max_length=max_length, frozen_prefix=frozen_prefix, first_token=first_token,
        cache=cache,
    )
    subject = FinetunedFidelity(
        clf, strategies=strategies, damping=damping, seed=seed, pbrf_epochs=pbrf_epochs, pbrf_lr=pbrf_lr,
        cache=cache, progress=progress,
    )
    return evaluate_fidelity(
        subject, examples=examples, subsets=subsets, subset_fraction=subset_fraction, seed=seed
    )


__all__ = [
    "FinetunedClassifier",
    "FinetunedFidelity",
    "build_finetuned_classifier",
    "trainable_module_regex",
    "validate_finetuned",
]
