"""The mislabel audit on the fine-tuned transformer classifier (EK-FAC influence vs the same baselines).

A seeded slice of the head's training split gets 10% of its labels flipped; the classifier (last
``last_k`` encoder layers + pooler + head, seeded AdamW replay on cached prefix hidden states:
:class:`~influent.models.suffix_classifier.SuffixClassifier`) is fine-tuned on the noisy labels; every
ranker (the same ones as the head's, :mod:`influent.defenses.rankers`) runs on that one model:

* ``self_influence``: EK-FAC ``g_i^T (F + damping)^-1 g_i`` over the fine-tuned linear modules;
* ``loo_loss``: ``loss_i + self_influence_i / n`` (influence-predicted leave-one-out loss);
* ``tracin_self``: ``||g_i||^2 / 2`` over the same modules (identity curvature + damping 1, final checkpoint);
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
from influent.defenses.inputs import SuffixBaselines, factored_audit_inputs
from influent.defenses.rankers import AuditInputs, score_all
from influent.evaluation.detection import detection_metrics, ranking

RANKERS = ("random", "loss", "loss_oof", "cleanlab", "self_influence", "loo_loss", "tracin_self")
STAGES = {"self_influence": "ekfac_self_influence", "tracin_self": "tracin_self", "loss_oof": "k_fold"}
"""The rankers run on the fine-tuned classifier, and the ``seconds`` entries their first call is timed as."""


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
    from influent.curvature.config import FactorConfig
    from influent.models.suffix_classifier import SuffixClassifier
    from influent.task import iter_chunks

    y = torch.as_tensor(labels, dtype=torch.long)
    k = int(y.max()) + 1
    noisy, flipped = random_label_noise(y, rate, k, seed)
    is_bad = np.zeros(len(y), dtype=bool)
    is_bad[flipped] = True
    n = len(y)
    times: dict[str, float] = {}
    clf = SuffixClassifier(encoder, k, last_k=last_k, seed=seed, epochs=epochs, lr=lr, max_length=max_length)
    t = time.perf_counter()
    batch = clf.cache(texts, noisy.tolist())  # the training set as the victim sees it (noisy labels)
    eval_batch = clf.cache(eval_texts, list(eval_labels))
    times["prefix_cache"] = time.perf_counter() - t

    t = time.perf_counter()
    theta_noisy, _ = clf.fit(batch)
    times["fine_tune"] = time.perf_counter() - t
    acc_noisy = clf.accuracy(theta_noisy, eval_batch)
    acc_clean = clf.accuracy(clf.fit(dict(batch, labels=y))[0], eval_batch)

    chunks = [c for _, c in iter_chunks(batch, n, 64)]
    inputs = factored_audit_inputs(
        clf.load_suffix(theta_noisy), clf.task, chunks, SuffixBaselines(clf, batch, k, folds, seed),
        config=FactorConfig(strategy=strategy, modules="trainable"), seed=seed, progress=progress,
    )
    scores = timed_scores(inputs, list(RANKERS), times)
    t = time.perf_counter()
    rankers = {}
    for name, s in scores.items():
        row = detection_metrics(s, is_bad, fractions=MISLABEL_CHECKED, seed=seed)
        row["accuracy_after_fix"], row["fixed"] = fix_and_refit(clf, batch, eval_batch, s, y, is_bad, fix_fraction,
                                                                seed)
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


def timed_scores(inputs: AuditInputs, names: list[str], times: dict[str, float]) -> dict[str, np.ndarray]:
    """:func:`~influent.defenses.rankers.score_all` ranker by ranker; the first call of each ranker in
    :data:`STAGES` (which does the stage's work: curvature fit, k-fold) is timed into ``times``."""
    scores = {}
    for name in names:
        t = time.perf_counter()
        scores.update(score_all(inputs, [name]))
        if name in STAGES:
            times[STAGES[name]] = time.perf_counter() - t
    return scores


def fix_and_refit(
    clf, batch: dict, eval_batch: dict, scores: np.ndarray, clean: torch.Tensor, is_bad: np.ndarray,
    fix_fraction: float, seed: int,
) -> tuple[float, int]:
    """Restore the true labels of the flipped examples among the top ``fix_fraction`` of ``scores`` (an
    oracle reviewer), re-fine-tune from the same initialisation and seed; returns (eval accuracy, fixed)."""
    top = ranking(scores, seed)[: round(fix_fraction * len(clean))]
    fixed = batch["labels"].clone()
    fix = torch.as_tensor(top[is_bad[top]], dtype=torch.long)
    fixed[fix] = clean[fix]
    return clf.accuracy(clf.fit(dict(batch, labels=fixed))[0], eval_batch), len(fix)
