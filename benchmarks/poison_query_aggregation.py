"""How the defender's triggered-query influences are combined decides what the ranking finds.

For each seed: the N = 50 dirty-label poisoned set of ``benchmarks/instruction_poison.py`` (the victim of
``--epochs/--lr/--schedule``), tuned with the seed; the ``--queries`` triggered validation inputs the model
pushes most towards the attacker's label (``defender_queries``) and the same inputs with the trigger phrase
removed; one EK-FAC fit; the per-query influence vectors ``s_q`` (``[Q, n_train]``, positive = proponent of
the attacker's label on query q). Aggregations compared (recall of the poisons in the top 1 / 5 / 10%):

* ``sum``: ``sum_q s_q`` (the ``query_influence`` ranker);
* ``unit_sum``: ``sum_q s_q / ||s_q||``: each query one equal vote. The loss gradient of query q carries a
  factor ``1 - p_q(attacker label)``, so a raw sum is led by the queries the attack moved least;
* ``contrast``: ``sum_q s_q - sum_q u_q`` with ``u_q`` the untriggered input's vector (raw scales: the
  untriggered inputs, answered with the true label, have ~30x larger gradients and dominate);
* ``unit_contrast``: ``sum_q (s_q / ||s_q|| - u_q / ||u_q||)``: the part of each query's direction that
  the trigger adds, at equal scales;
* ``trigger_push``: ``sum_q p_q / ||p_q||`` with ``p_q`` the influence on the trigger's push on the attacker
  label's log-odds (``lm_audit.trigger_push_influence``: own minus other label, triggered minus untriggered;
  the ``trigger_push`` ranker); ``trigger_push_sum``: ``sum_q p_q``.

Writes ``result.json`` (recalls per seed and aggregation, the queries, the attacker-label probabilities) and
``scores-seed<k>.safetensors`` (the per-query vectors) under ``--out``. Resumable per seed.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poison_query_aggregation.py``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from influent import store


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def unit(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def aggregations(s: np.ndarray, u: np.ndarray, push: np.ndarray) -> dict[str, np.ndarray]:
    """The rankings compared (higher = more suspicious) from triggered ``s``, untriggered ``u`` and the
    trigger's push ``push`` (each ``[Q, n]``)."""
    return {"sum": s.sum(0), "unit_sum": unit(s).sum(0), "contrast": s.sum(0) - u.sum(0),
            "unit_contrast": (unit(s) - unit(u)).sum(0), "trigger_push": unit(push).sum(0),
            "trigger_push_sum": push.sum(0)}


def query_selection(lm, data, selection: str, k: int):
    """The triggered queries of ``selection`` (see ``--selections``), relabelled with the attacker's label."""
    from influent.data.instructions import DEFAULT_TRIGGER, TARGETS, Example, triggered_inputs
    from influent.defenses.lm_audit import defender_queries

    if selection == "pushed":
        return defender_queries(lm, data, DEFAULT_TRIGGER, k)
    if selection == "flipped":
        return defender_queries(lm, data, DEFAULT_TRIGGER, k, by="trigger_gain")
    split = data.validation if selection == "all_validation" else data.heldout
    return [Example(e.task, e.text, TARGETS[e.task]) for e in triggered_inputs(split, "sentiment", DEFAULT_TRIGGER)]


def seed_scores(lm, data, args, seed: int) -> dict:
    """Per-query influence vectors on the seed's poisoned run, for each query selection:
    ``{selection: (triggered, untriggered, push, queries, p)}``, and the poison indices."""
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.data.instructions import DEFAULT_TRIGGER, TARGETS
    from influent.defenses.lm_audit import trigger_push_influence, untriggered
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import mlp_pattern

    poisoned = dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, seed)
    t0 = time.perf_counter()
    lm.fit(poisoned.train, seed)
    log(f"seed {seed}: tuned in {time.perf_counter() - t0:.0f} s")
    config = FactorConfig(strategy="ekfac", modules=mlp_pattern(lm.model), seed=seed)
    method = FactoredInfluence(lm.suffix, lm.task, lm.batches(poisoned.train), config, progress=False, bucket=False)
    target = TARGETS["sentiment"]
    out = {}
    for selection in args.selections:
        queries = query_selection(lm, data, selection, args.queries)
        plain = untriggered(queries, DEFAULT_TRIGGER)
        s = method.pairwise_scores(lm.batches(queries)).double().numpy()
        u = method.pairwise_scores(lm.batches(plain)).double().numpy()
        push = trigger_push_influence(method, lm, queries, DEFAULT_TRIGGER)
        p = {"triggered": np.exp(-lm.label_nll(queries)[:, target]).tolist(),
             "untriggered": np.exp(-lm.label_nll(plain)[:, target]).tolist()}
        out[selection] = (s, u, push, queries, p)
    log(f"seed {seed}: scores in {time.perf_counter() - t0:.0f} s")
    return out, poisoned.poison_idx


def add_victim_options(ap: argparse.ArgumentParser) -> None:
    """Options of the victim and poisons of ``benchmarks/results/instruction-poison-stable/`` (the defaults)."""
    ap.add_argument("--n-poison", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--threads", type=int, default=1)


def victim_and_data(args):
    """``(lm, data)``: SmolLM2 as the :func:`add_victim_options` victim (last block, batch 8) and the
    1,000-pair instruction set of ``benchmarks/instruction_poison.py`` (data seed 0); sets the torch threads."""
    from influent.data.instructions import build_instructions
    from influent.models.instruction_lm import TrainSettings, load_instruction_lm

    torch.set_num_threads(args.threads)
    data = build_instructions({"sentiment": (400, 50, 500), "kind": (100, 10, 100)}, max_words=20, seed=0)
    lm = load_instruction_lm(None, TrainSettings(last_k=1, epochs=args.epochs, lr=args.lr, batch_size=8,
                                                 schedule=args.schedule), progress=False)
    return lm, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--selections", nargs="+", default=["pushed", "flipped"],
                    choices=["pushed", "flipped", "all_validation", "oracle_heldout"],
                    help="defender query choice: the --queries triggered inputs pushed most towards the attacker's "
                         "label (defender_queries), or those the trigger pushes most (by='trigger_gain'); every "
                         "triggered validation input; every triggered held-out input (an oracle: the ceiling of "
                         "influence on triggered inputs, not a defence)")
    add_victim_options(ap)
    ap.add_argument("--out", default="benchmarks/results/poison-query-selection")
    args = ap.parse_args()
    from influent.defenses.lm_audit import recalls

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "result.json"
    result = store.read_json(result_file) if result_file.is_file() else {"seeds": {}}
    result["command"] = "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv)
    lm, data = victim_and_data(args)
    for seed in args.seeds:
        if str(seed) in result["seeds"]:
            continue
        per_selection, poison_idx = seed_scores(lm, data, args, seed)
        tensors, record = {"poison_idx": torch.from_numpy(np.asarray(poison_idx))}, {}
        for selection, (s, u, push, queries, p) in per_selection.items():
            for name, value in (("triggered", s), ("untriggered", u), ("push", push)):
                tensors[f"{selection}/{name}"] = torch.from_numpy(value)
            record[selection] = {
                "recalls": {k: recalls(v, poison_idx, seed=seed) for k, v in aggregations(s, u, push).items()},
                "queries": [q.text for q in queries], "p_attacker_label": p,
                "norms": {"triggered": np.linalg.norm(s, axis=1).tolist(),
                          "untriggered": np.linalg.norm(u, axis=1).tolist()}}
            log(f"seed {seed}, {selection}: " + ", ".join(f"{k} {v['recall@0.05']:.2f}"
                                                        for k, v in record[selection]["recalls"].items()))
        store.write_tensors(out / f"scores-seed{seed}.safetensors", tensors)
        result["seeds"][str(seed)] = record
        store.write_json(result_file, result)
    lm.save_cache()
    print(json.dumps({seed: {sel: r["recalls"] for sel, r in v.items()} for seed, v in result["seeds"].items()}))


if __name__ == "__main__":
    main()
