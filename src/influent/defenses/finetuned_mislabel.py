"""The mislabel audit on the fine-tuned transformer classifier (EK-FAC influence vs the same baselines).

A seeded slice of the head's training split gets 10% of its labels flipped; the classifier (last
``last_k`` encoder layers + pooler + head, seeded AdamW replay on cached prefix hidden states:
:class:`~influent.models.suffix_classifier.SuffixClassifier`) is fine-tuned on the noisy labels; every
ranker runs on that one model:

* ``self_influence``: EK-FAC ``g_i^T (F + damping)^-1 g_i`` over the fine-tuned linear modules;
* ``loo_loss``: ``loss_i + self_influence_i / n`` (influence-predicted leave-one-out loss);
* ``tracin_self``: ``||g_i||^2`` over the same modules (identity curvature, final checkpoint);
* ``loss`` (in-sample), ``loss_oof`` and ``cleanlab`` (k-fold re-fine-tuning), ``random``.

Then, per ranker, the flipped labels among its top ``fix_fraction`` are restored (an oracle reviewer checks
the flagged examples) and the classifier is fine-tuned again from the same initialisation and seed; its
accuracy on the evaluation reviews (true labels) is ``accuracy_after_fix``. ``accuracy_clean_model`` (no
noise) and ``accuracy_noisy_model`` bracket it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from influent.defenses.evaluate import MISLABEL_CHECKED, random_label_noise
from influent.evaluation.detection import detection_metrics, ranking


def finetuned_mislabel_experiment(
    texts: list[str],
    labels: np.ndarray,
    eval_texts: list[str],
    eval_labels: np.ndarray,
    *,
    rate: float = 0.10,
    seed: int = 0,
    last_k: int = 1,
    epochs: int = 3,
    lr: float = 1e-4,
    folds: int = 3,
    max_length: int = 64,
    strategy: str = "ekfac",
    fix_fraction: float = 0.10,
    progress: bool = False,
    encoder: str | None = None,
) -> dict:
    """Score the rankers on one noisy fine-tuning run and fix-and-retrain per ranker (module docstring).

    Returns:
        ``{'seed', 'n', 'n_flipped', 'accuracy_clean_model', 'accuracy_noisy_model', 'seconds',
        'rankers': {name: {auroc, auprc, recall@5%..30%, accuracy_after_fix}}}`` (accuracies in [0, 1]).
    """
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.factored_influence import self_scores
    from influent.models.suffix_classifier import SuffixClassifier
    from influent.task import iter_chunks, slice_batch

    y = torch.as_tensor(labels, dtype=torch.long)
    k = int(y.max()) + 1
    noisy, flipped = random_label_noise(y, rate, k, seed)
    is_bad = np.zeros(len(y), dtype=bool)
    is_bad[flipped] = True
    n = len(y)
    times: dict[str, float] = {}
    clf = SuffixClassifier(
        encoder, k, last_k=last_k, seed=seed, epochs=epochs, lr=lr, max_length=max_length
    )
    t = time.perf_counter()
    batch = clf.cache(texts, noisy.tolist())  # the training set as the victim sees it (noisy labels)
    eval_batch = clf.cache(eval_texts, list(eval_labels))
    times["prefix_cache"] = time.perf_counter() - t

    def with_labels(lab: torch.Tensor) -> dict:
        return dict(batch, labels=lab)

    t = time.perf_counter()
    theta_noisy, _ = clf.fit(batch)
    times["fine_tune"] = time.perf_counter() - t
    acc_noisy = clf.accuracy(theta_noisy, eval_batch)
    acc_clean = clf.accuracy(clf.fit(with_labels(y))[0], eval_batch)

    model, task = clf.load_suffix(theta_noisy), clf.task
    chunks = [c for _, c in iter_chunks(batch, n, 64)]
    with torch.no_grad():
        loss = torch.cat([task.per_example_loss(model, c) for c in chunks]).double().numpy()
    t = time.perf_counter()
    factors = fit_factors(model, task, chunks, FactorConfig(strategy=strategy, modules="trainable"), progress=progress)
    self_inf = self_scores(model, task, factors, chunks, progress=progress).double().numpy()
    times["ekfac_self_influence"] = time.perf_counter() - t
    t = time.perf_counter()
    ident = fit_factors(
        model, task, chunks, FactorConfig(strategy="identity", modules="trainable", damping=1.0), progress=progress
    )
    tracin = self_scores(model, task, ident, chunks, progress=progress).double().numpy()
    times["tracin_self"] = time.perf_counter() - t

    t = time.perf_counter()
    nl = noisy.numpy()
    oof = np.zeros((n, k))
    for fit_idx, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), nl):
        theta, _ = clf.fit(batch, torch.as_tensor(fit_idx))
        oof[held] = clf.logits(theta, slice_batch(batch, torch.as_tensor(held))).softmax(-1).double().numpy()
    times["k_fold"] = time.perf_counter() - t
    p_oof = oof[np.arange(n), nl]
    flagged = find_label_issues(nl, oof, return_indices_ranked_by="self_confidence")
    clean_score = 1.0 - p_oof
    clean_score[flagged] = 2.0 + (len(flagged) - np.arange(len(flagged))) / max(1, len(flagged))
    scores = {
        "random": np.random.default_rng(seed + 7919).random(n),
        "loss": loss,
        "loss_oof": -np.log(np.clip(p_oof, 1e-300, None)),
        "cleanlab": clean_score,
        "self_influence": self_inf,
        "loo_loss": loss + self_inf / n,
        "tracin_self": tracin,
    }
    t = time.perf_counter()
    rankers = {}
    k_fix = round(fix_fraction * n)
    for name, s in scores.items():
        row = detection_metrics(s, is_bad, fractions=MISLABEL_CHECKED, seed=seed)
        top = ranking(s, seed)[:k_fix]
        fixed = noisy.clone()
        fix = torch.as_tensor(top[is_bad[top]], dtype=torch.long)
        fixed[fix] = y[fix]
        row["accuracy_after_fix"] = clf.accuracy(clf.fit(with_labels(fixed))[0], eval_batch)
        row["fixed"] = len(fix)
        rankers[name] = row
    times["fix_and_retrain"] = time.perf_counter() - t
    return {
        "seed": seed,
        "n": n,
        "n_flipped": int(is_bad.sum()),
        "last_k": last_k,
        "epochs": epochs,
        "strategy": strategy,
        "accuracy_clean_model": acc_clean,
        "accuracy_noisy_model": acc_noisy,
        "eval_accuracy_noisy_model": acc_noisy,
        "seconds": times,
        "rankers": rankers,
    }
