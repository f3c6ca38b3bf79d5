"""Query latency of the gradient index at 100,000 rows of the fine-tuned MiniLM classifier's real width.

The rows are random values (N(0, 1)), not gradients: building 100,000 real rows through MiniLM takes hours
on 2 cores, and the product and top-k do not depend on the values. The width is the real one: the
classifier built from the packaged all-MiniLM-L6-v2 configuration (random weights, no corpus), last
``--last-k`` layers + pooler + head trainable, projection rank ``--rank`` per side. Two indexes of the same
rows are written through :mod:`influent.index.shards` (float32, and bfloat16 unless ``--no-bfloat16``) and
read memory-mapped, opened once and kept open across the queries (warm page cache after the first query,
which is not counted). Per query: one forward/backward of the query (64 random tokens) through that model
with LinearCapture and the projection (``query_vectors``, identity preconditioner), then the streaming
top-10 (``top_k``) on each index. The profile splits the float32 top-k into the product alone (reading the
mapped rows and the matrix-vector product, block by block into one buffer) and the rest (per-block
candidates and the merge); ``argsort_merge`` is the previous top-k (a stable argsort of every block merged
with the running list, as before this change), run on the same index in the same process as a peer.
Median and 95th percentile over ``--reps`` queries, with the load average.

Run: ``.venv/bin/python benchmarks/index_latency.py --rows 100000 --reps 20 --out benchmarks/results/index/latency-100k.json``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def classifier(last_k: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from influent.models.finetuned import default_encoder, freeze_all_but_last

    config = AutoConfig.from_pretrained(default_encoder(), num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    freeze_all_but_last(model, last_k)
    return model, config


def fake_index(folder: Path, model, rows: int, rank: int, shard_rows: int, storage: str = "float32") -> dict:
    """An identity-strategy index of ``rows`` random rows of the model's real width (stored as ``storage``)."""
    from influent import store
    from influent.curvature.linear_grads import module_shapes, select_linear_modules
    from influent.index import shards
    from influent.index.build import IndexConfig, module_slices
    from influent.index.projection import projections

    config = IndexConfig(rank=rank, modules="trainable", strategy="identity", shard_size=shard_rows, storage=storage)
    shapes = module_shapes(select_linear_modules(model, "trainable"))
    proj = projections(shapes, rank, 0)
    width = sum(p.width for p in proj.values())
    gen = torch.Generator().manual_seed(0)
    entries = []
    for s, start in enumerate(range(0, rows, shard_rows)):
        m = min(shard_rows, rows - start)
        shards.write_shard(folder, s, torch.randn(m, width, generator=gen), torch.arange(start, start + m), "bench",
                           storage)
        entries.append({"file": shards.shard_path(Path("."), s).name, "start": start, "rows": m, "sha256": ""})
    manifest = {"format": 2, "key": "bench", "config": config.__dict__, "n_examples": rows, "width": width,
                "bytes_per_example": (2 if storage == "bfloat16" else 4) * width, "shards": entries, "damping_per_module": None,
                "modules": {n: {"shape": list(shapes[n]), "projected": [p.p_out.shape[0], p.p_in.shape[0]],
                                "columns": list(module_slices(proj)[n])} for n, p in proj.items()}}
    store.write_json(folder / shards.MANIFEST, manifest)
    return manifest


def argsort_merge_top_k(index, vectors, k: int):
    """The previous streaming top-k: each block's scores stably argsorted together with the running lists."""
    from influent.index import merge_top

    q32 = vectors.float()
    n_q = vectors.shape[0]
    best = (torch.empty(n_q, 0, dtype=torch.float64), torch.empty(n_q, 0, dtype=torch.long))
    worst = best
    for rows, grads in index.shard_blocks():
        s = (q32 @ grads.T).double()
        r = rows.expand(n_q, -1)
        best = merge_top(torch.cat([best[0], s], 1), torch.cat([best[1], r], 1), k, largest=True)
        worst = merge_top(torch.cat([worst[0], s], 1), torch.cat([worst[1], r], 1), k, largest=False)
    return best, worst


def product_only(index, vectors) -> None:
    """Read every mapped row and multiply (the product alone, no selection)."""
    from influent.index.query import BLOCK_ROWS

    q = vectors.to(index.storage_dtype)
    buffer = torch.empty(q.shape[0] * BLOCK_ROWS, dtype=q.dtype)
    for _, grads in index.shard_blocks():
        torch.matmul(q, grads.T, out=buffer[: q.shape[0] * grads.shape[0]].view(q.shape[0], grads.shape[0]))


def summary(times: list[float]) -> dict:
    return {"median_s": round(float(np.median(times)), 4), "p95_s": round(float(np.percentile(times, 95)), 4)}


def timed_queries(indexes: dict, model, config, reps: int, kinds: list[str]) -> dict:
    """Median and p95 of each step over ``reps`` queries (one more first, not counted: it warms the cache)."""
    from influent.models.finetuned import FinetunedTask

    task = FinetunedTask()
    gen = torch.Generator().manual_seed(1)
    timing = {key: [] for key in ("backward", *kinds, "product", "argsort_merge")}
    loads = []
    for rep in range(reps + 1):
        batch = {"input_ids": torch.randint(1000, config.vocab_size, (1, 64), generator=gen),
                 "attention_mask": torch.ones(1, 64, dtype=torch.long), "labels": torch.tensor([rep % 2])}
        marks = [time.perf_counter()]
        vec = indexes["float32"].query_vectors(model, task, [batch])
        marks.append(time.perf_counter())
        for kind in kinds:
            indexes[kind].top_k(vec, 10)
            marks.append(time.perf_counter())
        product_only(indexes["float32"], vec)
        marks.append(time.perf_counter())
        argsort_merge_top_k(indexes["float32"], vec, 10)
        marks.append(time.perf_counter())
        if rep:
            for key, value in zip(timing, np.diff(marks)):
                timing[key].append(float(value))
            loads.append(os.getloadavg()[0])
    out = {f"total_{k}": summary(np.add(timing["backward"], timing[k])) for k in kinds}
    out.update({"backward": summary(timing["backward"]), **{f"top_k_{k}": summary(timing[k]) for k in kinds},
                "product_only_float32": summary(timing["product"]),
                "argsort_merge_float32_previous_top_k": summary(timing["argsort_merge"]),
                "load_average_during": [min(loads), max(loads)]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--last-k", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated (default 1,2)")
    ap.add_argument("--no-bfloat16", action="store_true", help="skip the bfloat16 index")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from influent.index import GradientIndex

    model, config = classifier(args.last_k)
    kinds = ["float32"] + ([] if args.no_bfloat16 else ["bfloat16"])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifests = {kind: fake_index(Path(tmp) / kind, model, args.rows, args.rank, args.shard_rows, kind)
                     for kind in kinds}
        write_s = time.perf_counter() - started
        indexes = {kind: GradientIndex(Path(tmp) / kind) for kind in kinds}
        runs = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            runs[threads] = timed_queries(indexes, model, config, args.reps, kinds)
    base = runs[min(runs)]
    result = {
        "rows": args.rows, "rows_are": "random N(0,1) values of the real width (not gradients)",
        "model": "all-MiniLM-L6-v2 classifier architecture, random weights", "last_k": args.last_k,
        "rank": args.rank, "width": manifests["float32"]["width"],
        "bytes_per_example": {k: m["bytes_per_example"] for k, m in manifests.items()},
        "index_gib": {k: args.rows * m["bytes_per_example"] / 2**30 for k, m in manifests.items()},
        "write_seconds": write_s, "reps": args.reps, "threads_headline": min(runs),
        "median_s": base["total_float32"]["median_s"], "p95_s": base["total_float32"]["p95_s"],
        "per_threads": runs, "load_average_end": os.getloadavg(),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
