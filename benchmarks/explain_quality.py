"""Explanations a user can trust: relevance and faithfulness of each ranking of the training examples.

For a panel of held-out Rotten Tomatoes reviews (seeded sample, each explained at its predicted label) and
each ranking (``influence``, ``relatif``, ``cosine``, ``embedding_nn``, ``tfidf_nn``; ``random`` for the removal
baseline): Hanawa et al.'s identical-class test (top-1 and top-10 proponents sharing the predicted class), the
number of distinct training examples across all top-10 lists, the change of the query's loss and the share of
flipped predictions after removing the top-k proponents (k = 1, 10, 50) and retraining, and seconds per
query. Means with 95% bootstrap intervals; a markdown table; one JSON line last. The library function is
:mod:`influent.evaluation.explanation_runs` (``influent validate --explain`` calls the same).

* ``--model head``: the default head (``influent train --model head --seed 0``: MiniLM mean-pooled
  embeddings, L2-regularised logistic regression, l2 = 1e-3), exact Hessian influence, exact retraining by
  Newton from the optimum.
* ``--model finetuned``: the prefix-cached last-layer fine-tune on a seeded stratified training slice
  (SuffixClassifier: last ``--last-k`` layers + pooler + head, AdamW, dropout on, seeded), EK-FAC influence
  over the trainable linear modules, retrained by seeded replay.

Run (the committed results; README "Which ranking")::

    .venv/bin/python benchmarks/explain_quality.py --model head --queries 300 --max-seconds 2100 --threads 1 \
        --out benchmarks/results/explain-quality/head
    .venv/bin/python benchmarks/explain_quality.py --model finetuned --queries 100 --train-size 500 --epochs 3 \
        --ks 1 10 50 --reference-ks 10 --max-seconds 2700 --threads 1 --out benchmarks/results/explain-quality/finetuned

A fine-tuned replay costs about 4 s on one thread of an idle core (500 examples, 3 epochs, last layer at the
first token on cached prefix hidden states) and several times that on a loaded machine: ``--reference-ks``
measures the comparators at fewer k and ``--max-seconds`` stops the removal experiment after that long (the
queries go in draw order, so the covered ones are a random subset). The JSON's ``retrain_seconds_per_replay``
and ``full_panel_retrains`` give the cost of the full panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from influent.evaluation.explanation_runs import finetuned_explanation_quality, head_explanation_quality
from influent.evaluation.explanations import REMOVAL_KS, markdown_table
from influent.pipeline import prepare_head
from influent.store import write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["head", "finetuned"], default="head")
    p.add_argument("--queries", type=int, default=300, help="held-out reviews in the panel")
    p.add_argument("--removal-queries", type=int, default=None, help="of which through remove-and-retrain")
    p.add_argument("--ks", type=int, nargs="+", default=list(REMOVAL_KS))
    p.add_argument("--reference-ks", type=int, nargs="+", default=None,
                   help="k removed for the comparators (nearest neighbours, random); default: --ks")
    p.add_argument("--max-seconds", type=float, default=None, help="stop remove-and-retrain after this long")
    p.add_argument("--train-size", type=int, default=1000, help="fine-tuned: training slice")
    p.add_argument("--last-k", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/explain-quality/head")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a loaded machine)")
    p.add_argument("--resume", action="store_true",
                   help="keep the removal records already in OUT/records.jsonl and measure the other queries")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    setup = prepare_head(seed=args.seed, cache_dir=args.cache_dir, progress=not args.quiet)
    ref_ks = tuple(args.reference_ks) if args.reference_ks else None
    all_ks = tuple(sorted(set(args.ks) | set(ref_ks or ())))
    common = {"ks": tuple(args.ks), "reference_ks": ref_ks, "removal_queries": args.removal_queries, "seed": args.seed,
              "records_path": out / "records.jsonl", "max_seconds": args.max_seconds, "progress": not args.quiet,
              "resume": args.resume}
    if args.model == "head":
        result = head_explanation_quality(setup, args.queries, **common)
    else:
        result = finetuned_explanation_quality(setup, args.queries, train_size=args.train_size, last_k=args.last_k,
                                               epochs=args.epochs, max_length=args.max_length, **common)
    result["command"] = "benchmarks/explain_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown_table(result["summary"], all_ks)
    write_json(out / "explain_quality.json", result)
    (out / "explain_quality.md").write_text(table + "\n")
    print(table)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}))
    return result


if __name__ == "__main__":
    main()
