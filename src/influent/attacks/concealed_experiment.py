"""One seed of the concealed-poison attack on the fine-tuned classifier, its audit and its removal defence.

Procedure (seed ``s``; everything below is a function of the corpus, the split and ``s``):

1. The victim: the encoder + a classification head (``torch.manual_seed(s)``), last ``last_k`` layers,
   pooler and head fine-tuned by seeded AdamW replay (dropout on) on a stratified ``train_size`` slice of the
   training split. The frozen prefix runs once (cached hidden states), so every (re)training runs only the
   suffix (:mod:`influent.models.frozen_prefix`).
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from influent.attacks.concealed import (
    DEFAULT_SIZES,
    Alignment,
    PoisonSearch,
    contains_trigger,
    craft_poisons,
)
from influent.attacks.experiment import split_heldout
from influent.attacks.summary import summarise
from influent.attacks.trigger import DEFAULT_TRIGGER, class_indices
from influent.curvature.config import FactorConfig
from influent.data.split import stratified_sample
from influent.data.text_edits import insert_trigger
from influent.defenses.inputs import factored_audit_inputs
from influent.defenses.rankers import score_all
from influent.errors import UserError
from influent.evaluation.detection import detection_metrics
from influent.factored_influence import FactoredInfluence
from influent.models.suffix_classifier import SuffixClassifier
from influent.store import write_json
from influent.task import iter_chunks

AUDIT_FRACTIONS = (0.01, 0.05, 0.10, 0.30)
REMOVAL_RANKERS = ("query_influence", "loss")
SHARED_RANKERS = {
    "query_influence": "query_influence",
    "query_cosine": "relatif",
    "self_influence": "self_influence",
    "tracin_self": "tracin_self",
    "loss": "loss",
}
"""The audit's names for the defences' rankers it reports (``query_cosine`` is the defences' ``relatif``)."""


def _batches(batch: dict, size: int = 64) -> list[dict]:
    """``batch`` in row chunks of ``size`` (:func:`~influent.task.iter_chunks`)."""
    return [b for _, b in iter_chunks(batch, int(batch["attention_mask"].shape[0]), size)]


# ------------------------------------------------------------------------------- step 0: the data
@dataclass
class SeedTexts:
    """The texts of one seed (step 1-3 of the module docstring), all drawn from the corpus and its split.

    Attributes:
        names: class names; ``source`` / ``target``: class indices.
        train_texts, train_labels: the victim's stratified training slice.
        pool_texts: target-class training-split snippets outside the slice (where poisons start).
        adv_texts: the attacker's ``n_adv`` triggered validation-half source reviews.
        defender_texts: the defender's ``n_adv`` triggered validation-half source reviews (disjoint).
        triggered_eval_texts: up to ``n_eval`` triggered evaluation-half source reviews (attack success).
        clean_eval_texts, clean_eval_labels: up to ``n_clean_eval`` evaluation-half reviews (clean accuracy).
    """

    names: list[str]
    source: int
    target: int
    train_texts: list[str]
    train_labels: list[int]
    pool_texts: list[str]
    adv_texts: list[str]
    defender_texts: list[str]
    triggered_eval_texts: list[str]
    clean_eval_texts: list[str]
    clean_eval_labels: list[int]


def select_texts(
    corpus, split, *, seed: int, train_size: int, trigger: str, source, target, n_adv: int, n_eval: int,
    n_clean_eval: int,
) -> SeedTexts:
    """Seed ``seed``'s training slice, poison pool, attacker / defender queries and evaluation reviews."""
    names = list(corpus.label_names)
    src, tgt = class_indices(names, source, target)
    labels = np.asarray(corpus.labels)
    train_idx = np.asarray(split.train_idx)
    rows_slice = train_idx[stratified_sample(labels[train_idx], train_size, seed)]
    in_slice = np.zeros(len(labels), dtype=bool)
    in_slice[rows_slice] = True
    pool_texts = [corpus.texts[i] for i in train_idx if not in_slice[i] and labels[i] == tgt]
    test_idx = np.asarray(split.test_idx)
    val, ev = split_heldout(len(test_idx), seed)
    val_src = [int(test_idx[i]) for i in val if labels[test_idx[i]] == src]
    val_src = [val_src[i] for i in np.random.default_rng(seed + 31).permutation(len(val_src))]
    if len(val_src) < 2 * n_adv:
        raise UserError(
            f"only {len(val_src)} source-class validation reviews for 2 x {n_adv} queries", field="n_adv"
        )
    ev_rows = [int(test_idx[i]) for i in ev]
    ev_src = [i for i in ev_rows if labels[i] == src][:n_eval]
    ev_clean = ev_rows[:n_clean_eval]
    return SeedTexts(
        names=names,
        source=src,
        target=tgt,
        train_texts=[corpus.texts[i] for i in rows_slice],
        train_labels=labels[rows_slice].tolist(),
        pool_texts=pool_texts,
        adv_texts=[insert_trigger(corpus.texts[i], trigger) for i in val_src[:n_adv]],
        defender_texts=[insert_trigger(corpus.texts[i], trigger) for i in val_src[n_adv : 2 * n_adv]],
        triggered_eval_texts=[insert_trigger(corpus.texts[i], trigger) for i in ev_src],
        clean_eval_texts=[corpus.texts[i] for i in ev_clean],
        clean_eval_labels=labels[ev_clean].tolist(),
    )


@dataclass
class VictimBatches:
    """Prefix-cached batches of a :class:`SeedTexts` for the victim (labels as the threat model says)."""

    train: dict
    adv: dict
    defender: dict
    triggered_eval: dict
    clean_eval: dict


def cache_batches(victim, texts: SeedTexts) -> VictimBatches:
    """Run the frozen prefix once over every text set (attacker queries labelled target, defender source)."""
    n_adv = len(texts.adv_texts)
    return VictimBatches(
        train=victim.cache(texts.train_texts, texts.train_labels),
        adv=victim.cache(texts.adv_texts, [texts.target] * n_adv),
        defender=victim.cache(texts.defender_texts, [texts.source] * len(texts.defender_texts)),
        triggered_eval=victim.cache(
            texts.triggered_eval_texts, [texts.source] * len(texts.triggered_eval_texts)
        ),
        clean_eval=victim.cache(texts.clean_eval_texts, texts.clean_eval_labels),
    )


# ------------------------------------------------------------------------------ scoring a model
def attack_rates(victim, theta: torch.Tensor, batches: VictimBatches, target: int) -> tuple[float, float]:
    """``(attack success, clean accuracy)`` of the victim with parameters ``theta``, both in [0, 1].

    Attack success: the share of triggered evaluation-half source reviews predicted as ``target``; clean
    accuracy: on the evaluation half's true labels.
    """
    success = float((victim.predict(theta, batches.triggered_eval) == target).double().mean())
    return success, victim.accuracy(theta, batches.clean_eval)


# ------------------------------------------------------------------------------- step 2: craft
def attacker_alignment(
    victim, theta: torch.Tensor, batches: VictimBatches, config: FactorConfig, progress: bool
) -> Alignment:
    """The attacker's objective ``J``: the mean preconditioned adversarial gradient of the model ``theta``
    (curvature fitted on the victim's training slice) as a central-difference alignment."""
    suffix = victim.load_suffix(theta)
    method = FactoredInfluence(suffix, victim.task, _batches(batches.train), config, progress=progress)
    pre = method.preconditioned_query_gradients(batches.adv)
    direction = {k: v.mean(0) for k, v in pre.items()}
    return Alignment(victim.load_full(theta), suffix, direction, victim.last_k)


# ---------------------------------------------------------------------- step 3: retrain victim
def retrain_on_poisons(
    victim, all_batch: dict, n_clean: int, sizes, batches: VictimBatches, target: int, control: tuple[float, float]
) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """The victim retrained (same initialisation and seed) on the clean rows + the first ``N`` poisons,
    for each ``N`` in ``sizes``; ``control`` is ``attack_rates`` of the clean model.

    Returns:
        rows ``{n_poison, attack_success, control_success, net_success, clean_accuracy,
        clean_accuracy_control, n_triggered_eval}`` in increasing ``N``, and ``{N: parameters}``.
    """
    ctrl_succ, ctrl_acc = control
    rows, thetas = [], {}
    for n_p in sorted(sizes):
        keep = torch.cat([torch.arange(n_clean), n_clean + torch.arange(n_p)])
        theta, _ = victim.fit(all_batch, keep)
        thetas[n_p] = theta
        succ, acc = attack_rates(victim, theta, batches, target)
        rows.append(
            {
                "n_poison": int(n_p),
                "attack_success": succ,
                "control_success": ctrl_succ,
                "net_success": succ - ctrl_succ,
                "clean_accuracy": acc,
                "clean_accuracy_control": ctrl_acc,
                "n_triggered_eval": int(batches.triggered_eval["attention_mask"].shape[0]),
            }
        )
    return rows, thetas


# ---------------------------------------------------------------------------------- step 4: audit
def audit_rankers(
    suffix, task, all_batch: dict, defender_batch: dict, all_texts: list[str], trigger: str, seed: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Suspicion scores ``[n]`` (higher = more suspicious) of every training row of ``all_batch``.

    The defences' rankers (:func:`~influent.defenses.rankers.score_all` over
    :func:`~influent.defenses.inputs.factored_audit_inputs`: EK-FAC curvature of the suffix, the defender's
    triggered queries labelled with the source class): ``query_influence`` (summed opponent influence,
    ``-score``), ``query_cosine`` (the defences' ``relatif``: the same divided by the square root of
    self-influence), ``self_influence``, ``tracin_self`` (identity curvature, final model) and ``loss``;
    plus the attack-specific ``trigger_search`` (rows containing a trigger word, ties broken at random)
    and ``random``, drawn from one generator in that order.
    """
    inputs = factored_audit_inputs(
        suffix, task, _batches(all_batch), config=FactorConfig(strategy="ekfac", modules="trainable", seed=seed),
        queries=defender_batch, seed=seed, progress=progress,
    )
    shared = score_all(inputs, list(SHARED_RANKERS.values()))
    n = len(all_texts)
    rng = np.random.default_rng(seed + 7919)
    trigger_search = np.array([float(contains_trigger(x, trigger)) for x in all_texts]) + 1e-6 * rng.random(n)
    return {
        **{name: shared[theirs] for name, theirs in SHARED_RANKERS.items()},
        "trigger_search": trigger_search,
        "random": rng.random(n),
    }


# ------------------------------------------------------------------------ step 5: remove, retrain
def remove_and_retrain(
    victim, all_batch: dict, rankers: dict[str, np.ndarray], is_poison: np.ndarray, remove_fraction: float,
    batches: VictimBatches, target: int, control_success: float,
) -> list[dict]:
    """For each ranker of :data:`REMOVAL_RANKERS`: drop its top ``remove_fraction`` rows, retrain, score.

    Returns:
        rows ``{ranker, removed, poisons_removed, attack_success, net_success, clean_accuracy}``.
    """
    n_all = len(is_poison)
    k = round(remove_fraction * n_all)
    removal = []
    for name in REMOVAL_RANKERS:
        drop = np.argsort(-rankers[name], kind="stable")[:k]
        keep_mask = np.ones(n_all, dtype=bool)
        keep_mask[drop] = False
        theta, _ = victim.fit(all_batch, torch.as_tensor(np.flatnonzero(keep_mask)))
        succ, acc = attack_rates(victim, theta, batches, target)
        removal.append(
            {
                "ranker": name,
                "removed": int(k),
                "poisons_removed": int(is_poison[drop].sum()),
                "attack_success": succ,
                "net_success": succ - control_success,
                "clean_accuracy": acc,
            }
        )
    return removal


def _poison_records(search: PoisonSearch) -> list[dict]:
    return [
        {"text": x, "start": s0, "alignment": a, "start_alignment": a0}
        for x, s0, a, a0 in zip(search.texts, search.start_texts, search.alignment, search.start_alignment)
    ]


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
    from influent.pipeline import load_corpus_and_split
    from influent.store import default_cache_dir

    if not sizes or min(sizes) < 1:
        raise UserError(f"sizes must be positive poison counts, got {list(sizes)}", field="sizes")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus, split = load_corpus_and_split(data, text_column, label_column, "train", 0.2, split_seed, cache)
    texts = select_texts(
        corpus, split, seed=seed, train_size=train_size, trigger=trigger, source=source, target=target,
        n_adv=n_adv, n_eval=n_eval, n_clean_eval=n_clean_eval,
    )
    tgt, n, n_max = texts.target, len(texts.train_texts), max(sizes)
    victim = SuffixClassifier(
        encoder, len(texts.names), last_k=last_k, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
        max_length=max_length,
    )
    with _timed(times, "prefix_cache"):
        batches = cache_batches(victim, texts)
    with _timed(times, "train_clean"):  # the clean victim, then the attacker's alignment and the poisons
        theta_c, info_c = victim.fit(batches.train)
    control = attack_rates(victim, theta_c, batches, tgt)
    with _timed(times, "attacker_curvature"):
        config = FactorConfig(strategy=curvature, modules="trainable", damping=damping, seed=seed)
        alignment = attacker_alignment(victim, theta_c, batches, config, progress)
    search = craft_poisons(
        alignment, victim.tokenizer, texts.pool_texts, n_max, tgt, trigger, candidates=candidates,
        sweeps=sweeps, max_tokens=max_tokens, pool=pool, seed=seed, progress=progress,
    )
    times["craft_poisons"] = search.seconds
    all_texts = texts.train_texts + search.texts
    all_batch = victim.cache(all_texts, texts.train_labels + [tgt] * n_max)
    with _timed(times, "train_poisoned"):  # the victim retrains on slice + poisons
        rows, thetas = retrain_on_poisons(victim, all_batch, n, sizes, batches, tgt, control)
    rows = [dict({"n_poison": r["n_poison"], "trigger": trigger}, **r, poison_seconds=search.seconds,
                 curvature=curvature) for r in rows]
    is_poison = np.arange(n + n_max) >= n
    with _timed(times, "audit"):  # the audit of the largest poisoned model
        suffix = victim.load_suffix(thetas[n_max])
        rankers = audit_rankers(suffix, victim.task, all_batch, batches.defender, all_texts, trigger, seed, progress)
        audit = {name: detection_metrics(s, is_poison, fractions=AUDIT_FRACTIONS, seed=seed)
                 for name, s in rankers.items()}
    with _timed(times, "removal"):  # removal of the top fraction and retraining
        removal = remove_and_retrain(victim, all_batch, rankers, is_poison, remove_fraction, batches, tgt, control[0])
    times["total"] = time.perf_counter() - t_all
    return {
        "seed": seed, "n_train": n, "source": texts.names[texts.source], "target": texts.names[tgt],
        "trigger": trigger, "banned_token_count": search.banned_count,
        "train_grad_norm_clean": info_c.get("grad_norm"), "rows": rows, "audit": audit, "removal": removal,
        "poisons": _poison_records(search), "flips": search.flips, "seconds": times,
    }


@contextmanager
def _timed(times: dict[str, float], name: str):
    """Record the wall-clock seconds of the ``with`` block as ``times[name]``."""
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def run_concealed(data: str | None = None, *, seeds=(0, 1, 2), out=None, progress: bool = True, **options) -> dict:
    """:func:`concealed_seed` over ``seeds``; rows, audit and removal summarised (mean, sd over seeds).

    Returns ``{'kind': 'concealed', 'seeds', 'options', 'rows', 'summary', 'audit', 'audit_summary',
    'removal', 'removal_summary', 'runs'}`` and writes ``out/attack_concealed.json`` when ``out`` is given.
    """
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
