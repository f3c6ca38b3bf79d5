"""Filter recall: how much of the full-corpus EK-FAC top 10 survives ``influent trace --candidates N``?

Reads what ``benchmarks/lm_planted_facts.py`` wrote (``queries.json``: the training sequences' texts and the
queries; ``scores.safetensors``: the EK-FAC scores of every query against every training sequence, fine-tuned
SmolLM2-135M-Instruct), so it needs no model. For each query, the exact top 10 is the 10 highest scores
(ties by position, as ``influent.trace`` orders them); a filter keeping N candidates keeps the N sequences
most related to ``prompt + completion`` by TF-IDF or BM25 (``influent.retrieval.CandidateFilter``, as
``--candidates-method``) or N sequences drawn at random (seeded per query). Candidate filtering does not
change the scores of the kept sequences (``tests/test_lm_trace.py``), so the top 10 after filtering is the
exact top 10 restricted to the kept ones: the figure is ``|top10 & kept| / 10``, at most ``N / 10``; and
the share of the top 10's summed score that the kept ones carry (the planted sequences of a fact score ~100x
the rest of its top 10, so this tells whether what matters survives).

N is 1%, 5% and 20% of the corpus (rounded up). Mean and 95% percentile-bootstrap interval over the queries,
for the fact queries (question + invented answer), the natural ones (held-out snippets: first half prompt,
second half completion) and all. One JSON object on the last stdout line.

    PYTHONPATH=src .venv/bin/python benchmarks/lm_filter_recall.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from influent import store
from influent.evaluation.explanations import interval
from influent.retrieval import CandidateFilter

METHODS = ("tfidf", "bm25", "random")


def exact_top(scores: np.ndarray, top: int) -> set[int]:
    """The ``top`` highest-scoring positions (ties by lower position, as ``influent.trace`` orders them)."""
    return set(np.lexsort((np.arange(len(scores)), -scores))[:top].tolist())


def kept_positions(ranker: CandidateFilter, query: str, k: int, method: str,
                   rng: np.random.Generator) -> set[int]:
    """The ``k`` candidates a filter keeps (``random``: a uniform draw without replacement)."""
    if method == "random":
        return set(rng.choice(len(ranker.texts), k, replace=False).tolist())
    return set(ranker.top(query, k, method).tolist())


def survival(scores: np.ndarray, texts: list[str], queries: list[str], fractions, top: int, seed: int):
    """``({figure: {fraction: {method: [value per query]}}}, {method: seconds per filter call})``.

    Figures: ``top10``, the share of the exact top ``top`` kept; ``score_mass``, the share of their summed
    positive scores kept (a kept top sequence counts by its score, so near-ties at the bottom weigh little).
    """
    ranker = CandidateFilter(texts)
    n = len(texts)
    out = {fig: {f: {m: [] for m in METHODS} for f in fractions} for fig in ("top10", "score_mass")}
    seconds = {m: 0.0 for m in METHODS}
    for q, text in enumerate(queries):
        best = exact_top(scores[q], top)
        weight = {i: max(float(scores[q, i]), 0.0) for i in best}
        total = sum(weight.values()) or 1.0
        for m in METHODS:
            rng = np.random.default_rng([seed, q])
            for f in fractions:
                t0 = time.perf_counter()
                kept = kept_positions(ranker, text, max(1, math.ceil(f * n)), m, rng)
                seconds[m] += time.perf_counter() - t0
                out["top10"][f][m].append(len(best & kept) / top)
                out["score_mass"][f][m].append(sum(weight[i] for i in best & kept) / total)
    calls = len(queries) * len(fractions)
    return out, {m: s / calls for m, s in seconds.items()}


def summary(shares, kinds: list[str], n: int, top: int, seed: int) -> dict:
    """Per fraction: N, the ceiling ``min(1, N / top)``, and per method and query kind the mean + interval."""
    kinds_arr = np.array(kinds)
    out = {}
    for f, per_method in shares.items():
        k = max(1, math.ceil(f * n))
        row = {"candidates": k, "ceiling": min(1.0, k / top)}
        for m, values in per_method.items():
            v = np.array(values)
            row[m] = {kind: interval(v[kinds_arr == kind], seed) for kind in sorted(set(kinds))}
            row[m]["all"] = interval(v, seed)
        out[f"{f:g}"] = row
    return out


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    title = (f"# Filter recall of the EK-FAC top {s['top']} ({s['n_sequences']} training sequences, "
             f"{s['n_queries']['fact']} fact + {s['n_queries']['natural']} natural queries)")
    lines = [title, "", "```", result["command"], "```", "", f"Load average {result['loadavg']}."]
    for figure, label in (("top10", "share of the top 10 kept"), ("score_mass", "share of the top 10's score kept")):
        lines += ["", f"{label} (mean [95% interval]):", "",
                  "| candidates | ceiling | method | fact queries | natural queries | all |",
                  "| --- | ---: | --- | --- | --- | --- |"]
        for frac, row in result[figure].items():
            for m in METHODS:
                cells = [f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
                         for c in (row[m]["fact"], row[m]["natural"], row[m]["all"])]
                ceiling = f"{row['ceiling']:.2f}" if figure == "top10" else "1"
                lines.append(f"| {float(frac):.0%} ({row['candidates']}) | {ceiling} | {m} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scores", default="benchmarks/results/lm-planted-facts",
                   help="folder with lm_planted_facts.py's queries.json and scores.safetensors")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/lm-filter-recall")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = store.read_json(Path(args.scores) / "queries.json")
    scores = store.read_tensors(Path(args.scores) / "scores.safetensors")["ekfac"].double().numpy()
    texts = [s["text"] for s in data["sequences"]]
    queries = [q["text"] for q in data["queries"]]
    kinds = [q["kind"] for q in data["queries"]]
    print(f"{len(queries)} queries x {len(texts)} sequences", file=sys.stderr)
    shares, per_query = survival(scores, texts, queries, args.fractions, args.top, args.seed)
    options = ["--fractions", *map(str, args.fractions), "--top", str(args.top), "--seed", str(args.seed)]
    result = {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/lm_filter_recall.py " + " ".join(options),
        "settings": {**vars(args), "n_sequences": len(texts),
                     "n_queries": {k: kinds.count(k) for k in ("fact", "natural")}},
        "top10": summary(shares["top10"], kinds, len(texts), args.top, args.seed),
        "score_mass": summary(shares["score_mass"], kinds, len(texts), args.top, args.seed),
        "per_query": {fig: {f"{f:g}": v for f, v in per.items()} for fig, per in shares.items()},
        "seconds_per_filter_call": per_query,
        "seconds": time.perf_counter() - t0,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "result.json", result)
    write_markdown(out / "result.md", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
