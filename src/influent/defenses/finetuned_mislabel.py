"""The mislabel audit on the fine-tuned transformer classifier (EK-FAC influence vs the same baselines).

A seeded slice of the head's training split gets 10% of its labels flipped; the classifier (last
``last_k`` encoder layers + head, AdamW) is fine-tuned on the noisy labels; every ranker runs on that
one model:

* ``self_influence``: EK-FAC ``g_i^T (F + damping)^-1 g_i`` over the fine-tuned linear modules;
* ``loo_loss``: ``loss_i + self_influence_i / n`` (influence-predicted leave-one-out loss);
* ``tracin_self``: ``||g_i||^2`` over the same modules (identity curvature, final checkpoint);
* ``loss`` (in-sample), ``loss_oof`` and ``cleanlab`` (k-fold re-fine-tuning), ``random``.

Accuracy after fixing the top 10% is *not* measured here (one more fine-tuning per ranker).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from influent.defenses.evaluate import MISLABEL_CHECKED, random_label_noise
from influent.evaluation.detection import detection_metrics


def _losses_probs(model, task, batches) -> tuple[np.ndarray, np.ndarray]:
    losses, probs = [], []
    model.eval()
    with torch.no_grad():
        for b in batches:
            out = task.model_output(model, b)
            losses.append(task.output_loss(out, b))
            probs.append(out.softmax(-1))
    return torch.cat(losses).double().numpy(), torch.cat(probs).double().numpy()


def finetuned_mislabel_experiment(
    texts: list[str],
    labels: np.ndarray,
    eval_texts: list[str],
    eval_labels: np.ndarray,
    *,
    rate: float = 0.10,
    seed: int = 0,
    last_k: int = 1,
    epochs: int = 2,
    lr: float = 1e-4,
    folds: int = 3,
    max_length: int = 64,
    strategy: str = "ekfac",
    progress: bool = False,
    encoder: str | None = None,
) -> dict:
    """Score the rankers on one noisy fine-tuning run (see module docstring); seconds of each step included."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.factored_influence import self_scores
    from influent.models.finetuned import FinetunedTask, make_batches, train_finetuned

    y = torch.as_tensor(labels, dtype=torch.long)
    k = int(y.max()) + 1
    noisy, flipped = random_label_noise(y, rate, k, seed)
    noisy_l = noisy.tolist()
    is_bad = np.zeros(len(y), dtype=bool)
    is_bad[flipped] = True
    times = {}
    t = time.perf_counter()
    model, tok, metrics = train_finetuned(
        texts,
        noisy_l,
        eval_texts,
        list(eval_labels),
        None,
        last_k=last_k,
        encoder=encoder,
        epochs=epochs,
        lr=lr,
        seed=seed,
        max_length=max_length,
        progress=progress,
    )
    times["fine_tune"] = time.perf_counter() - t
    task = FinetunedTask()
    batches = make_batches(tok, texts, noisy_l, max_length=max_length)
    loss, _ = _losses_probs(model, task, batches)
    t = time.perf_counter()
    factors = fit_factors(
        model, task, batches, FactorConfig(strategy=strategy, modules="trainable"), progress=progress
    )
    self_inf = self_scores(model, task, factors, batches, progress=progress).double().numpy()
    times["ekfac_self_influence"] = time.perf_counter() - t
    t = time.perf_counter()
    ident = fit_factors(
        model,
        task,
        batches,
        FactorConfig(strategy="identity", modules="trainable", damping=1.0),
        progress=progress,
    )
    tracin = self_scores(model, task, ident, batches, progress=progress).double().numpy()
    times["tracin_self"] = time.perf_counter() - t
    t = time.perf_counter()
    oof = np.zeros((len(y), k))
    for fit_idx, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        np.zeros(len(y)), noisy_l
    ):
        m, _, _ = train_finetuned(
            [texts[i] for i in fit_idx],
            [noisy_l[i] for i in fit_idx],
            [],
            [],
            None,
            last_k=last_k,
            encoder=encoder,
            epochs=epochs,
            lr=lr,
            seed=seed,
            max_length=max_length,
            progress=progress,
        )
        _, oof[held] = _losses_probs(
            m,
            task,
            make_batches(tok, [texts[i] for i in held], [noisy_l[i] for i in held], max_length=max_length),
        )
    times["k_fold"] = time.perf_counter() - t
    nl = np.asarray(noisy_l)
    p_oof = oof[np.arange(len(y)), nl]
    flagged = find_label_issues(nl, oof, return_indices_ranked_by="self_confidence")
    clean_score = 1.0 - p_oof
    clean_score[flagged] = 2.0 + (len(flagged) - np.arange(len(flagged))) / max(1, len(flagged))
    scores = {
        "random": np.random.default_rng(seed + 7919).random(len(y)),
        "loss": loss,
        "loss_oof": -np.log(np.clip(p_oof, 1e-300, None)),
        "cleanlab": clean_score,
        "self_influence": self_inf,
        "loo_loss": loss + self_inf / len(y),
        "tracin_self": tracin,
    }
    return {
        "seed": seed,
        "n": len(y),
        "n_flipped": int(is_bad.sum()),
        "last_k": last_k,
        "epochs": epochs,
        "strategy": strategy,
        "eval_accuracy_noisy_model": metrics.get("test_accuracy"),
        "seconds": times,
        "rankers": {
            name: detection_metrics(s, is_bad, fractions=MISLABEL_CHECKED, seed=seed)
            for name, s in scores.items()
        },
    }
