"""Query latency of the gradient index at 100,000 rows of the fine-tuned MiniLM classifier's real width.

The rows are random values (float32, N(0, 1)), not gradients: building 100,000 real rows through MiniLM
takes hours on 2 cores, and the product and top-k do not depend on the values. The width is the real
one: the classifier built from the packaged all-MiniLM-L6-v2 configuration (random weights, no corpus),
last ``--last-k`` layers + pooler + head trainable, projection rank ``--rank`` per side. Shards are
written through :mod:`influent.index.shards` and read memory-mapped (warm page cache after the first
query). Per query: one forward/backward of the query (64 random tokens) through that model with
LinearCapture and the projection (``query_vectors``, identity preconditioner) and the streaming top-10
(``top_k``); median and 95th percentile over ``--reps`` queries, with the load average.

Run: ``.venv/bin/python benchmarks/index_latency.py --rows 100000 --out benchmarks/results/index/latency.json``
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


def fake_index(folder: Path, model, rows: int, rank: int, shard_rows: int) -> dict:
    """An identity-strategy index of ``rows`` random rows of the model's real width."""
    from influent import store
    from influent.curvature.linear_grads import module_shapes, select_linear_modules
    from influent.index import shards
    from influent.index.build import IndexConfig, module_slices
    from influent.index.projection import projections

    config = IndexConfig(rank=rank, modules="trainable", strategy="identity", shard_size=shard_rows)
    shapes = module_shapes(select_linear_modules(model, "trainable"))
    proj = projections(shapes, rank, 0)
    width = sum(p.width for p in proj.values())
    gen = torch.Generator().manual_seed(0)
    entries = []
    for s, start in enumerate(range(0, rows, shard_rows)):
        m = min(shard_rows, rows - start)
        shards.write_shard(folder, s, torch.randn(m, width, generator=gen), torch.arange(start, start + m), "bench")
        entries.append({"file": shards.shard_path(Path("."), s).name, "start": start, "rows": m, "sha256": ""})
    manifest = {"format": 1, "key": "bench", "config": config.__dict__, "n_examples": rows, "width": width,
                "bytes_per_example": 4 * width, "shards": entries, "damping_per_module": None,
                "modules": {n: {"shape": list(shapes[n]), "projected": [p.p_out.shape[0], p.p_in.shape[0]],
                                "columns": list(module_slices(proj)[n])} for n, p in proj.items()}}
    store.write_json(folder / shards.MANIFEST, manifest)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--last-k", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from influent.index import GradientIndex
    from influent.models.finetuned import FinetunedTask

    model, config = classifier(args.last_k)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifest = fake_index(Path(tmp), model, args.rows, args.rank, args.shard_rows)
        write_s = time.perf_counter() - started
        index = GradientIndex(tmp)
        task = FinetunedTask()
        gen = torch.Generator().manual_seed(1)
        times, backward, topk = [], [], []
        for rep in range(args.reps + 1):
            batch = {"input_ids": torch.randint(1000, config.vocab_size, (1, 64), generator=gen),
                     "attention_mask": torch.ones(1, 64, dtype=torch.long), "labels": torch.tensor([rep % 2])}
            t0 = time.perf_counter()
            vec = index.query_vectors(model, task, [batch])
            t1 = time.perf_counter()
            index.top_k(vec, 10)
            t2 = time.perf_counter()
            if rep:  # the first query warms the page cache
                times.append(t2 - t0)
                backward.append(t1 - t0)
                topk.append(t2 - t1)
    result = {
        "rows": args.rows, "rows_are": "random N(0,1) values of the real width (not gradients)",
        "model": "all-MiniLM-L6-v2 classifier architecture, random weights", "last_k": args.last_k,
        "rank": args.rank, "width": manifest["width"], "bytes_per_example": manifest["bytes_per_example"],
        "index_gib": args.rows * manifest["bytes_per_example"] / 2**30, "write_seconds": write_s,
        "reps": args.reps, "median_s": float(np.median(times)), "p95_s": float(np.percentile(times, 95)),
        "median_backward_s": float(np.median(backward)), "median_top_k_s": float(np.median(topk)),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
