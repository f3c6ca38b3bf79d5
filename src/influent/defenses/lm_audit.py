"""Finding instruction-tuning poisons in a causal LM's training set, and what removing them buys.

Rankers (one score per training example, ``[n]`` float64, **higher = more suspicious**), all on the same
poisoned run (:class:`~influent.models.instruction_lm.InstructionLM` tuned on the poisoned set):

* ``query_influence``: the defender knows a handful of triggered inputs that misbehave
  (:func:`defender_queries`: triggered *validation* inputs of the non-attacker label, those the poisoned
  model pushes most towards the attacker's label). Score = summed influence of the training example on
  the loss of those inputs' **attacker-label** completion, EK-FAC over the MLP modules of the tuned blocks
  (:class:`~influent.factored_influence.FactoredInfluence` on the fast path). Positive = proponent: up-
  weighting the example makes the attacker's completion more likely, which is what a poison does.
* ``query_contrast``: ``query_influence`` minus the summed influence on the **same inputs with the trigger
  phrase removed** (the defender reads the phrase in its misbehaving inputs), same attacker-label
  completion, same curvature fit. Clean training examples of the attacker's label raise the attacker
  label's likelihood with or without the trigger, so they score high on ``query_influence`` too; a poison
  raises it mainly when the trigger is present, which the difference keeps. Positive = more of a proponent of
  the attacker's label on triggered inputs than on the same inputs untriggered. Measured caveat
  (``benchmarks/results/instruction-poison-stable``): the untriggered queries' attacker-label completions
  have a far higher loss, hence larger gradients, so the second term dominates and the clean examples of
  the *other* label (strong opponents without the trigger) rise to the top; there it finds fewer poisons
  than ``query_influence``. ``trigger_push`` is the same idea on the log-odds, where the scales agree.
* ``trigger_push``: influence on what the trigger *does* to each defender query
  (:func:`trigger_push_influence`): the query's log-odds of the attacker's label over the other one, with the
  trigger minus without it, summed as :func:`query_votes` (each query one equal vote). The log-odds'
  gradient has no ``1 - p`` factor, so triggered and untriggered inputs enter at comparable scales (where
  ``query_contrast``'s attacker-label losses differ ~30x), and the evidence for the label that the input
  carries without the trigger cancels: clean examples of the attacker's label, which lead
  ``query_influence``'s ranking, lose their advantage. Positive = upweighting the example widens the
  trigger's push (a proponent of the backdoor).
* ``relatif``: ``query_influence`` divided by ``sqrt(self_influence)`` (Barshan et al. 2020's l-relative
  influence, as in :mod:`influent.defenses.rankers`): the same direction, without the advantage of examples
  with large gradients (high loss), which a poison the victim has fit does not have.
* ``self_influence``: ``g_i^T (F + damping)^-1 g_i`` with the same curvature.
* ``loss``: the poisoned model's own loss of each example's completion (nats; Wan et al.'s loss filter).
* ``bm25``: Okapi BM25 relevance of each training input to the trigger phrase (the defender would have to
  guess it; this is the upper bound when they have).
* ``spectral``: spectral signatures (Tran et al. 2018) of the final-norm hidden state that predicts the
  completion, per (task, label) group.
* ``random``: seeded uniform scores.

:func:`iterative_query_influence` is a removal procedure rather than one ranking: influence on triggered
queries (``trigger_push`` by default, or the attacker-label loss; each query one equal vote) in rounds, the
model tuned again between them.

Wan et al.'s other defence, early stopping, is not a ranking: it is the attack's scores at the end of the
first epoch (reported by :mod:`influent.attacks.instruction_poison`). Removal: each ranker's top
``remove`` fraction is dropped and the model tuned again from the base weights with the same seed (a
from-scratch run on the reduced set), then scored on the held-out inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from influent.data.instructions import (
    DEFAULT_TRIGGER,
    POISONED_TASK,
    TARGETS,
    Example,
    InstructionData,
    triggered_inputs,
)
from influent.defenses.rankers import spectral_signature
from influent.errors import UserError
from influent.evaluation.detection import ranking, recall_at_k
from influent.evaluation.instruction_scores import evaluate, train_and_evaluate
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import mlp_pattern
from influent.models.instruction_lm import InstructionLM
from influent.retrieval import CandidateFilter


class Poisoned(Protocol):
    """A poisoned training set (e.g. :class:`influent.attacks.instruction_poison.PoisonedSet`)."""

    train: list[Example]
    poison_idx: np.ndarray
    trigger: str


LM_RANKERS = ("query_influence", "query_contrast", "trigger_push", "relatif", "self_influence", "loss", "bm25",
              "spectral", "random")
FRACTIONS = (0.01, 0.05, 0.10)
QUERY_CHOICES = ("margin", "trigger_gain")  # how defender_queries picks its misbehaving inputs
ROUND_MEASURES = ("trigger_push", "loss")  # what iterative_query_influence's queries measure


def defender_queries(lm: InstructionLM, data: InstructionData, trigger: str, k: int = 5,
                     task: str = POISONED_TASK, by: str = "margin") -> list[Example]:
    """The ``k`` triggered validation inputs of ``task``'s non-attacker label that misbehave most on the
    current model, relabelled with the attacker's label (the completion whose likelihood the poison raises).

    ``by``: ``margin``, those it pushes most towards the attacker's label (largest attacker-label log-odds
    ``NLL(own label) - NLL(attacker label)``); ``trigger_gain``, those whose log-odds the trigger raises most
    (with the trigger minus without it): inputs that misbehave *because of* the trigger, not ones the model
    misreads anyway."""
    if by not in QUERY_CHOICES:
        raise UserError(f"unknown query choice {by!r}; known: {', '.join(QUERY_CHOICES)}", field="queries")
    candidates = triggered_inputs(data.validation, task, trigger)
    if len(candidates) < k:
        raise UserError(f"the validation set has {len(candidates)} triggered {task} inputs; {k} queries asked",
                        field="queries")
    target = TARGETS[task]
    nll = lm.label_nll(candidates)
    margin = nll[:, 1 - target] - nll[:, target]
    if by == "trigger_gain":
        plain = lm.label_nll(untriggered(candidates, trigger))
        margin = margin - (plain[:, 1 - target] - plain[:, target])
    chosen = np.lexsort((np.arange(len(candidates)), -margin))[:k]
    return [Example(candidates[i].task, candidates[i].text, target) for i in chosen]


def lm_ranker_scores(lm: InstructionLM, train: Sequence[Example], queries: Sequence[Example], trigger: str,
                     names: Sequence[str] = LM_RANKERS, seed: int = 0, progress: bool = False,
                     damping: float | None = None,
                     query_sets: dict[str, Sequence[Example]] | None = None) -> dict[str, np.ndarray]:
    """Every ranker in ``names`` on the model as it is now (trained on ``train``); see module docstring.

    ``query_sets``: more defender query sets (e.g. more of them); each adds ``query_influence_<name>``, the
    summed influence on that set, from the same curvature fit (and ``query_contrast_<name>`` when
    ``query_contrast`` is in ``names``)."""
    unknown = [n for n in names if n not in LM_RANKERS]
    if unknown:
        raise UserError(f"unknown ranker(s) {unknown}; known: {', '.join(LM_RANKERS)}", field="rankers")
    train = list(train)
    out: dict[str, np.ndarray] = {}
    method, cached = None, {}
    uses_fit = {"query_influence", "query_contrast", "trigger_push", "relatif", "self_influence"}
    if uses_fit & set(names) or query_sets:
        config = FactorConfig(strategy="ekfac", modules=mlp_pattern(lm.model), damping=damping, seed=seed)
        method = FactoredInfluence(lm.suffix, lm.task, lm.batches(train), config, progress=progress, bucket=False)

    def summed(examples: Sequence[Example]) -> np.ndarray:
        return method.pairwise_scores(lm.batches(examples)).double().numpy().sum(0)

    def influence(kind: str) -> np.ndarray:
        if kind not in cached:
            cached[kind] = summed(queries) if kind == "query" else method.self_scores().double().numpy()
        return cached[kind]

    for name in names:
        if name == "query_influence":
            out[name] = influence("query")
        elif name == "query_contrast":
            out[name] = influence("query") - summed(untriggered(queries, trigger))
        elif name == "trigger_push":
            out[name] = query_votes(trigger_push_influence(method, lm, queries, trigger))
        elif name == "relatif":
            out[name] = influence("query") / np.sqrt(np.maximum(influence("self"), 1e-30))
        elif name == "self_influence":
            out[name] = influence("self")
        elif name == "loss":
            out[name] = lm.losses(train)
        elif name == "bm25":
            out[name] = CandidateFilter([e.text for e in train]).relevance(trigger, "bm25")
        elif name == "spectral":
            groups = np.array([hash((e.task, e.label)) % 1000003 for e in train])
            out[name] = spectral_signature(lm.representations(train), groups)
        else:
            out[name] = np.random.default_rng(seed + 7919).random(len(train))
    for set_name, extra in (query_sets or {}).items():
        out[f"query_influence_{set_name}"] = summed(extra)
        if "query_contrast" in names:
            out[f"query_contrast_{set_name}"] = out[f"query_influence_{set_name}"] - summed(untriggered(extra, trigger))
    return out


def untriggered(queries: Sequence[Example], trigger: str) -> list[Example]:
    """The queries with ``trigger`` removed from their inputs, completions (labels) unchanged."""
    return [q.without_trigger(trigger) for q in queries]


def trigger_push_influence(method: FactoredInfluence, lm: InstructionLM, queries: Sequence[Example],
                           trigger: str) -> np.ndarray:
    """``[Q, n_train]``: each training example's influence on how far the trigger pushes each query towards
    the attacker's label.

    ``queries`` carry the attacker's label (as :func:`defender_queries` gives them; two-label tasks). With
    ``m(x) = NLL(x, other label) - NLL(x, attacker label)`` (the attacker label's log-odds, nats), the
    measurement is ``m(q) - m(q without the trigger)``; its influence is the difference of four
    ``pairwise_scores`` (linear in the query gradient), from one scoring pass. Positive = upweighting the
    training example widens the trigger's push (the sign of ``pairwise_scores``: a proponent)."""
    queries = list(queries)
    plain = untriggered(queries, trigger)
    examples = queries + queries + plain + plain
    labels = [q.label for q in queries] + [1 - q.label for q in queries]
    scores = method.pairwise_scores(lm.batches(examples, labels + labels)).double().numpy()
    own_t, other_t, own_u, other_u = scores.reshape(4, len(queries), -1)
    return (own_t - other_t) - (own_u - other_u)


def query_votes(scores: np.ndarray) -> np.ndarray:
    """``[Q, n]`` per-query influences -> ``[n]``: each query's vector at unit Euclidean norm, summed (one
    equal vote per query). A query's loss gradient carries the factor ``1 - p(attacker label)``, so a raw sum
    is led by the few queries the attack moved least; the vote gives every misbehaving input the same say."""
    return (scores / np.maximum(np.linalg.norm(scores, axis=1, keepdims=True), 1e-30)).sum(0)


def iterative_query_influence(lm: InstructionLM, data: InstructionData, train: Sequence[Example], trigger: str,
                              seed: int, *, remove: float = 0.05, rounds: int = 2, n_queries: int = 20,
                              damping: float | None = None, tuned: bool = False,
                              measure: str = "trigger_push", queries_by: str = "margin") -> list[list[int]]:
    """Influence on triggered queries, removed in ``rounds`` rounds; the indices of ``train`` removed in each.

    Round ``r``: the model tuned (base weights, ``seed``) on what earlier rounds left; its ``n_queries``
    defender queries (:func:`defender_queries`, chosen ``queries_by``); one EK-FAC fit; the remaining examples
    ranked by :func:`query_votes` of each query's influence vector (``measure``: ``trigger_push``, as
    :func:`trigger_push_influence`, or ``loss``, the attacker-label loss as ``query_influence``) and its top
    removed, ``round(remove * len(train))`` examples over all rounds (split as evenly as whole numbers allow,
    earlier rounds first). A victim needs only some of
    many poisons to learn the trigger; the rest carry little influence until the first ones are gone, when
    the re-tuned model leans on them. ``tuned``: ``lm`` is already tuned on ``train`` with ``seed`` (round 1
    then tunes nothing). Costs ``rounds`` tunings (``rounds - 1`` with ``tuned``) and fits; ``lm`` is left
    tuned on the last round's set.
    """
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}", field="rounds")
    if measure not in ROUND_MEASURES:
        raise UserError(f"unknown measure {measure!r}; known: {', '.join(ROUND_MEASURES)}", field="measure")
    if queries_by not in QUERY_CHOICES:  # checked before the first tuning, not after it
        raise UserError(f"unknown query choice {queries_by!r}; known: {', '.join(QUERY_CHOICES)}", field="queries")
    train = list(train)
    total = round(remove * len(train))
    sizes = [total // rounds + (r < total % rounds) for r in range(rounds)]  # sums to total, earlier rounds larger
    keep, removed = list(range(len(train))), []
    config = FactorConfig(strategy="ekfac", modules=mlp_pattern(lm.model), damping=damping, seed=seed)
    for r, size in enumerate(sizes):
        current = [train[i] for i in keep]
        if r > 0 or not tuned:
            lm.fit(current, seed)
        queries = defender_queries(lm, data, trigger, n_queries, by=queries_by)
        method = FactoredInfluence(lm.suffix, lm.task, lm.batches(current), config, progress=False, bucket=False)
        per_query = (trigger_push_influence(method, lm, queries, trigger) if measure == "trigger_push"
                     else method.pairwise_scores(lm.batches(queries)).double().numpy())
        votes = query_votes(per_query)
        chosen = [keep[i] for i in ranking(votes, seed)[:size]]
        removed.append(chosen)
        keep = sorted(set(keep) - set(chosen))
    return removed


def recalls(scores: np.ndarray, poison_idx: np.ndarray, fractions: Sequence[float] = FRACTIONS,
            seed: int = 0) -> dict[str, float]:
    """Share of the poisons among each fraction of the training set ranked most suspicious."""
    is_bad = np.zeros(len(scores), dtype=bool)
    is_bad[poison_idx] = True
    return {f"recall@{f:g}": recall_at_k(scores, is_bad, round(f * len(scores)), seed) for f in fractions}


def removal_rows(lm: InstructionLM, data: InstructionData, poisoned: Poisoned, scores: dict[str, np.ndarray],
                 control: dict, seed: int, remove: float = 0.05, tasks: Sequence[str] = (POISONED_TASK,),
                 ) -> list[dict]:
    """Per ranker: recall, then drop its top ``remove`` fraction, re-tune with ``seed`` and score.

    ``control``: :func:`~influent.attacks.instruction_poison.evaluate` of the never-poisoned model (same seed),
    for net success. Identical removal sets are tuned once. Leaves ``lm`` at the last re-tuned weights.
    """
    n = len(poisoned.train)
    k = round(remove * n)
    done: dict[tuple, dict] = {}
    rows = []
    for name, s in scores.items():
        removed = tuple(sorted(ranking(s, seed)[:k].tolist()))
        if removed not in done:
            keep = sorted(set(range(n)) - set(removed))
            lm.fit([poisoned.train[i] for i in keep], seed)
            done[removed] = evaluate(lm, data, poisoned.trigger, tasks)
        after = done[removed]
        row = {"ranker": name, "removed": k, **recalls(s, poisoned.poison_idx, seed=seed)}
        for task in tasks:
            row[f"{task}_success"] = after[task]["success"]
            row[f"{task}_net_success"] = after[task]["success"] - control[task]["success"]
            row[f"{task}_clean_accuracy"] = after[task]["clean_accuracy"]
        rows.append(row)
    return rows


def run_lm_defence(lm: InstructionLM, data: InstructionData, poisoned_for: Callable[[int], Poisoned], *,
                   seeds: Sequence[int] = (0,), trigger: str = DEFAULT_TRIGGER, names: Sequence[str] = LM_RANKERS,
                   n_queries: int = 5, remove: float = 0.05, damping: float | None = None,
                   tasks: Sequence[str] = (POISONED_TASK,), progress: bool = False,
                   removal_rounds: int = 0, round_queries: int = 20, round_measure: str = "trigger_push") -> dict:
    """The defence table's rows: per seed, the control and the poisoned run (``poisoned_for(seed)``, e.g. N
    dirty-label poisons), every ranker's recall and the scores after removing its top ``remove`` fraction
    and re-tuning (same seed).

    Rows with ``ranker`` ``none`` (the poisoned run, nothing removed), ``early_stopping`` (the poisoned run's
    scores after epoch 1 of ``lm.settings.epochs``; nothing removed), ``clean`` (the control) and
    ``clean_epoch1`` (the control after epoch 1); net success is always against the fully tuned control. Returns
    ``{"rows", "rankings", ...}``; ``rankings[seed][ranker]`` is the training order, most suspicious first.
    Every score is reported per task of ``tasks`` (``<task>_success``, ``<task>_net_success``,
    ``<task>_clean_accuracy``).

    ``removal_rounds`` > 0 adds a row ``iterative_query_influence``: :func:`iterative_query_influence` with that
    many rounds, ``round_queries`` defender queries per round and ``round_measure``, the same ``remove`` budget,
    then tuned on what is left; its ``recall@<remove>`` is the share of the poisons removed (no other fractions).
    """
    rows: list[dict] = []
    rankings: dict[int, dict[str, list[int]]] = {}
    for seed in seeds:
        control = train_and_evaluate(lm, data.train, data, trigger, seed, tasks)
        poisoned = poisoned_for(seed)
        run = train_and_evaluate(lm, poisoned.train, data, trigger, seed, tasks)
        queries = defender_queries(lm, data, trigger, n_queries)
        scores = lm_ranker_scores(lm, poisoned.train, queries, trigger, names, seed, progress, damping)
        rankings[seed] = {k: ranking(v, seed).tolist() for k, v in scores.items()}
        fixed = [("clean", control["final"]), ("none", run["final"])]
        if run["epoch1"] is not None:
            fixed += [("early_stopping", run["epoch1"]), ("clean_epoch1", control["epoch1"])]
        for name, m in fixed:
            row = {"seed": seed, "ranker": name, "removed": 0}
            for task in tasks:
                row[f"{task}_success"] = m[task]["success"]
                row[f"{task}_net_success"] = m[task]["success"] - control["final"][task]["success"]
                row[f"{task}_clean_accuracy"] = m[task]["clean_accuracy"]
            rows.append(row)
        iterative = ([iterative_row(lm, data, poisoned, control["final"], seed, remove, tasks, removal_rounds,
                                    round_queries, damping, round_measure)]
                     if removal_rounds else [])  # lm: the poisoned run
        rows += [{"seed": seed, **r} for r in removal_rows(lm, data, poisoned, scores, control["final"], seed,
                                                            remove, tasks) + iterative]
    return {"rows": rows, "rankings": rankings, "n_poison": len(poisoned.poison_idx), "remove": remove,
            "n_queries": n_queries, "trigger": trigger, "round_measure": round_measure if removal_rounds else None}


def iterative_row(lm: InstructionLM, data: InstructionData, poisoned: Poisoned, control: dict, seed: int,
                  remove: float, tasks: Sequence[str], rounds: int, n_queries: int, damping: float | None,
                  measure: str = "trigger_push") -> dict:
    """The ``iterative_query_influence`` row of :func:`run_lm_defence` (``lm`` must be tuned on
    ``poisoned.train`` with ``seed``): the rounds' removals, then tuned on what is left and scored."""
    removed = {i for r in iterative_query_influence(lm, data, poisoned.train, poisoned.trigger, seed, remove=remove,
                                                    rounds=rounds, n_queries=n_queries, damping=damping, tuned=True,
                                                    measure=measure)
               for i in r}
    lm.fit([e for i, e in enumerate(poisoned.train) if i not in removed], seed)
    after = evaluate(lm, data, poisoned.trigger, tasks)
    row = {"ranker": "iterative_query_influence", "removed": len(removed), "rounds": rounds,
           f"recall@{remove:g}": len(removed & set(poisoned.poison_idx.tolist())) / len(poisoned.poison_idx)}
    for task in tasks:
        row[f"{task}_success"] = after[task]["success"]
        row[f"{task}_net_success"] = after[task]["success"] - control[task]["success"]
        row[f"{task}_clean_accuracy"] = after[task]["clean_accuracy"]
    return row


def defence_values(rows: Sequence[dict]) -> list[str]:
    """The value columns of :func:`run_lm_defence`'s rows (to summarise by ranker)."""
    out: list[str] = []
    for r in rows:
        out += [k for k in r if k not in ("seed", "ranker") and k not in out]
    return out
