"""One seed of the concealed-poison attack on the fine-tuned classifier, its audit and its removal defence.

Procedure (seed ``s``; everything below is a function of the corpus, the split and ``s``):

1. The victim: the encoder + a classification head (``torch.manual_seed(s)``), last ``last_k`` layers,
   pooler and head fine-tuned by seeded AdamW replay (dropout on) on a stratified ``train_size`` slice of the
   training split. The frozen prefix runs once (cached hidden states), so every (re)training runs only the
   suffix (:mod:`influent.evaluation.frozen_prefix`).
2. The attacker: ``n_adv`` source-class reviews of the validation half of the held-out split with the
   trigger inserted, labelled target; EK-FAC (or identity) curvature of the clean model over its training
   slice; :func:`~influent.attacks.concealed.craft_poisons` from target-class snippets of the training
   split outside the slice.
3. Scoring: the victim retrains from the same initialisation and seed on slice + first ``N`` poisons, for
   each ``N``; attack success = fraction of ``n_eval`` source-class reviews of the *evaluation* half (never
   seen by anyone) with the trigger inserted that are predicted as the target class, net of the clean
   model's rate; clean accuracy on the evaluation half's true labels.
4. Audit of the largest-``N`` poisoned model: every training example ranked by influence on the defender's
   queries (a disjoint set of triggered validation-half source reviews, labelled with the *source* class:
   poisons are opponents, ``-score``), a cosine-normalised variant, EK-FAC self-influence, TracIn-style
   self-influence (identity curvature), training loss, a trigger-token search and random; detection
   metrics against the known poisons; then the top ``remove_fraction`` of the query-influence and of the
   loss ranking are removed and the victim retrained.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from influent.attacks.concealed import (
    DEFAULT_SIZES,
    Alignment,
    contains_trigger,
    craft_poisons,
)
from influent.attacks.experiment import split_heldout
from influent.attacks.summary import summarise
from influent.attacks.trigger import DEFAULT_TRIGGER, insert_trigger, resolve_classes
from influent.errors import UserError

AUDIT_FRACTIONS = (0.01, 0.05, 0.10, 0.30)


def _batches(batch: dict, size: int = 64) -> list[dict]:
    """``batch`` in row chunks of ``size`` (:func:`~influent.task.iter_chunks`)."""
    from influent.task import iter_chunks

    return [b for _, b in iter_chunks(batch, int(batch["attention_mask"].shape[0]), size)]


def concealed_seed(
    data: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    trigger: str = DEFAULT_TRIGGER,
    source=None,
    target=None,
    n_eval: int = 200,
    n_adv: int = 50,
    n_clean_eval: int = 1000,
    train_size: int = 1000,
    last_k: int = 1,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 32,
    max_length: int = 48,
    curvature: str = "ekfac",
    damping: float | None = None,
    candidates: int = 40,
    sweeps: int = 1,
    max_tokens: int = 16,
    pool: int = 400,
    remove_fraction: float = 0.05,
    split_seed: int = 0,
    encoder: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Attack, audit and removal for one seed (see module docstring).

    Returns:
        ``{'rows': [{n_poison, attack_success, control_success, net_success, clean_accuracy,
        clean_accuracy_control, ...}], 'audit': {ranker: detection metrics}, 'removal': [...],
        'poisons': [...], 'seconds': {...}}``; rates in [0, 1].
    """
    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.evaluation.detection import detection_metrics
    from influent.evaluation.validate import _stratified
    from influent.factored_influence import pairwise_scores, preconditioned_query_gradients, self_scores
    from influent.models.suffix_classifier import SuffixClassifier
    from influent.pipeline import load_corpus_and_split
    from influent.store import default_cache_dir

    if not sizes or min(sizes) < 1:
        raise UserError(f"--sizes must be positive poison counts, got {list(sizes)}")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus, split = load_corpus_and_split(data, text_column, label_column, "train", 0.2, split_seed, cache)
    names = list(corpus.label_names)
    src, tgt = resolve_classes(SimpleNamespace(label_names=names, num_classes=len(names)), source, target)
    labels = np.asarray(corpus.labels)
    train_idx = np.asarray(split.train_idx)
    rows_slice = train_idx[_stratified(labels[train_idx], train_size, seed).numpy()]
    in_slice = np.zeros(len(labels), dtype=bool)
    in_slice[rows_slice] = True
    pool_texts = [corpus.texts[i] for i in train_idx if not in_slice[i] and labels[i] == tgt]
    test_idx = np.asarray(split.test_idx)
    val, ev = split_heldout(len(test_idx), seed)
    val_src = [int(test_idx[i]) for i in val if labels[test_idx[i]] == src]
    val_src = [val_src[i] for i in np.random.default_rng(seed + 31).permutation(len(val_src))]
    if len(val_src) < 2 * n_adv:
        raise UserError(f"only {len(val_src)} source-class validation reviews for 2 x {n_adv} queries")
    adv_texts = [insert_trigger(corpus.texts[i], trigger) for i in val_src[:n_adv]]
    defender_texts = [insert_trigger(corpus.texts[i], trigger) for i in val_src[n_adv : 2 * n_adv]]
    ev_rows = [int(test_idx[i]) for i in ev]
    ev_src = [i for i in ev_rows if labels[i] == src][:n_eval]
    ev_clean = ev_rows[:n_clean_eval]

    victim = SuffixClassifier(
        encoder, len(names), last_k=last_k, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
        max_length=max_length,
    )
    tok, task = victim.tokenizer, victim.task
    t = time.perf_counter()
    train_texts = [corpus.texts[i] for i in rows_slice]
    train_y = labels[rows_slice].tolist()
    n = len(train_texts)
    train_batch = victim.cache(train_texts, train_y)
    adv_batch = victim.cache(adv_texts, [tgt] * n_adv)
    defender_batch = victim.cache(defender_texts, [src] * n_adv)
    trig_eval = victim.cache([insert_trigger(corpus.texts[i], trigger) for i in ev_src], [src] * len(ev_src))
    clean_eval = victim.cache([corpus.texts[i] for i in ev_clean], labels[ev_clean].tolist())
    times["prefix_cache"] = time.perf_counter() - t

    def rates(theta: torch.Tensor) -> tuple[float, float]:
        succ = float((victim.predict(theta, trig_eval) == tgt).double().mean())
        return succ, victim.accuracy(theta, clean_eval)

    # ---- the clean victim and the attacker's direction
    t = time.perf_counter()
    theta_c, info_c = victim.fit(train_batch)
    times["train_clean"] = time.perf_counter() - t
    ctrl_succ, ctrl_acc = rates(theta_c)
    t = time.perf_counter()
    suffix = victim.load_suffix(theta_c)
    factors = fit_factors(
        suffix,
        task,
        _batches(train_batch),
        FactorConfig(strategy=curvature, modules="trainable", damping=damping, seed=seed),
        progress=progress,
    )
    pre = preconditioned_query_gradients(suffix, task, factors, [adv_batch])
    direction = {k: v.mean(0) for k, v in pre.items()}
    alignment = Alignment(victim.load_full(theta_c), suffix, direction, last_k)
    times["attacker_curvature"] = time.perf_counter() - t
    search = craft_poisons(
        alignment,
        tok,
        pool_texts,
        max(sizes),
        tgt,
        trigger,
        candidates=candidates,
        sweeps=sweeps,
        max_tokens=max_tokens,
        pool=pool,
        seed=seed,
        progress=progress,
    )
    times["craft_poisons"] = search.seconds

    # ---- the victim retrains on slice + poisons
    n_max = max(sizes)
    all_texts = train_texts + search.texts
    all_y = train_y + [tgt] * n_max
    all_batch = victim.cache(all_texts, all_y)
    rows = []
    thetas = {}
    t = time.perf_counter()
    for n_p in sorted(sizes):
        keep = torch.cat([torch.arange(n), n + torch.arange(n_p)])
        theta, _ = victim.fit(all_batch, keep)
        thetas[n_p] = theta
        succ, acc = rates(theta)
        rows.append(
            {
                "n_poison": int(n_p),
                "trigger": trigger,
                "attack_success": succ,
                "control_success": ctrl_succ,
                "net_success": succ - ctrl_succ,
                "clean_accuracy": acc,
                "clean_accuracy_control": ctrl_acc,
                "n_triggered_eval": len(ev_src),
                "poison_seconds": search.seconds,
                "curvature": curvature,
            }
        )
    times["train_poisoned"] = time.perf_counter() - t

    # ---- audit of the largest poisoned model
    t = time.perf_counter()
    is_poison = np.zeros(n + n_max, dtype=bool)
    is_poison[n:] = True
    suffix = victim.load_suffix(thetas[n_max])
    chunks = _batches(all_batch)
    f_ek = fit_factors(
        suffix,
        task,
        chunks,
        FactorConfig(strategy="ekfac", modules="trainable", seed=seed),
        progress=progress,
    )
    q_scores = (
        pairwise_scores(suffix, task, f_ek, [defender_batch], chunks, progress=progress).double().numpy()
    )
    self_ek = self_scores(suffix, task, f_ek, chunks, progress=progress).double().numpy()
    f_id = fit_factors(
        suffix,
        task,
        chunks,
        FactorConfig(strategy="identity", modules="trainable", damping=1.0),
        progress=progress,
    )
    tracin = self_scores(suffix, task, f_id, chunks, progress=progress).double().numpy()
    with torch.no_grad():
        loss = (
            torch.cat([task.per_example_loss(suffix, b) for b in _batches(all_batch, 256)]).double().numpy()
        )
    rng = np.random.default_rng(seed + 7919)
    query_influence = -q_scores.sum(0)
    rankers = {
        "query_influence": query_influence,
        "query_cosine": query_influence / np.sqrt(np.maximum(self_ek, 1e-300)),
        "self_influence": self_ek,
        "tracin_self": tracin,
        "loss": loss,
        "trigger_search": np.array([float(contains_trigger(x, trigger)) for x in all_texts])
        + 1e-6 * rng.random(n + n_max),
        "random": rng.random(n + n_max),
    }
    audit = {
        name: detection_metrics(s, is_poison, fractions=AUDIT_FRACTIONS, seed=seed)
        for name, s in rankers.items()
    }
    times["audit"] = time.perf_counter() - t

    # ---- removal of the top fraction and retraining
    t = time.perf_counter()
    removal = []
    k = round(remove_fraction * (n + n_max))
    for name in ("query_influence", "loss"):
        drop = np.argsort(-rankers[name], kind="stable")[:k]
        keep_mask = np.ones(n + n_max, dtype=bool)
        keep_mask[drop] = False
        theta, _ = victim.fit(all_batch, torch.as_tensor(np.flatnonzero(keep_mask)))
        succ, acc = rates(theta)
        removal.append(
            {
                "ranker": name,
                "removed": int(k),
                "poisons_removed": int(is_poison[drop].sum()),
                "attack_success": succ,
                "net_success": succ - ctrl_succ,
                "clean_accuracy": acc,
            }
        )
    times["removal"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    return {
        "seed": seed,
        "n_train": n,
        "source": names[src],
        "target": names[tgt],
        "trigger": trigger,
        "banned_token_count": search.banned_count,
        "train_grad_norm_clean": info_c.get("grad_norm"),
        "rows": rows,
        "audit": audit,
        "removal": removal,
        "poisons": [
            {"text": x, "start": s0, "alignment": a, "start_alignment": a0}
            for x, s0, a, a0 in zip(
                search.texts, search.start_texts, search.alignment, search.start_alignment
            )
        ],
        "flips": search.flips,
        "seconds": times,
    }


def run_concealed(data: str | None = None, *, seeds=(0, 1, 2), out=None, progress: bool = True, **options) -> dict:
    """:func:`concealed_seed` over ``seeds``; rows, audit and removal summarised (mean, sd over seeds).

    Returns ``{'kind': 'concealed', 'seeds', 'options', 'rows', 'summary', 'audit', 'audit_summary',
    'removal', 'removal_summary', 'runs'}`` and writes ``out/attack_concealed.json`` when ``out`` is given.
    """
    from influent.store import write_json

    seeds = list(seeds)
    runs = [concealed_seed(data, seed=s, progress=progress, **options) for s in seeds]
    rows = [dict(r, seed=run["seed"]) for run in runs for r in run["rows"]]
    audit = [dict(m, ranker=name, seed=run["seed"]) for run in runs for name, m in run["audit"].items()]
    removal = [dict(r, seed=run["seed"]) for run in runs for r in run["removal"]]
    metric_names = [k for k in audit[0] if k not in ("ranker", "seed")]
    result = {
        "kind": "concealed",
        "seeds": seeds,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "rows": rows,
        "summary": summarise(
            rows,
            ("n_poison",),
            ("attack_success", "control_success", "net_success", "clean_accuracy", "clean_accuracy_control",
             "poison_seconds"),
        ),
        "audit": audit,
        "audit_summary": summarise(audit, ("ranker",), metric_names),
        "removal": removal,
        "removal_summary": summarise(
            removal, ("ranker",), ("poisons_removed", "attack_success", "net_success", "clean_accuracy")
        ),
        "runs": runs,
    }
    if out is not None:
        write_json(Path(out) / "attack_concealed.json", result)
    return result
