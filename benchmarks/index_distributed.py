"""Index build on 1 vs 2 torch.distributed ranks (gloo, CPU): wall time ratio, with the load average.

The model is the MiniLM classifier architecture (packaged all-MiniLM-L6-v2 configuration, random weights,
last 2 layers + pooler + head tracked, as ``benchmarks/index_latency.py``); the data ``--n`` sequences of
``--length`` random tokens in batches of ``--batch-size``; the index rank ``--rank``, EK-FAC in the projected
space, shards of ``--shard-size`` examples. Each configuration runs in fresh processes (``torch.multiprocessing``,
one torch thread per rank, gloo over 127.0.0.1, the same code path as ``torchrun``); the time is rank 0's
wall time of ``build_index`` (the pass, the all-reduces, the preconditioner and the manifest). The two
indexes are checked to hold the same rows (bit for bit). On this shared 2-core machine the ratio also
reflects the scheduler: under a load above 2, two processes get about twice the CPU share one gets.

Run: ``.venv/bin/python benchmarks/index_distributed.py --out benchmarks/results/index/distributed.json``
Prints progress on stderr, one JSON object last on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def data(n: int, length: int, batch_size: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, vocab, (min(batch_size, n - s), length), generator=gen),
             "attention_mask": torch.ones(min(batch_size, n - s), length, dtype=torch.long),
             "labels": torch.randint(0, 2, (min(batch_size, n - s),), generator=gen)} for s in range(0, n, batch_size)]


def one_rank(rank: int, world: int, port: int, folder: str, out: str, args: dict) -> None:
    import torch.distributed as dist
    from index_latency import classifier

    from influent.index import IndexConfig, build_index
    from influent.models.finetuned import FinetunedTask

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, config = classifier(2)
        batches = data(args["n"], args["length"], args["batch_size"], config.vocab_size)
        t0 = time.perf_counter()
        manifest = build_index(model, FinetunedTask(), batches, folder,
                               IndexConfig(rank=args["rank"], shard_size=args["shard_size"]), progress=False)
        seconds = time.perf_counter() - t0
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds, "bytes_per_example": manifest["bytes_per_example"],
                                             "shards": len(manifest["shards"]), "load": os.getloadavg()}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from influent.store import read_tensors

    settings = {k: getattr(args, k) for k in ("n", "length", "batch_size", "rank", "shard_size")}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop("WORLD_SIZE", None)
        for world in (1, 2):
            out = f"{tmp}/w{world}.json"
            load_before = os.getloadavg()
            mp.spawn(one_rank, args=(world, free_port(), f"{tmp}/index-{world}", out, settings), nprocs=world,
                     join=True)
            runs[world] = {**json.loads(Path(out).read_text()), "load_before": load_before}
            print(f"{world} rank(s): {runs[world]['seconds']:.1f} s (load {runs[world]['load'][0]:.1f})",
                  file=sys.stderr, flush=True)
        same = all(torch.equal(read_tensors(f"{tmp}/index-1/{f.name}")["grads"], read_tensors(f)["grads"])
                   for f in sorted(Path(f"{tmp}/index-2").glob("shard-*.safetensors")))
    result = {"settings": settings, "model": "all-MiniLM-L6-v2 classifier architecture, random weights",
              "seconds_1_rank": runs[1]["seconds"], "seconds_2_ranks": runs[2]["seconds"],
              "speedup_2_over_1": runs[1]["seconds"] / runs[2]["seconds"], "same_rows": same, "runs": runs}
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
