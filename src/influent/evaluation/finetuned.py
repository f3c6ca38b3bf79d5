"""Fidelity of factored influence (identity/diagonal/K-FAC/EK-FAC) on a fine-tuned transformer classifier.

The model: the encoder (default: packaged all-MiniLM-L6-v2) + a classification head, initialised with
``torch.manual_seed(seed)`` and fine-tuned in its last ``k`` encoder layers (+ pooler and head) by
:class:`~influent.models.training.MinibatchTrainer` (AdamW, dropout on, seeded) on a stratified slice of
the training split. Because the original training *is* that replay, cold-start leave-one-out reruns exactly
the same procedure (same initial weights, optimiser, epochs, seed and shuffling, one example absent); warm
start continues the same AdamW schedule from the trained weights; changes are taken against the same
retraining on all examples (:meth:`GroundTruth.baseline`). The PBRF is solved approximately by minibatch
SGD (``pbrf_epochs`` passes; p is in the millions). Scores come from
:func:`influent.factored_influence.pairwise_scores` over the trainable ``nn.Linear`` modules.

By default (``frozen_prefix=True``) the frozen embeddings and layers run once: the hidden states entering
the first trainable layer are cached and every training, scoring, retraining and PBRF step runs only the
trainable suffix (:mod:`influent.models.frozen_prefix`); dropout then acts in the trainable layers only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from influent.data.split import stratified_sample
from influent.evaluation.groundtruth import GroundTruth, tensor_digest
from influent.evaluation.lds import lds, random_subsets
from influent.evaluation.metrics import correlations, relative_error
from influent.evaluation.validate import _plots, _write, select_examples
from influent.gradients import ParameterSpace, full_gradient
from influent.models.frozen_prefix import (
    CachedPrefixTask,
    cache_hidden_states,
    first_token_model,
    split_frozen_prefix,
    supports_first_token,
    supports_frozen_prefix,
)
from influent.models.training import MinibatchTrainer
from influent.store import fingerprint, read_tensors, write_json, write_tensors
from influent.task import iter_chunks, slice_batch


def trainable_module_regex(model: torch.nn.Module) -> str:
    """Regex selecting the ``nn.Linear`` modules whose weights are trainable (``re.search`` on names)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    if not names:
        raise ValueError("the model has no trainable nn.Linear module")
    import re

    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


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
    out: str | Path | None = "validate",
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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.data import load_corpus, load_or_make_split
    from influent.factored_influence import pairwise_scores
    from influent.models.finetuned import FinetunedTask, default_encoder, freeze_all_but_last, make_batches
    from influent.store import default_cache_dir

    t0 = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    encoder = encoder or default_encoder()
    corpus = load_corpus(data, text_column=text_column, label_column=label_column)
    split = load_or_make_split(corpus, cache, seed=seed)
    labels = np.asarray(corpus.labels)
    train_rows = np.asarray(split.train_idx)[stratified_sample(labels[split.train_idx], train_size, seed)]
    rng = np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(np.asarray(split.test_idx), queries, replace=False))
    texts = [corpus.texts[i] for i in train_rows]
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    (train_batch,) = make_batches(
        tokenizer, texts, labels[train_rows].tolist(), batch_size=len(texts), max_length=max_length
    )
    (query_batch,) = make_batches(
        tokenizer,
        [corpus.texts[i] for i in query_rows],
        labels[query_rows].tolist(),
        batch_size=queries,
        max_length=max_length,
    )
    # held-out reviews (outside the queries) for the trained model's accuracy
    rest = np.setdiff1d(np.asarray(split.test_idx), query_rows)
    heldout_rows = np.sort(np.random.default_rng(seed + 1).choice(rest, min(heldout, len(rest)), replace=False))
    (heldout_batch,) = make_batches(
        tokenizer,
        [corpus.texts[i] for i in heldout_rows],
        labels[heldout_rows].tolist(),
        batch_size=max(len(heldout_rows), 1),
        max_length=max_length,
    )
    num_labels = int(labels.max()) + 1
    torch.manual_seed(seed)
    # eager attention: the PBRF step size uses forward-mode AD, which SDPA kernels lack on CPU
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=num_labels, attn_implementation="eager"
    )
    trainable = freeze_all_but_last(model, fine_tune_last)
    model.eval()
    task = FinetunedTask()
    if frozen_prefix and supports_frozen_prefix(model):
        # everything below the first trainable layer is fixed: cache its output once, train the suffix only
        train_batch = cache_hidden_states(model, train_batch, fine_tune_last)
        query_batch = cache_hidden_states(model, query_batch, fine_tune_last)
        heldout_batch = cache_hidden_states(model, heldout_batch, fine_tune_last)
        model = split_frozen_prefix(model, fine_tune_last)
        task = CachedPrefixTask()
    else:
        frozen_prefix = False
    first_token = bool(first_token and frozen_prefix and fine_tune_last == 1 and supports_first_token(model))
    # the model trained, retrained and PBRF-solved (same tracked parameters, same order as `model`)
    fit_model = first_token_model(model) if first_token else model
    space = ParameterSpace(model, task)
    theta0 = space.flat()
    trainer = MinibatchTrainer(
        fit_model,
        task,
        theta0,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer="adamw",
        dropout=True,
        seed=seed,
    )
    n = len(texts)

    # ---- the original fine-tuning (cached)
    key = fingerprint(
        encoder,
        corpus.fingerprint(),
        train_rows.tolist(),
        fine_tune_last,
        trainer.settings,
        max_length,
        *(["frozen-prefix"] if frozen_prefix else []),
        *(["first-token"] if first_token else []),
    )
    folder = cache / "validate" / f"finetuned-{key}"
    if (folder / "theta.safetensors").exists():
        theta_s = read_tensors(folder / "theta.safetensors")["theta"]
    else:
        theta_s, info = trainer.fit(train_batch, torch.arange(n), theta0)
        write_tensors(folder / "theta.safetensors", {"theta": theta_s})
        write_json(folder / "train.json", info)
    space.load(theta_s)
    if fit_model is not model:
        ParameterSpace(fit_model, task).load(theta_s)
    with torch.no_grad():
        acc = float(
            (task.model_output(model, query_batch).argmax(-1) == query_batch["labels"]).double().mean()
        )
        heldout_acc = float(
            torch.cat(
                [
                    task.model_output(model, b).argmax(-1) == b["labels"]
                    for _, b in iter_chunks(heldout_batch, len(heldout_rows), 128)
                ]
            ).double().mean()
        ) if len(heldout_rows) else float("nan")

    # ---- scores per strategy
    chunks = [c for _, c in iter_chunks(train_batch, n, 64)]
    regex = trainable_module_regex(model)
    scores: dict[str, np.ndarray] = {}
    dampings: dict[str, float] = {}
    for strategy in strategies:
        config = FactorConfig(strategy=strategy, modules=regex, damping=damping, seed=seed)
        factors = fit_factors(
            model,
            task,
            chunks,
            config,
            cache_dir=cache / "factors",
            progress=progress,
            data_id=fingerprint(key, "train"),
        )
        scores[strategy] = pairwise_scores(
            model, task, factors, [query_batch], chunks, progress=progress
        ).numpy()
        per_module = factors.manifest.get("damping_per_module", {})
        dampings[strategy] = (
            float(np.mean(list(per_module.values()))) if per_module else float(damping or 0.0)
        )
    ref = list(strategies)[-1]
    change = {k: v / n for k, v in scores.items()}
    idx, kinds = select_examples(change[ref], examples, seed)

    # ---- ground truth
    gt = GroundTruth(
        fit_model,
        task,
        train_batch,
        query_batch,
        trainer,
        damping=dampings[ref],
        pbrf_method="sgd",
        pbrf_options={"epochs": pbrf_epochs, "lr": pbrf_lr, "batch_size": batch_size, "seed": seed},
        cache_dir=cache / "validate",
        store_params=0,
        progress=progress,
    )
    truths = {
        "loo_cold": gt.leave_one_out(idx, "cold"),
        "loo_warm": gt.leave_one_out(idx, "warm"),
        "pbrf": gt.pbrf(idx),
    }
    lds_values: dict[str, float] = {}
    if subsets > 0:
        masks = random_subsets(n, subsets, subset_fraction, seed)
        actual = gt.remove_groups(masks, "cold")
        for name, sc in scores.items():
            lds_values[name], _ = lds(sc, masks, actual)

    estimates = {}
    for name in scores:
        est = change[name][:, idx].T
        row = {
            "vs": {g: correlations(est, a) for g, a in truths.items()},
            "damping (mean over modules)": dampings[name],
        }
        if name in lds_values:
            row["lds"] = lds_values[name]
        estimates[name] = row
    cold, warm, pbrf = truths["loo_cold"], truths["loo_warm"], truths["pbrf"]
    est_ref = change[ref][:, idx].T
    grad_norm = float(full_gradient(space, theta_s, slice_batch(train_batch, slice(0, min(n, 256)))).norm())
    gap = {
        "warm vs cold start": {
            "relative error of warm vs cold": relative_error(warm, cold),
            "Pearson(warm, cold)": correlations(warm, cold)["pearson"],
        },
        "convergence": {
            "gradient norm of the training loss at theta_s (first 256 examples)": grad_norm,
            "cold replay on all data: distance to theta_s": gt.infos.get("baseline-cold", {}).get(
                "distance_to_theta_s"
            ),
            "warm retrain on all data: distance to theta_s": gt.infos.get("baseline-warm", {}).get(
                "distance_to_theta_s"
            ),
        },
        "linearisation": {
            f"relative error of {ref} vs PBRF": relative_error(est_ref, pbrf),
            f"Pearson({ref}, PBRF)": correlations(est_ref, pbrf)["pearson"],
            f"Pearson({ref}, cold LOO)": correlations(est_ref, cold)["pearson"],
        },
        "curvature approximation": {
            f"Pearson({name}, {ref}) over all training examples": correlations(scores[name].T, scores[ref].T)[
                "pearson"
            ]
            for name in scores
            if name != ref
        },
    }
    result = {
        "model": "finetuned",
        "settings": {
            "encoder": encoder,
            "fine_tune_last": fine_tune_last,
            "trainable_parameters": trainable,
            "n_train": n,
            "queries": queries,
            "examples": len(idx),
            "subsets": subsets,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "frozen_prefix": "cached hidden states at the first trainable layer (prefix in eval mode)"
            if frozen_prefix
            else "off (full model every step)",
            "first_token": "training/retraining/PBRF run the last layer at the first token only"
            if first_token
            else False,
            "seed": seed,
            "damping": damping,
            "pbrf": f"SGD, {pbrf_epochs} epochs, proximity = mean {ref} damping {dampings[ref]:.3g}",
            "cold start": "AdamW replay from the same initial weights and seed",
            "warm start": "AdamW from the trained weights, same schedule",
            "LDS retraining": "cold start",
            "query accuracy": acc,
            f"held-out accuracy ({len(heldout_rows)} test reviews)": heldout_acc,
            "theta digest": tensor_digest(theta_s),
        },
        "estimates": estimates,
        "ground_truth": {g: a.tolist() for g, a in truths.items()},
        "examples": {"indices": idx, "kinds": kinds, "train_rows": train_rows[idx].tolist()},
        "estimated_change": {k: v[:, idx].T.tolist() for k, v in change.items()},
        "gap": gap,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        out = Path(out)
        result["plots"] = _plots(out, est_ref, truths, kinds, f"fine-tuned: {ref}")
        _write(result, out)
    return result
