"""Influence on triggered queries, removed in rounds: does a second look find the poisons the first missed?

With 50 poisons the victim needs only some of them to learn the trigger; the others carry little influence
on the triggered queries and rank among clean examples of the attacker's label. Removing the top of the
ranking and tuning again makes the remaining poisons the model's evidence for the trigger, so a second
ranking on the re-tuned model should find them. Per seed (the N = 50 dirty-label set of
``benchmarks/instruction_poison.py``, the victim of ``--epochs/--lr/--schedule``):

1. never-poisoned run (the net-success reference); 2. for each of ``--rounds`` rounds: tune on the current
set (base weights, the seed), choose the ``--queries`` defender queries on that model (``defender_queries``),
one EK-FAC fit, rank the current set by ``query_votes`` (each query's influence vector at unit norm, one
equal vote each; ``--measure``: influence on the trigger's push on the attacker label's log-odds,
``trigger_push_influence``, or on the attacker-label loss, ``loss``) and remove its top (``--remove`` of the
original size over all rounds), which is ``lm_audit.iterative_query_influence``; 3. tune on what is left
and score it. The first round's model is the poisoned run with nothing removed. Recall = poisons removed / N;
success and clean accuracy on the held-out inputs (``evaluate``), net of the never-poisoned run of the same seed.

Writes ``runs.jsonl`` (one line per seed, resumable) and prints one JSON line with the means.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poison_iterative_removal.py``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from poison_query_aggregation import add_victim_options, victim_and_data


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def tuned_scores(lm, data, train, seed: int) -> dict:
    """Tune on ``train`` with ``seed``; the held-out scores of every task."""
    from influent.data.instructions import DEFAULT_TRIGGER, TASKS
    from influent.evaluation.instruction_scores import evaluate

    lm.fit(train, seed)
    return evaluate(lm, data, DEFAULT_TRIGGER, TASKS)


def one_seed(lm, data, args, seed: int) -> dict:
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.data.instructions import DEFAULT_TRIGGER
    from influent.defenses.lm_audit import iterative_query_influence

    t0 = time.perf_counter()
    clean = tuned_scores(lm, data, data.train, seed)
    poisoned = dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, seed)
    before = tuned_scores(lm, data, poisoned.train, seed)
    rounds = iterative_query_influence(lm, data, poisoned.train, DEFAULT_TRIGGER, seed, remove=args.remove,
                                       rounds=args.rounds, n_queries=args.queries, tuned=True,
                                       measure=args.measure, queries_by=args.queries_by)
    poisons = set(poisoned.poison_idx.tolist())
    found = [len(poisons & set(r)) for r in rounds]
    removed = {i for r in rounds for i in r}
    final = tuned_scores(lm, data, [e for i, e in enumerate(poisoned.train) if i not in removed], seed)
    s, c = final["sentiment"], clean["sentiment"]
    log(f"seed {seed}: poisons per round {found}, recall {sum(found) / args.n_poison:.2f}, net success "
        f"{s['success'] - c['success']:+.3f}, clean accuracy {s['clean_accuracy']:.3f} (never poisoned "
        f"{c['clean_accuracy']:.3f})")
    return {"seed": seed, "recall": sum(found) / args.n_poison, "poisons_per_round": found, "removed": rounds,
            "before": before, "final": final, "clean": clean,
            "net_success_before": before["sentiment"]["success"] - c["success"],
            "net_success_after": s["success"] - c["success"],
            "clean_accuracy_change": s["clean_accuracy"] - c["clean_accuracy"],
            "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0]}


def settings_key(settings: dict) -> str:
    """The settings as a sorted JSON string; records from before ``--measure`` and
    ``--queries-by`` existed measured the loss on the ``margin`` choice."""
    return json.dumps({"measure": "loss", "queries_by": "margin", **settings}, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--remove", type=float, default=0.05)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--measure", choices=["trigger_push", "loss"], default="trigger_push")
    ap.add_argument("--queries-by", choices=["margin", "trigger_gain"], default="margin",
                    help="defender_queries' choice of the misbehaving inputs")
    add_victim_options(ap)
    ap.add_argument("--out", default="benchmarks/results/poison-iterative-removal")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    done = {}
    if runs_file.is_file():
        done = {(r["seed"], settings_key(json.loads(r["settings"]))): r
                for r in map(json.loads, runs_file.read_text().splitlines())}
    settings = settings_key({k: getattr(args, k) for k in ("rounds", "remove", "queries", "n_poison", "epochs",
                                                           "lr", "schedule", "measure", "queries_by")})
    lm, data = victim_and_data(args)
    rows = []
    for seed in args.seeds:
        if (seed, settings) not in done:
            record = {**one_seed(lm, data, args, seed), "settings": settings,
                      "command": "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv)}
            with runs_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[(seed, settings)] = record
        rows.append(done[(seed, settings)])
    lm.save_cache()
    summary = {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1))
                   if len(rows) > 1 else 0.0]
               for k in ("recall", "net_success_before", "net_success_after", "clean_accuracy_change")}
    print(json.dumps({"settings": json.loads(settings), "seeds": args.seeds, "mean_sd": summary}))


if __name__ == "__main__":
    main()
