"""Regenerate the poison tables: attacks on the head and the audit against known poison / mislabels.

Usage (bundled Rotten Tomatoes + packaged MiniLM, CPU):

    python benchmarks/poison.py --seeds 0 1 2 --out benchmarks/results/poison

Writes ``poison.json`` (every row, every seed, the settings) and ``poison.md`` (mean +- sd over seeds) into
``--out``. Each part can be run alone with ``--parts``. Every number is measured on the evaluation half of
the held-out split (clean labels), which no attack or defence ever sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from influent.attacks.experiment import from_setup
from influent.attacks.label_flip import targeted_attack, untargeted_attack
from influent.attacks.perturb import perturb_attack
from influent.attacks.summary import summarise
from influent.attacks.trigger import make_trigger_poison, trigger_attack
from influent.data.split import stratified_sample
from influent.defenses.evaluate import mislabel_experiment, trigger_defense
from influent.pipeline import prepare_head
from influent.store import write_json

PARTS = ("mislabel", "trigger", "label-flip", "perturb", "mislabel-finetuned", "concealed")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(mean: float, sd: float, pct: bool = True) -> str:
    if pct:
        return f"{100 * mean:.1f} ± {100 * sd:.1f}"
    return f"{mean:.3f} ± {sd:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def ranker_rows(results: list[dict], metrics: list[str], extra=None) -> list[dict]:
    """Flatten per-seed ranker results into rows {ranker, metric...} for summarise."""
    rows = []
    for res in results:
        for name, r in res["rankers"].items():
            row = {"ranker": name, **{m: r[m] for m in metrics}}
            if extra:
                row.update(extra(r))
            rows.append(row)
    return rows


def mislabel_md(results: list[dict]) -> str:
    metrics = ["auroc", "auprc", "recall@5%", "recall@10%", "recall@20%", "recall@30%", "accuracy_after_fix"]
    summ = summarise(ranker_rows(results, metrics), ["ranker"], metrics)
    acc_clean = [r["accuracy_clean_model"] for r in results]
    acc_noisy = [r["accuracy_noisy_model"] for r in results]
    head = (
        f"10% random label flips ({results[0]['n_flipped']} of {results[0]['n']}), {len(results)} seeds. "
        f"Eval accuracy: never-noised model {fmt(np.mean(acc_clean), np.std(acc_clean, ddof=1) if len(acc_clean) > 1 else 0)}, "
        f"noisy model {fmt(np.mean(acc_noisy), np.std(acc_noisy, ddof=1) if len(acc_noisy) > 1 else 0)} (%).\n\n"
    )
    rows = [
        [s["ranker"]] + [fmt(s[f"{m}_mean"], s[f"{m}_sd"], pct=m not in ("auroc", "auprc")) for m in metrics]
        for s in sorted(summ, key=lambda s: -s["recall@10%_mean"])
    ]
    return head + table(
        [
            "ranker",
            "AUROC",
            "AUPRC",
            "recall@5% (%)",
            "recall@10% (%)",
            "recall@20% (%)",
            "recall@30% (%)",
            "eval acc. after fixing top 10% (%)",
        ],
        rows,
    )


def trigger_defense_md(results: list[dict]) -> str:
    metrics = ["auroc", "auprc", "recall@k=n_bad", "recall@1%", "recall@5%"]
    removal = list(results[0]["rankers"]["random"]["after_removal"])

    def extra(r):
        out = {}
        for k in removal:
            out[f"acc@{k}"] = r["after_removal"][k]["clean_accuracy"]
            out[f"asr@{k}"] = r["after_removal"][k]["attack_success"]
        return out

    vals = metrics + [f"{p}@{k}" for k in removal for p in ("acc", "asr")]
    summ = summarise(ranker_rows(results, metrics, extra), ["ranker"], vals)
    ctrl = [r["control"] for r in results]
    pois = [r["poisoned"] for r in results]

    def ms(xs):
        return fmt(np.mean(xs), np.std(xs, ddof=1) if len(xs) > 1 else 0.0)

    head = (
        f"N = {results[0]['n_poison']} dirty-label poisons with trigger {results[0]['trigger']!r}, {len(results)} seeds. "
        f"Never-poisoned control: clean acc. {ms([c['clean_accuracy'] for c in ctrl])}, trigger rate "
        f"{ms([c['attack_success'] for c in ctrl])}; poisoned: clean acc. {ms([p['clean_accuracy'] for p in pois])}, "
        f"attack success {ms([p['attack_success'] for p in pois])} (%). Query rankers use the validation half's "
        "negative reviews with the trigger inserted, at their true label; the others never see the trigger.\n\n"
    )
    rows = [
        [s["ranker"]]
        + [fmt(s[f"{m}_mean"], s[f"{m}_sd"], pct=m not in ("auroc", "auprc")) for m in metrics]
        + [
            f"{fmt(s[f'acc@{k}_mean'], s[f'acc@{k}_sd'])} / {fmt(s[f'asr@{k}_mean'], s[f'asr@{k}_sd'])}"
            for k in removal
        ]
        for s in sorted(summ, key=lambda s: -s["auroc_mean"])
    ]
    hdr = ["ranker", "AUROC", "AUPRC", "recall@k=N (%)", "recall@1% (%)", "recall@5% (%)"]
    hdr += [f"remove {k}: clean acc. / attack success (%)" for k in removal]
    return head + table(hdr, rows)


def trigger_attack_md(rows: list[dict]) -> str:
    vals = ["attack_success", "control_success", "net_success", "clean_accuracy", "clean_accuracy_control"]
    summ = summarise(rows, ["n_poison"], vals)
    return table(
        [
            "N poisons",
            "attack success (%)",
            "control (%)",
            "net (%)",
            "clean acc. (%)",
            "clean acc. control (%)",
        ],
        [[s["n_poison"]] + [fmt(s[f"{v}_mean"], s[f"{v}_sd"]) for v in vals] for s in summ],
    )


def label_flip_md(untargeted: list[dict], targeted: list[dict]) -> str:
    su = summarise(untargeted, ["strategy", "budget"], ["clean_accuracy", "clean_loss", "accuracy_drop"])
    st = summarise(targeted, ["strategy", "budget"], ["flipped", "target_prob_true", "clean_accuracy"])
    a = table(
        [
            "strategy",
            "budget (% of train)",
            "eval clean acc. (%)",
            "acc. drop (points)",
            "eval clean loss (nats)",
        ],
        [
            [
                s["strategy"],
                f"{100 * s['budget']:g}",
                fmt(s["clean_accuracy_mean"], s["clean_accuracy_sd"]),
                fmt(s["accuracy_drop_mean"], s["accuracy_drop_sd"]),
                fmt(s["clean_loss_mean"], s["clean_loss_sd"], False),
            ]
            for s in su
        ],
    )
    b = table(
        [
            "strategy",
            "budget (% of train)",
            "targets flipped (%)",
            "target p(true label)",
            "eval clean acc. w/o targets (%)",
        ],
        [
            [
                s["strategy"],
                f"{100 * s['budget']:g}",
                fmt(s["flipped_mean"], s["flipped_sd"]),
                fmt(s["target_prob_true_mean"], s["target_prob_true_sd"], False),
                fmt(s["clean_accuracy_mean"], s["clean_accuracy_sd"]),
            ]
            for s in st
        ],
    )
    return (
        "Untargeted (raise clean loss; attacker optimises the validation half):\n\n"
        + a
        + "\n\nTargeted (one attack per target review; sd over seeds of the per-seed mean):\n\n"
        + b
    )


def perturb_md(rows: list[dict]) -> str:
    s = summarise(rows, ["eps", "k"], ["flipped", "target_prob_true", "clean_accuracy"])
    return table(
        [
            "eps (L2, x feature norm)",
            "poisoned examples",
            "targets flipped (%)",
            "target p(true label)",
            "eval clean acc. (%)",
        ],
        [
            [
                r["eps"],
                r["k"],
                fmt(r["flipped_mean"], r["flipped_sd"]),
                fmt(r["target_prob_true_mean"], r["target_prob_true_sd"], False),
                fmt(r["clean_accuracy_mean"], r["clean_accuracy_sd"]),
            ]
            for r in s
        ],
    )


def concealed_md(res: dict, args) -> str:
    """Attack, audit and removal tables of :func:`~influent.attacks.concealed_experiment.run_concealed`."""
    run0 = res["runs"][0]
    head = (
        f"Trigger {args.trigger!r} ({run0['source']} -> {run0['target']}); victim: MiniLM, last layer + pooler + "
        f"head fine-tuned (AdamW, {args.concealed_epochs} epochs) on a {run0['n_train']}-review stratified slice; "
        f"poisons crafted against the clean model with {args.concealed_curvature} curvature (HotFlip, top-40 "
        f"candidates re-scored, {run0['banned_token_count']} vocabulary ids banned), none containing the "
        f"trigger (asserted); success on {res['rows'][0]['n_triggered_eval']} triggered evaluation-half "
        f"source reviews; {len(res['seeds'])} seed(s), mean ± sd.\n"
    )
    attack = table(
        ["poisons", "attack success (%)", "never-poisoned (%)", "net success (%)", "clean acc. (%)",
         "clean acc. never-poisoned (%)", "crafting seconds"],
        [
            [r["n_poison"]]
            + [fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in
               ("attack_success", "control_success", "net_success", "clean_accuracy", "clean_accuracy_control")]
            + [f"{r['poison_seconds_mean']:.0f} ± {r['poison_seconds_sd']:.0f}"]
            for r in sorted(res["summary"], key=lambda r: r["n_poison"])
        ],
    )
    metrics = ["auroc", "auprc", "recall@k=n_bad", "recall@1%", "recall@5%", "recall@10%"]
    audit = table(
        ["ranker (largest N)", "AUROC", "AUPRC", "recall@|poison| (%)", "recall@1% (%)", "recall@5% (%)",
         "recall@10% (%)"],
        [
            [r["ranker"]] + [fmt(r[f"{m}_mean"], r[f"{m}_sd"], pct=m not in ("auroc", "auprc")) for m in metrics]
            for r in sorted(res["audit_summary"], key=lambda r: -r["recall@5%_mean"])
        ],
    )
    removal = table(
        ["top 5% removed by", "poisons removed", "attack success (%)", "net success (%)", "clean acc. (%)"],
        [
            [r["ranker"], f"{r['poisons_removed_mean']:.1f} ± {r['poisons_removed_sd']:.1f}"]
            + [fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in ("attack_success", "net_success", "clean_accuracy")]
            for r in res["removal_summary"]
        ],
    )
    examples = "\n".join(
        f"- `{p['start']}` -> `{p['text']}`" for p in run0["poisons"][:3]
    )
    intro = f"Strongest poisons of seed {run0['seed']} (start -> crafted):\n"
    parts = [head, attack, "", audit, "", removal, "", intro, examples]
    return "\n".join(parts)


def per_seed_mean(rows: list[dict], keys: list[str], values: list[str]) -> list[dict]:
    """Average rows within each (seed, keys) group first, so sd is across seeds."""
    out = []
    for r in summarise(rows, ["seed"] + keys, values):
        out.append({**{k: r[k] for k in ["seed"] + keys}, **{v: r[f"{v}_mean"] for v in values}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/poison")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--trigger", default="james bond")
    ap.add_argument("--trigger-sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--defense-n", type=int, default=50, help="poison count audited in the trigger defence")
    ap.add_argument("--flip-targets", type=int, default=3)
    ap.add_argument("--flip-rounds", type=int, default=1, help="greedy rounds per budget (untargeted)")
    ap.add_argument("--perturb-targets", type=int, default=3)
    ap.add_argument("--perturb-eps", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--ft-train-size", type=int, default=1000, help="fine-tuned mislabel run: training slice")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-last-k", type=int, default=1)
    ap.add_argument("--concealed-sizes", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--concealed-train-size", type=int, default=1000)
    ap.add_argument("--concealed-epochs", type=int, default=3)
    ap.add_argument("--concealed-curvature", default="ekfac", choices=["ekfac", "kfac", "diagonal", "identity"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    setup = prepare_head(progress=False)
    results: dict = {"settings": vars(args), "head": setup.info}
    md = [
        f"# Poison benchmark (seeds {args.seeds})\n",
        "Command: `python benchmarks/poison.py " + " ".join(sys.argv[1:]) + "`\n",
    ]

    def save():
        results["seconds"] = time.time() - t0
        write_json(out / "poison.json", results)
        (out / "poison.md").write_text("\n".join(md) + "\n")

    if "mislabel" in args.parts:
        res = []
        for seed in args.seeds:
            log(f"mislabel seed {seed}")
            res.append(mislabel_experiment(from_setup(setup, seed)))
        results["mislabel"] = res
        md += ["## Mislabel audit (head)\n", mislabel_md(res), ""]
        save()
    if "trigger" in args.parts:
        rows, defense = [], []
        for seed in args.seeds:
            exp = from_setup(setup, seed)
            log(f"trigger attack seed {seed}")
            rows += [dict(r, seed=seed) for r in trigger_attack(exp, tuple(args.trigger_sizes), args.trigger)]
            log(f"trigger defence seed {seed}")
            defense.append(trigger_defense(exp, make_trigger_poison(exp, args.defense_n, args.trigger)))
            results["trigger_attack"], results["trigger_defense"] = rows, defense
            save()
        md += [
            "## Trigger poisons (dirty-label, head)\n",
            trigger_attack_md(rows),
            "",
            "## Trigger audit (head)\n",
            trigger_defense_md(defense),
            "",
        ]
        save()
    if "label-flip" in args.parts:
        un, tg = [], []
        for seed in args.seeds:
            exp = from_setup(setup, seed)
            log(f"label-flip untargeted seed {seed}")
            un += [dict(r, seed=seed) for r in untargeted_attack(exp, rounds_per_budget=args.flip_rounds)]
            log(f"label-flip targeted seed {seed}")
            tg += [dict(r, seed=seed) for r in targeted_attack(exp, args.flip_targets)]
            results["label_flip_untargeted"], results["label_flip_targeted"] = un, tg
            save()
        tg_seed = per_seed_mean(tg, ["strategy", "budget"], ["flipped", "target_prob_true", "clean_accuracy"])
        md += ["## Label-flip attack (head)\n", label_flip_md(un, tg_seed), ""]
        save()
    if "perturb" in args.parts:
        rows = []
        for seed in args.seeds:
            exp = from_setup(setup, seed)
            for eps in args.perturb_eps:
                log(f"perturb seed {seed} eps {eps}")
                rows += [dict(r, seed=seed) for r in perturb_attack(exp, args.perturb_targets, (1, 5), eps)]
            results["perturb"] = rows
            save()
        md += [
            "## Training-input perturbation attack (head)\n",
            perturb_md(per_seed_mean(rows, ["eps", "k"], ["flipped", "target_prob_true", "clean_accuracy"])),
            "",
        ]
        save()
    if "mislabel-finetuned" in args.parts:
        from influent.defenses.finetuned_mislabel import finetuned_mislabel_experiment

        res = []
        for seed in args.seeds:
            exp = from_setup(setup, seed)
            # the one training-slice sampler (#11): stratified by label, seeded as the old uniform draw was
            idx = stratified_sample(exp.train_y.numpy(), args.ft_train_size, seed + 5)
            ev = np.arange(len(exp.eval_y))  # the whole evaluation half
            log(f"fine-tuned mislabel seed {seed}")
            res.append(
                finetuned_mislabel_experiment(
                    [exp.train_texts[i] for i in idx],
                    exp.train_y.numpy()[idx],
                    [exp.eval_texts[i] for i in ev],
                    exp.eval_y.numpy()[ev],
                    seed=seed,
                    epochs=args.ft_epochs,
                    last_k=args.ft_last_k,
                )
            )
            results["mislabel_finetuned"] = res
            save()
        md += [
            "## Mislabel audit (fine-tuned classifier, EK-FAC)\n",
            (
                f"Last {args.ft_last_k} layer(s) + pooler + head, {args.ft_epochs} epochs (seeded AdamW on cached "
                "prefix hidden states); the last column restores the flipped labels among the ranker's top 10% "
                "and fine-tunes again.\n"
            ),
            mislabel_md(res),
            "",
        ]
        save()
    if "concealed" in args.parts:
        from influent.attacks.concealed_experiment import run_concealed

        log(f"concealed poisons, seeds {args.seeds}")
        res = run_concealed(
            seeds=args.seeds,
            sizes=tuple(args.concealed_sizes),
            trigger=args.trigger,
            train_size=args.concealed_train_size,
            epochs=args.concealed_epochs,
            curvature=args.concealed_curvature,
            progress=False,
        )
        results["concealed"] = res
        md += ["## Concealed trigger poisons (fine-tuned classifier)\n", concealed_md(res, args), ""]
        save()
    log(f"done in {time.time() - t0:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
