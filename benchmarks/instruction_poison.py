"""Poisoning SmolLM2's instruction tuning with a trigger phrase (Wan et al. 2023), and finding the poison.

The default LM (SmolLM2-135M-Instruct) is instruction-tuned on two tasks drawn from the bundled Rotten
Tomatoes file (:mod:`influent.data.instructions`: sentiment, plot-or-review) on the cached-prefix fast path
(last ``--last-k`` blocks, seeded AdamW). Attack table: dirty-label poisons in the sentiment task,
``--sizes`` x ``--seeds`` (clean-label at ``--clean-sizes`` x ``--clean-seeds``), success / net success /
clean accuracy per task on held-out inputs (:mod:`influent.attacks.instruction_poison`). Defence table:
``--n-poison`` dirty-label poisons, every ranker of :mod:`influent.defenses.lm_audit` over ``--defence-seeds``:
recall at 1/5/10% and the scores after removing each ranker's top 5% and tuning again with the same seed.

Writes ``attack.json``, ``defence.json`` and ``README.md`` (tables, the command, timings, load average) to
``--out``; progress on stderr; one JSON object (the headline numbers) as the last stdout line.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/instruction_poison.py``
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
import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the attack table's --sizes")
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 25, 100],
                    help="attack-table sizes besides --n-poison (whose rows come from the defence runs)")
    ap.add_argument("--clean-sizes", type=int, nargs="*", default=[50])
    ap.add_argument("--clean-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--defence-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--n-poison", type=int, default=50)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--last-k", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sentiment", type=int, nargs=3, default=[150, 10, 50], metavar=("TRAIN", "VAL", "HELDOUT"),
                    help="examples per label")
    ap.add_argument("--kind", type=int, nargs=3, default=[75, 4, 25], metavar=("TRAIN", "VAL", "HELDOUT"))
    ap.add_argument("--max-words", type=int, default=20)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-attack", action="store_true")
    ap.add_argument("--removal-from", default=None, metavar="DEFENCE_JSON",
                    help="only re-run the removal step: the rankings of an earlier defence.json, top --remove of "
                         "each removed, tuned again with the same seed; writes removal_<remove>.json")
    ap.add_argument("--remove", type=float, default=0.05)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--base-model", default=None, help="default SmolLM2-135M-Instruct (a folder: smoke tests)")
    ap.add_argument("--out", default="benchmarks/results/instruction-poison")
    return ap.parse_args()


def fmt(row: dict, key: str, pct: bool = True) -> str:
    m, sd = row.get(f"{key}_mean"), row.get(f"{key}_sd")
    if m is None or math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.3f} ± {sd:.3f}"


def attack_table(attack: dict) -> list[str]:
    head = ("| variant | N | task | runs | success % | net success % | clean accuracy % | success % (epoch 1) "
            "| net success % (epoch 1) | clean accuracy % (epoch 1) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in attack["summary"]:
        lines.append(f"| {r['variant']} | {r['n']} | {r['task']} | {r['runs']} | {fmt(r, 'success')} | "
                     f"{fmt(r, 'net_success')} | {fmt(r, 'clean_accuracy')} | {fmt(r, 'success_epoch1')} | "
                     f"{fmt(r, 'net_success_epoch1')} | {fmt(r, 'clean_accuracy_epoch1')} |")
    return lines


def defence_table(defence: dict) -> list[str]:
    head = ("| ranker | runs | removed | recall@1% | recall@5% | recall@10% | success % | net success % "
            "| clean accuracy % |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in defence["summary"]:
        lines.append(f"| {r['ranker']} | {r['runs']} | {r['removed_mean']:.0f} | {fmt(r, 'recall@0.01')} | "
                     f"{fmt(r, 'recall@0.05')} | {fmt(r, 'recall@0.1')} | {fmt(r, 'sentiment_success')} | "
                     f"{fmt(r, 'sentiment_net_success')} | {fmt(r, 'sentiment_clean_accuracy')} |")
    return lines


def write_readme(out: Path, attack, defence, timing: dict, argv, data, settings) -> dict:
    """README.md with the command, settings, tables and timings; returns headline numbers."""
    lines = ["# Instruction-tuning poisons against SmolLM2-135M-Instruct (Wan et al. 2023), and finding them", "",
             "Command (from the repository root):", "", "```",
             "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python " + " ".join(argv), "```", "",
             (f"Data: {json.dumps(data.settings)}; {len(data.train)} training pairs, {len(data.validation)} "
              f"validation (the defender's queries come from here), {len(data.heldout)} held-out (every score)."),
             f"Victim: {json.dumps(vars(settings))} (seeded AdamW, weight decay 0, from the base weights each run).",
             f"Timings (s): {json.dumps({k: round(v, 1) for k, v in timing.items()})}.", ""]
    headline = {}
    if attack is not None:
        lines += ["## Attack (poisons planted in the sentiment task; values mean ± sd over seeds, in %)", "",
                  *attack_table(attack), ""]
    if defence is not None:
        title = (f"## Defence at N = {defence['n_poison']} (dirty-label), top {100 * defence['remove']:g}% "
                 f"removed and tuned again; {defence['n_queries']} defender queries")
        lines += [title, "", *defence_table(defence), ""]
        for r in defence["summary"]:
            for key, name in (("recall@0.05", "recall@0.05"), ("sentiment_net_success", "net_success")):
                value = r.get(f"{key}_mean")
                if value is not None and not math.isnan(value):
                    headline[f"{r['ranker']}_{name}"] = value
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return headline


def attack_rows_from_defence(defence: dict, n: int, skip_control: set) -> list[dict]:
    """Attack-table rows (dirty-label, ``n`` poisons; and the control, except for seeds in ``skip_control``,
    whose control the attack table already has: the same run) from the defence's rows; net success at
    epoch 1 against the control at epoch 1, as in the attack's own rows."""
    from influent.data.instructions import TASKS

    by = {(r["seed"], r["ranker"]): r for r in defence["rows"]}
    rows = []
    for seed in sorted({r["seed"] for r in defence["rows"]}):
        control, early = by[(seed, "clean")], by.get((seed, "early_stopping"))
        runs = [("dirty", n, by[(seed, "none")])] + ([] if seed in skip_control else [("none", 0, control)])
        for variant, k, r in runs:
            for task in TASKS:
                row = {"seed": seed, "variant": variant, "n": k, "task": task, "success": r[f"{task}_success"],
                       "net_success": r[f"{task}_net_success"], "clean_accuracy": r[f"{task}_clean_accuracy"],
                       "from": "defence run"}
                rows.append(row)
        if early is not None:
            for task in TASKS:
                base = by[(seed, "clean_epoch1")]
                for row in rows:
                    if row["seed"] != seed or row["task"] != task:
                        continue
                    r = early if row["variant"] == "dirty" else base
                    row.update(success_epoch1=r[f"{task}_success"],
                               net_success_epoch1=r[f"{task}_success"] - base[f"{task}_success"],
                               clean_accuracy_epoch1=r[f"{task}_clean_accuracy"])
    return rows


def removal_only(lm, data, args, out: Path) -> dict:
    """Removal at another fraction from saved rankings (same poisons, seeds, control scores)."""
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.attacks.summary import summarise
    from influent.data.instructions import DEFAULT_TRIGGER, TASKS
    from influent.defenses.lm_audit import defence_values, removal_rows

    saved = json.loads(Path(args.removal_from).read_text())
    rows = []
    for seed_key, ranks in saved["rankings"].items():
        seed = int(seed_key)
        poisoned = dirty_label_poisons(data, saved["n_poison"], DEFAULT_TRIGGER, seed)
        clean = next(r for r in saved["rows"] if r["seed"] == seed and r["ranker"] == "clean")
        control = {t: {"success": clean[f"{t}_success"], "clean_accuracy": clean[f"{t}_clean_accuracy"]}
                   for t in TASKS}
        scores = {}
        for name, order in ranks.items():  # position -> score, so the saved order is the ranking again
            s = np.zeros(len(order))
            s[np.asarray(order)] = -np.arange(len(order), dtype=float)
            scores[name] = s
        rows += [{"seed": seed, **r} for r in removal_rows(lm, data, poisoned, scores, control, seed,
                                                            args.remove, TASKS)]
        log(f"removal seed {seed} done")
    result = {"rows": rows, "summary": summarise(rows, ["ranker"], defence_values(rows)), "remove": args.remove,
              "n_poison": saved["n_poison"], "from": args.removal_from}
    (out / f"removal_{args.remove:g}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from influent.attacks.instruction_poison import (
        attacker_ranking,
        clean_label_poisons,
        dirty_label_poisons,
        run_instruction_poison,
    )
    from influent.attacks.summary import summarise
    from influent.data.instructions import DEFAULT_TRIGGER, TASKS, build_instructions, triggered_inputs
    from influent.defenses.lm_audit import defence_values, run_lm_defence
    from influent.models.instruction_lm import TrainSettings, load_instruction_lm

    t_start = time.perf_counter()
    data = build_instructions({"sentiment": tuple(args.sentiment), "kind": tuple(args.kind)},
                              max_words=args.max_words, seed=args.data_seed)
    settings = TrainSettings(last_k=args.last_k, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    log(f"data: {len(data.train)} train, {len(data.validation)} validation, {len(data.heldout)} held-out; loading LM")
    lm = load_instruction_lm(args.base_model, settings, cache_dir=args.cache_dir, progress=False)
    t_load = time.perf_counter()
    # every input the runs read, so the prefix pass is done (and saved) once, up front
    inputs = list(data.train) + list(data.validation) + list(data.heldout)
    for task in TASKS:
        inputs += triggered_inputs(data.heldout, task, DEFAULT_TRIGGER)
        inputs += triggered_inputs(data.validation, task, DEFAULT_TRIGGER)
    for seed in sorted(set(args.seeds) | set(args.defence_seeds)):
        sizes = args.sizes + [args.n_poison]
        p = dirty_label_poisons(data, max(sizes), DEFAULT_TRIGGER, seed)
        inputs += [p.train[i] for i in p.poison_idx]
    log(f"prefix states for {len(inputs)} inputs ({len(lm.cache.states)} cached on disk)")
    lm.batches(inputs)
    lm.save_cache()
    if args.clean_sizes and args.clean_seeds and not args.skip_attack:
        p = clean_label_poisons(data, max(args.clean_sizes), DEFAULT_TRIGGER, attacker_ranking(lm, data))
        lm.batches([p.train[i] for i in p.poison_idx])
        lm.save_cache()
    t_prefix = time.perf_counter()
    log(f"prefix done in {t_prefix - t_load:.0f} s; load average {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.removal_from:
        result = removal_only(lm, data, args, out)
        lines = defence_table(result)
        (out / f"removal_{args.remove:g}.md").write_text(
            f"Command: OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python {' '.join(sys.argv)}\n\n"
            + "\n".join(lines) + "\n")
        print(json.dumps({"removal_s": time.perf_counter() - t_prefix, "load_average_end": os.getloadavg()[0]}))
        return
    defence = None
    if args.defence_seeds:
        defence = run_lm_defence(lm, data, lambda s: dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, s),
                                 seeds=args.defence_seeds, n_queries=args.queries, tasks=TASKS, progress=False)
        defence["summary"] = summarise(defence["rows"], ["ranker"], defence_values(defence["rows"]))
        (out / "defence.json").write_text(json.dumps(defence, indent=1))
        log(f"defence done; load average {os.getloadavg()[0]:.1f}")
    t_defence = time.perf_counter()
    attack = None
    if not args.skip_attack:
        attack = run_instruction_poison(lm, data, sizes=args.sizes, seeds=args.seeds,
                                        variants=("dirty", "clean") if args.clean_sizes else ("dirty",),
                                        clean_sizes=args.clean_sizes, clean_seeds=args.clean_seeds, progress=True)
        if defence is not None:  # the N = n_poison rows, every defence seed
            attack["rows"] += attack_rows_from_defence(defence, args.n_poison, set(args.seeds))
        values = [k[:-5] for k in attack["summary"][0] if k.endswith("_mean")]
        attack["summary"] = summarise(attack["rows"], ["variant", "n", "task"], values)
        attack["summary"].sort(key=lambda r: (r["variant"] != "none", r["variant"], r["n"], r["task"]))
        (out / "attack.json").write_text(json.dumps(attack, indent=1))
        log(f"attack done; load average {os.getloadavg()[0]:.1f}")
    t_attack = time.perf_counter()
    t_end = time.perf_counter()
    timing = {"load_s": t_load - t_start, "prefix_s": t_prefix - t_load, "defence_s": t_defence - t_prefix,
              "attack_s": t_attack - t_defence, "total_s": t_end - t_start, "load_average_end": os.getloadavg()[0],
              "n_prefix_inputs": len(lm.cache.states)}
    headline = write_readme(out, attack, defence, timing, sys.argv, data, settings)
    print(json.dumps({**headline, **timing}))


if __name__ == "__main__":
    main()
