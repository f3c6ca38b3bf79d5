"""Time influent's EK-FAC pairwise scoring on the fine-tuned MiniLM, with and without length bucketing.

Uses a model saved by ``ekfac_vs_kronfluence.py --finetuned-dir DIR`` (or ``influent train``), the first
``--n-train`` snippets of the seed-0 fine-tuning slice of Rotten Tomatoes (``--n-finetune``, drawn as
``ekfac_vs_kronfluence.rotten_tomatoes_slices`` does: the library's de-duplicated corpus, split and
stratified sampler) as training set and ``--n-query`` held-out ones as queries (batches of 32, max length 64, all ``nn.Linear`` modules), EK-FAC factors fitted on the first
``--n-fit`` snippets (cached under ``--cache-dir``). The variants run alternately in one process,
``--reps`` times, so machine load affects both; wall and CPU seconds and load averages are printed, then
one JSON line. ``--profile`` adds a cProfile of the bucketed variant (top 15 by own time).

Run: ``.venv/bin/python benchmarks/ekfac_scoring.py --finetuned-dir /tmp/ekb/ft1024``
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetuned-dir", required=True)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-query", type=int, default=10)
    ap.add_argument("--n-fit", type=int, default=128)
    ap.add_argument("--n-finetune", type=int, default=1024, help="size of the fine-tuning slice the model saw")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/influent"))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ekfac_vs_kronfluence import rotten_tomatoes_slices

    from influent.curvature.config import FactorConfig
    from influent.curvature.fitting import fit_factors
    from influent.factored_influence import pairwise_scores
    from influent.models.finetuned import FinetunedTask, load_finetuned, make_batches
    from influent.task import length_buckets

    size = max(args.n_finetune, args.n_train, args.n_fit)
    texts, labels, test_texts, test_labels = rotten_tomatoes_slices(0, size, 1000)
    model, tok, settings = load_finetuned(args.finetuned_dir)
    length = settings.get("max_length", 64)
    task = FinetunedTask()

    def batches(x, y, size=32):
        return make_batches(tok, x, y, batch_size=size, max_length=length)

    train = batches(texts[: args.n_train], labels[: args.n_train])
    queries = batches(test_texts[: args.n_query], test_labels[: args.n_query], args.n_query)
    t0 = time.perf_counter()
    factors = fit_factors(
        model,
        task,
        batches(texts[: args.n_fit], labels[: args.n_fit]),
        FactorConfig(strategy="ekfac"),
        cache_dir=args.cache_dir,
        progress=False,
    )
    print(f"factors ({args.n_fit} examples): {time.perf_counter() - t0:.1f} s", flush=True)
    n = args.n_train
    rebatched = length_buckets(train)
    inner = rebatched[0] if rebatched is not None else train
    result = {
        "n_train": n,
        "n_query": args.n_query,
        "n_fit": args.n_fit,
        "threads": args.threads,
        "real_tokens_per_example": round(sum(int(b["attention_mask"].sum()) for b in train) / n, 1),
        "padded_tokens_per_example": round(sum(b["attention_mask"].numel() for b in train) / n, 1),
        "bucketed": rebatched is not None,
        "bucketed_padded_tokens_per_example": round(sum(b["attention_mask"].numel() for b in inner) / n, 1),
        "seconds": {},
    }
    scores = {}
    for rep in range(args.reps):
        for bucket in (False, True):
            key = "bucketed" if bucket else "input batches"
            load0 = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            scores[key] = pairwise_scores(model, task, factors, queries, train, progress=False, bucket=bucket)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            result["seconds"].setdefault(key, []).append(round(wall, 2))
            print(
                f"rep {rep} {key}: {wall:.2f} s wall, {cpu:.2f} s CPU "
                f"(load {load0:.1f} -> {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    a, b = scores["input batches"], scores["bucketed"]
    result["relative_difference"] = float((a - b).norm() / a.norm())
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        pairwise_scores(model, task, factors, queries, train, progress=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
