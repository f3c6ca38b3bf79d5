"""Poisoning SmolLM2's instruction tuning with a trigger phrase (Wan et al. 2023), and finding the poison.

The default LM (SmolLM2-135M-Instruct) is instruction-tuned on two tasks drawn from the bundled Rotten
Tomatoes file (:mod:`influent.data.instructions`: sentiment, plot-or-review) on the cached-prefix fast path
(last ``--last-k`` blocks, seeded AdamW, from the base weights every run).

Parts (``--part``), each resumable: every finished run is appended as one JSON line to
``<out>/runs-<part>.jsonl`` and skipped when the benchmark is started again; every part reads the lines of
all parts, so ``attack`` and ``defence`` can run as two processes at once and share their runs (the
never-poisoned control and the N = ``--n-poison`` dirty-label run of a seed are the same run for both).

* ``attack``: dirty-label poisons at ``--sizes`` and clean-label poisons at ``--clean-sizes`` (planted in the
  sentiment task), ``--seeds``; ``--residual K ...``: the N = ``--n-poison`` poisoned set with all but K of its
  poisons removed (the poisons a removal leaves behind; K = 0 is a perfect removal).
* ``defence``: per seed, the control, the poisoned run, every ranker of :mod:`influent.defenses.lm_audit`
  (recall at 1/5/10%), and each ranker's top ``--remove`` removed and tuned again with the same seed.
* ``noise``: the victim's noise floor on never-poisoned data, per seed: tuned on every training pair, and
  on a seeded random ``1 - --remove`` of them (what a removal of that size does by itself); the settings are
  part of each run's key, so several victims share one ``--out`` folder; writes ``<out>/noise.md``.
* ``report``: the tables (``README.md``, ``attack.json``, ``defence.json``) from every part's lines (with
  ``<out>/notes.md``, if present, under the title: how the parts ran).

Each run records held-out scores at the end and after epoch 1 (Wan et al.'s early stopping) and the
validation accuracy after every epoch (how the number of epochs is judged: never on held-out data).
Progress on stderr; one JSON object (the headline numbers) as the last stdout line.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/instruction_poison.py --part attack`` (see the results
README for the recorded commands).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

PARTS = ("attack", "defence", "removals", "report", "noise")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=PARTS, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 25, 100],
                    help="dirty-label sizes of the attack part (N = --n-poison comes from the defence part)")
    ap.add_argument("--clean-sizes", type=int, nargs="*", default=[50, 25, 10, 100])
    ap.add_argument("--residual", type=int, nargs="*", default=[0, 5], help="poisons left of --n-poison")
    ap.add_argument("--n-poison", type=int, default=50)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--more-queries", type=int, nargs="*", default=[20, 50],
                    help="more defender query sets (same selection, more of them): query_influence_<k>, "
                    "query_contrast_<k>")
    ap.add_argument("--remove", type=float, default=0.05)
    ap.add_argument("--removal-rankers", nargs="*", default=["query_influence", "query_influence_50", "bm25"],
                    help="the rankers whose top --remove is removed and tuned again, every seed first")
    ap.add_argument("--later-removal", nargs="*",
                    default=["relatif", "query_influence_20", "loss", "random", "spectral", "self_influence"],
                    help="removal runs done after every seed's --removal-rankers runs")
    ap.add_argument("--last-k", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--victims", nargs="*", default=[], metavar="EPOCHS:LR:SCHEDULE[:WARMUP]",
                    help="noise part: several victims in one process (seed-major)")
    ap.add_argument("--sentiment", type=int, nargs=3, default=[400, 50, 500], metavar=("TRAIN", "VAL", "HELDOUT"),
                    help="examples per label")
    ap.add_argument("--kind", type=int, nargs=3, default=[100, 10, 100], metavar=("TRAIN", "VAL", "HELDOUT"))
    ap.add_argument("--max-words", type=int, default=20)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--base-model", default=None, help="default SmolLM2-135M-Instruct (a folder: smoke tests)")
    ap.add_argument("--out", default="benchmarks/results/instruction-poison-1k")
    return ap.parse_args()


# ---------------------------------------------------------------------------------------------- records

def read_records(out: Path) -> list[dict]:
    """Every JSON line of every part (a torn last line from a crash is skipped)."""
    rows = []
    for path in sorted(out.glob("runs-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_record(out: Path, part: str, record: dict) -> None:
    with open(out / f"runs-{part}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_keys(out: Path) -> set[str]:
    return {r["key"] for r in read_records(out)}


def claim(out: Path, key: str) -> bool:
    """Whether this process may run ``key`` (the first to create its claim file does; two parts can then
    share removal runs without doing one twice)."""
    path = out / "claims" / key.replace("/", "_")
    path.parent.mkdir(exist_ok=True)
    try:
        path.open("x").close()
        return True
    except FileExistsError:
        return False


def set_hash(idx) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(idx)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- runs

def train_and_score(lm, train, data, seed: int) -> dict:
    """Tune from the base weights with ``seed``; held-out scores at the end and after epoch 1, validation
    accuracy per task after every epoch."""
    from influent.data.instructions import DEFAULT_TRIGGER, TASKS
    from influent.evaluation.instruction_scores import evaluate

    curve, early = [], {}

    def on_epoch(epoch: int) -> None:
        point = {"epoch": epoch}
        for task in TASKS:
            val = data.of("validation", task)
            point[task] = float(np.mean(lm.predict(val) == np.array([e.label for e in val])))
        curve.append(point)
        if epoch == 1 and lm.settings.epochs > 1:
            early["epoch1"] = evaluate(lm, data, DEFAULT_TRIGGER, TASKS)

    t0 = time.perf_counter()
    loss = lm.fit(train, seed, on_epoch=on_epoch)
    final = evaluate(lm, data, DEFAULT_TRIGGER, TASKS)
    return {"final": final, "epoch1": early.get("epoch1"), "validation": curve, "loss": loss,
            "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0], "n_train": len(train)}


def run_job(lm, data, out: Path, part: str, key: str, train, seed: int, meta: dict) -> dict:
    log(f"{part}: {key} ({len(train)} pairs)")
    record = {"type": "run", "key": key, "seed": seed, **meta, **train_and_score(lm, train, data, seed)}
    append_record(out, part, record)
    s = record["final"]["sentiment"]
    log(f"  done in {record['seconds']:.0f} s: success {s['success']:.3f}, clean accuracy {s['clean_accuracy']:.3f}")
    return record


def attack_part(lm, data, args, out: Path) -> None:
    from influent.attacks.instruction_poison import attacker_ranking, clean_label_poisons, dirty_label_poisons
    from influent.data.instructions import DEFAULT_TRIGGER

    scores = attacker_ranking(lm, data) if args.clean_sizes else None
    # size-major, so that a run cut short still has every seed of the sizes it reached; the controls (which
    # the defence part does in seed order) after the first size, in reverse seed order
    plan = [("dirty", n) for n in args.sizes] + [("clean", n) for n in args.clean_sizes]
    plan += [("residual", k) for k in args.residual]
    jobs = [(seed, variant, n) for variant, n in plan for seed in args.seeds]
    jobs[len(args.seeds):len(args.seeds)] = [(seed, "none", 0) for seed in reversed(args.seeds)]
    for seed, variant, n in jobs:
        key = f"seed={seed}/{variant}/{n}" if variant != "residual" else f"seed={seed}/residual/{args.n_poison}-{n}"
        if key in done_keys(out):
            continue
        if variant == "none":
            train, meta = data.train, {"variant": "none", "n": 0}
        elif variant == "dirty":
            train, meta = dirty_label_poisons(data, n, DEFAULT_TRIGGER, seed).train, {"variant": "dirty", "n": n}
        elif variant == "clean":
            train, meta = clean_label_poisons(data, n, DEFAULT_TRIGGER, scores).train, {"variant": "clean", "n": n}
        else:  # residual: the N-poison set minus every poison not among the first k of the same permutation
            full = dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, seed)
            kept = set(dirty_label_poisons(data, n, DEFAULT_TRIGGER, seed).poison_idx.tolist()) if n else set()
            drop = set(full.poison_idx.tolist()) - kept
            train = [e for i, e in enumerate(full.train) if i not in drop]
            meta = {"variant": "residual", "n": n, "n_poison": args.n_poison}
        run_job(lm, data, out, "attack", key, train, seed, meta)


def seed_rankers(out: Path, seed: int) -> dict | None:
    """A seed's ranker records merged (a later record's rankers replace an earlier one's), or None."""
    merged = None
    for r in read_records(out):
        if r["type"] == "rankers" and r["seed"] == seed:
            merged = merged or {"seed": seed, "recalls": {}, "rankings": {}}
            merged["recalls"].update(r["recalls"])
            merged["rankings"].update(r["rankings"])
    return merged


def compute_rankers(lm, data, args, out: Path, seed: int, poisoned, version: str) -> dict:
    """Tune the poisoned run (recorded the first time), then every ranker on it; one record."""
    from influent.data.instructions import DEFAULT_TRIGGER
    from influent.defenses.lm_audit import LM_RANKERS, defender_queries, lm_ranker_scores, recalls
    from influent.evaluation.detection import ranking

    key = f"seed={seed}/dirty/{args.n_poison}"
    if key in done_keys(out):  # tuned again (deterministic) for the rankers
        log(f"defence: re-tuning {key} for the rankers")
        lm.fit(poisoned.train, seed)
    else:
        run_job(lm, data, out, "defence", key, poisoned.train, seed, {"variant": "dirty", "n": args.n_poison})
    t0 = time.perf_counter()
    queries = defender_queries(lm, data, DEFAULT_TRIGGER, args.queries)
    more = {str(k): defender_queries(lm, data, DEFAULT_TRIGGER, k) for k in args.more_queries}
    scores = lm_ranker_scores(lm, poisoned.train, queries, DEFAULT_TRIGGER, LM_RANKERS, seed, query_sets=more)
    ranks = {"type": "rankers", "key": f"seed={seed}/rankers/{args.n_poison}{version}", "seed": seed,
             "n_poison": args.n_poison,
             "recalls": {k: recalls(v, poisoned.poison_idx, seed=seed) for k, v in scores.items()},
             "rankings": {k: ranking(v, seed).tolist() for k, v in scores.items()},
             "scores": {k: [float(x) for x in v] for k, v in scores.items()},
             "queries": [q.text for q in queries], "seconds": time.perf_counter() - t0}
    append_record(out, "defence", ranks)
    log(f"defence: rankers in {ranks['seconds']:.0f} s: " + ", ".join(
        f"{k} {v['recall@0.05']:.2f}" for k, v in ranks["recalls"].items()))
    return ranks


def removals(lm, data, args, out: Path, seed: int, poisoned, ranks: dict, names) -> None:
    """Each named ranker's top ``--remove`` removed, tuned again with the seed (identical sets once)."""
    k = round(args.remove * len(poisoned.train))
    for name in names:
        if name not in ranks["rankings"]:
            continue
        removed = set(ranks["rankings"][name][:k])
        key = f"seed={seed}/removal/{args.n_poison}/{set_hash(removed)}"
        if key in done_keys(out) or not claim(out, key):
            continue
        train = [e for i, e in enumerate(poisoned.train) if i not in removed]
        run_job(lm, data, out, "defence", key, train, seed,
                {"variant": "removal", "n": args.n_poison, "ranker": name, "removed": k,
                 "poisons_removed": len(removed & set(poisoned.poison_idx.tolist()))})


def removals_part(lm, data, args, out: Path) -> None:
    """Only the removal runs of the rankers already recorded (a second process helping the defence part)."""
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.data.instructions import DEFAULT_TRIGGER

    for names in (args.removal_rankers, args.later_removal):
        for seed in args.seeds:
            ranks = seed_rankers(out, seed)
            if ranks is not None:
                poisoned = dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, seed)
                removals(lm, data, args, out, seed, poisoned, ranks, names)


def defence_part(lm, data, args, out: Path) -> None:
    """Every seed: control, rankers, the priority removals; then seeds whose rankers predate a ranker get
    them computed again; then the later removals."""
    from influent.attacks.instruction_poison import dirty_label_poisons
    from influent.data.instructions import DEFAULT_TRIGGER
    from influent.defenses.lm_audit import LM_RANKERS

    poisoned = {s: dirty_label_poisons(data, args.n_poison, DEFAULT_TRIGGER, s) for s in args.seeds}
    for seed in args.seeds:
        if f"seed={seed}/none/0" not in done_keys(out):
            run_job(lm, data, out, "defence", f"seed={seed}/none/0", data.train, seed, {"variant": "none", "n": 0})
        ranks = seed_rankers(out, seed) or compute_rankers(lm, data, args, out, seed, poisoned[seed], "")
        removals(lm, data, args, out, seed, poisoned[seed], ranks, args.removal_rankers)
    expected = set(LM_RANKERS) | {f"{r}_{k}" for k in args.more_queries for r in ("query_influence", "query_contrast")}
    for seed in args.seeds:
        if expected - set(seed_rankers(out, seed)["rankings"]):
            ranks = compute_rankers(lm, data, args, out, seed, poisoned[seed], "/v2")
            removals(lm, data, args, out, seed, poisoned[seed], ranks, args.removal_rankers)
    for seed in args.seeds:
        removals(lm, data, args, out, seed, poisoned[seed], seed_rankers(out, seed), args.later_removal)


def victim_name(s) -> str:
    """A victim's settings as a key part: ``k1-e3-lr0.0005-b8-constant-w0``."""
    return f"k{s.last_k}-e{s.epochs}-lr{s.lr:g}-b{s.batch_size}-{s.schedule}-w{s.warmup_steps}"


def random_subset(n: int, remove: float, seed: int) -> list[int]:
    """Seeded random ``round((1 - remove) * n)`` of ``range(n)``, sorted (the noise part's removal)."""
    rng = np.random.default_rng(10_007 + seed)
    return sorted(rng.permutation(n)[: n - round(remove * n)].tolist())


def victim_settings(base, spec: str):
    """``base`` with ``EPOCHS:LR:SCHEDULE[:WARMUP]`` of a ``--victims`` entry (the last block count stays)."""
    from dataclasses import replace

    parts = spec.split(":")
    return replace(base, epochs=int(parts[0]), lr=float(parts[1]), schedule=parts[2],
                   warmup_steps=int(parts[3]) if len(parts) > 3 else 0)


def noise_part(lm, data, args, out: Path) -> None:
    """Per seed, per victim (``--victims``, default the command's settings): never-poisoned, all pairs and a
    random ``1 - --remove`` of them; then ``noise.md``."""
    base = lm.settings
    victims = [victim_settings(base, v) for v in args.victims] or [base]
    for seed in args.seeds:
        keep = random_subset(len(data.train), args.remove, seed)
        for settings in victims:
            lm.settings, name = settings, victim_name(settings)
            for what, train in (("all", data.train), ("random", [data.train[i] for i in keep])):
                key = f"{name}/seed={seed}/none/{what}"
                if key not in done_keys(out):
                    run_job(lm, data, out, "noise", key, train, seed, {"variant": f"noise-{what}", "n": 0,
                                                                       "victim": name})
    lm.settings = base
    (out / "noise.md").write_text("\n".join(noise_lines(read_records(out))) + "\n")


def noise_lines(records: list[dict]) -> list[str]:
    """Per victim: clean accuracy and triggered success (held-out, sentiment) over seeds, with all pairs and
    with a random 5% removed, and the paired change (removal minus all, same seed)."""
    runs = [r for r in records if r["type"] == "run" and r["variant"].startswith("noise-")]
    lines = [("| victim | seeds | clean acc % (all) | clean acc % (random 95%) | change, same seed | "
              "success % (all) | success % (random 95%) | change, same seed | kind clean acc % (all) | s per run |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for victim in dict.fromkeys(r["victim"] for r in runs):
        row = noise_row(victim, {(r["seed"], r["variant"]): r for r in runs if r["victim"] == victim})
        lines += [row] if row else []
    return lines


def noise_row(victim: str, by: dict) -> str | None:
    """One victim's :func:`noise_lines` row from its runs by ``(seed, variant)`` (seeds with both runs)."""
    seeds = sorted({s for s, _ in by if (s, "noise-random") in by and (s, "noise-all") in by})
    if not seeds:
        return None

    def col(variant, task="sentiment", metric="clean_accuracy"):
        return fmt(*stats(by[(s, variant)]["final"][task][metric] for s in seeds)[:2])

    def diff(metric):
        return fmt(*stats(by[(s, "noise-random")]["final"]["sentiment"][metric]
                          - by[(s, "noise-all")]["final"]["sentiment"][metric] for s in seeds)[:2])

    secs = stats(r["seconds"] for r in by.values())
    cells = [victim, ",".join(map(str, seeds)), col("noise-all"), col("noise-random"), diff("clean_accuracy"),
             col("noise-all", metric="success"), col("noise-random", metric="success"), diff("success"),
             col("noise-all", "kind"), fmt(secs[0], secs[1], pct=False)]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------- report

def fmt(m: float | None, sd: float | None, pct: bool = True) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.1f} ± {sd:.1f}"


def stats(values) -> tuple[float, float, int]:
    a = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(a):
        return float("nan"), 0.0, 0
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def scores_of(run: dict, control: dict, task: str, when: str = "final", against: str | None = None) -> dict:
    """Success, net success (minus the control's at ``against``, default the same checkpoint ``when``) and
    clean accuracy of ``run`` at checkpoint ``when`` (``final`` or ``epoch1``)."""
    m, c = run[when], control[against or when]
    if m is None or c is None:
        return {}
    return {"success": m[task]["success"], "net_success": m[task]["success"] - c[task]["success"],
            "clean_accuracy": m[task]["clean_accuracy"]}


def attack_rows(runs: dict, seeds) -> list[dict]:
    """Per (variant, n, task): mean and sd over seeds of success, net success, clean accuracy (and at
    epoch 1, net of the control at epoch 1)."""
    from influent.data.instructions import TASKS

    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in runs.values():
        if r["variant"] in ("none", "dirty", "clean", "residual") and f"seed={r['seed']}/none/0" in runs:
            groups.setdefault((r["variant"], r["n"]), []).append((r, runs[f"seed={r['seed']}/none/0"]))
    order = {"none": 0, "dirty": 1, "clean": 2, "residual": 3}
    rows = []
    for (variant, n), pairs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        for task in TASKS:
            row = {"variant": variant, "n": n, "task": task, "seeds": sorted(r["seed"] for r, _ in pairs)}
            for when, suffix in (("final", ""), ("epoch1", "_epoch1")):
                vals = [scores_of(r, c, task, when) for r, c in pairs]
                for name in ("success", "net_success", "clean_accuracy"):
                    row[name + suffix] = stats(v.get(name) for v in vals)
            rows.append(row)
    return rows


def defence_rows(runs: dict, rankers: list[dict], n_poison: int) -> list[dict]:
    """Per ranker: recalls, the poisons its top 5% holds, and the sentiment scores after its removal."""
    task = "sentiment"
    rows = []
    seeds = sorted(r["seed"] for r in rankers)
    fixed = [("clean (never poisoned)", "none/0", "final"), ("none (poisoned, nothing removed)",
             f"dirty/{n_poison}", "final"), ("early stopping (epoch 1)", f"dirty/{n_poison}", "epoch1")]
    for name, key, when in fixed:
        vals = [scores_of(runs[f"seed={s}/{key}"], runs[f"seed={s}/none/0"], task, when, "final") for s in seeds
                if f"seed={s}/{key}" in runs and f"seed={s}/none/0" in runs]
        rows.append({"ranker": name, **{k: stats(v.get(k) for v in vals)
                                        for k in ("success", "net_success", "clean_accuracy")}})
    k_removed = None
    names = list(dict.fromkeys(n for r in rankers for n in r["recalls"]))
    for name in names:
        row = {"ranker": name}
        have = [r for r in rankers if name in r["recalls"]]
        for f in ("recall@0.01", "recall@0.05", "recall@0.1"):
            row[f] = stats(r["recalls"][name][f] for r in have)
        row["recall_runs"] = len(have)
        after = []
        for r in have:
            removal = [x for x in runs.values() if x["variant"] == "removal" and x["seed"] == r["seed"]]
            k_removed = removal[0]["removed"] if removal else k_removed
            want = set_hash(r["rankings"][name][:k_removed]) if k_removed else None
            hit = [x for x in removal if x["key"].endswith(f"/{want}")]
            if hit:
                after.append((hit[0], runs[f"seed={r['seed']}/none/0"]))
        vals = [scores_of(x, c, task) for x, c in after]
        row.update({k: stats(v.get(k) for v in vals) for k in ("success", "net_success", "clean_accuracy")})
        row["poisons_removed"] = stats(x["poisons_removed"] for x, _ in after)
        rows.append(row)
    return rows


def table(rows: list[dict], cols: list[tuple[str, str, bool]]) -> list[str]:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, is_stat in cols:
            v = r.get(key)
            if is_stat:
                cells.append(fmt(v[0], v[1], pct=key != "poisons_removed") if v else "-")
            elif key == "runs":
                cells.append(str(r["success"][2]) if "recall_runs" not in r else f"{r['recall_runs']} / {r['success'][2]}")
            else:
                cells.append(str(v) if v is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def validation_lines(runs: dict) -> list[str]:
    """Mean validation accuracy per epoch of the never-poisoned runs (how the epoch count is judged)."""
    controls = [r for r in runs.values() if r["variant"] == "none"]
    if not controls:
        return []
    lines = ["| epoch | runs | sentiment validation accuracy % | kind validation accuracy % |", "|---|---|---|---|"]
    for e in range(len(controls[0]["validation"])):
        s = stats(r["validation"][e]["sentiment"] for r in controls)
        k = stats(r["validation"][e]["kind"] for r in controls)
        lines.append(f"| {e + 1} | {s[2]} | {fmt(s[0], s[1])} | {fmt(k[0], k[1])} |")
    return lines


ATTACK_COLS = [("variant", "variant", False), ("n", "N", False), ("task", "task", False), ("runs", "runs", False),
               ("success", "success %", True), ("net_success", "net success %", True),
               ("clean_accuracy", "clean accuracy %", True), ("success_epoch1", "success % (epoch 1)", True),
               ("net_success_epoch1", "net % (epoch 1)", True), ("clean_accuracy_epoch1", "clean % (epoch 1)", True)]
DEFENCE_COLS = [("ranker", "ranker", False), ("runs", "runs (recall / removal)", False), ("recall@0.01", "recall@1%", True),
                ("recall@0.05", "recall@5%", True), ("recall@0.1", "recall@10%", True),
                ("poisons_removed", "poisons in top 5%", True), ("success", "success %", True),
                ("net_success", "net success %", True), ("clean_accuracy", "clean accuracy %", True)]


def report_part(args, out: Path, data) -> dict:
    records = read_records(out)
    runs = {r["key"]: r for r in records if r["type"] == "run"}
    rankers = [seed_rankers(out, s) for s in sorted({r["seed"] for r in records if r["type"] == "rankers"})]
    commands = sorted({r["command"] for r in records if r["type"] == "command"})
    attack = attack_rows(runs, args.seeds)
    defence = defence_rows(runs, rankers, args.n_poison) if rankers else []
    (out / "attack.json").write_text(json.dumps(attack, indent=1))
    (out / "defence.json").write_text(json.dumps(defence, indent=1))
    secs = stats(r["seconds"] for r in runs.values())
    loads = stats(r["load"] for r in runs.values())
    notes = (out / "notes.md").read_text().strip().splitlines() + [""] if (out / "notes.md").is_file() else []
    lines = ["# Instruction-tuning poisons against SmolLM2-135M-Instruct (Wan et al. 2023), and finding them", "",
             *notes,
             ("Commands (from the repository root; the parts recorded in this folder, then `--part report` with the "
              "same settings):"), "",
             "```", *commands, "```", "",
             (f"Data: {json.dumps(data.settings)}; {len(data.train)} training pairs, {len(data.validation)} "
              f"validation (the defender's queries and the epoch check), {len(data.heldout)} held-out (every score)."),
             (f"Victim: last {args.last_k} block(s), {args.epochs} epochs, AdamW lr {args.lr:g} ({args.schedule}"
              f"{f', {args.warmup_steps} warm-up steps' if args.warmup_steps else ''}), batch {args.batch_size} "
              "(seeded, weight decay 0, from the base weights every run)."),
             (f"{len(runs)} tuning runs, {fmt(secs[0], secs[1], pct=False)} s each (load average "
             f"{fmt(loads[0], loads[1], pct=False)} on the shared 2 cores). Values: mean ± sd over seeds, in %."), "",
             ("## Attack (poisons planted in the sentiment task; residual = the N = "
             f"{args.n_poison} set with all but N of its poisons removed)"), "", *table(attack, ATTACK_COLS), ""]
    if defence:
        lines += [(f"## Defence at N = {args.n_poison} (dirty-label): recall, then each ranker's top "
                  f"{100 * args.remove:g}% removed and tuned again with the same seed (sentiment task)"), "",
                  *table(defence, DEFENCE_COLS), ""]
    lines += ["## Validation accuracy per epoch (never-poisoned runs)", "", *validation_lines(runs), ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    head = {f"{r['ranker']}_{k}": r[k][0] for r in defence for k in ("recall@0.05", "net_success") if k in r}
    return {**head, "runs": len(runs)}


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from influent.data.instructions import build_instructions
    from influent.models.instruction_lm import TrainSettings, load_instruction_lm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_instructions({"sentiment": tuple(args.sentiment), "kind": tuple(args.kind)},
                              max_words=args.max_words, seed=args.data_seed)
    if args.part == "report":
        print(json.dumps(report_part(args, out, data)))
        return
    append_record(out, args.part, {"type": "command", "key": f"command/{args.part}/{time.time()}",
                                   "command": "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv)})
    settings = TrainSettings(last_k=args.last_k, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             schedule=args.schedule, warmup_steps=args.warmup_steps)
    lm = load_instruction_lm(args.base_model, settings, cache_dir=args.cache_dir, progress=False)
    log(f"{args.part}: {len(data.train)} train, {len(data.validation)} validation, {len(data.heldout)} held-out; "
        f"{len(lm.cache.states)} prefix states cached")
    t0 = time.perf_counter()
    parts = {"attack": attack_part, "defence": defence_part, "removals": removals_part, "noise": noise_part}
    parts[args.part](lm, data, args, out)
    lm.save_cache()
    print(json.dumps({"part": args.part, "seconds": time.perf_counter() - t0, "load_average_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
