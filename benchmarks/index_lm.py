"""The gradient index on the default causal LM (SmolLM2-135M-Instruct): build cost, size, per-query time,
and kronfluence scoring the same query on the same model.

Training sequences: the first ``--n`` texts of the bundled Rotten Tomatoes corpus (``read_documents(None)``),
tokenized at ``--max-length`` tokens, batches of ``--batch-size``. Model: the packaged SmolLM2-135M-Instruct
with its last ``--last-k`` blocks trainable, *not fine-tuned* (the build's cost does not depend on the
weights; fine-tuning first would add minutes and change nothing measured here). Tracked modules: the MLP
linear modules of the trainable blocks (``influent trace``'s default ``--modules mlp``). The index:
projection rank ``--rank`` per side, EK-FAC fitted in the projected space.

Per query (``--queries`` held-out texts, the next ones of the corpus): ``query_vectors`` (one backward pass)
+ ``top_k`` (10) over the index, median seconds. kronfluence 1.0.1 (EK-FAC, the same tracked modules, the
same summed-NLL loss) fits its factors on the first ``--kf-n`` training sequences and scores the first query
against them; its per-query seconds at ``--n`` sequences are its scoring seconds scaled linearly by
``n / kf_n`` (its scoring runs one backward pass per training sequence, linear in n; the fit is not
counted). With ``--factored`` influent's factored engine (``FactoredInfluence.pairwise_scores``, no token
cache) on the same subset is timed too, scaled the same way. Threads: ``--threads`` (default 1: the machine is shared).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/index_lm.py --n 1000 --kf-n 24 --out benchmarks/results/index/lm-build.json``
Prints progress on stderr, one JSON object last on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def log(msg: str) -> None:
    print(f"[load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def tracked_regex(model) -> str:
    """The trainable MLP linear modules as one regex (what ``influent trace --modules mlp`` tracks)."""
    from influent.curvature.linear_grads import select_linear_modules
    from influent.models.causal_lm import mlp_pattern

    mlp = select_linear_modules(model, mlp_pattern(model))
    names = [n for n, m in mlp.items() if m.weight.requires_grad]
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def run_kronfluence(model, pattern: str, train, query, batch_size: int):
    """``(fit seconds, score seconds, scores [1, m])`` of kronfluence EK-FAC on ``train`` (padded sequences)."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from kronfluence.utils.dataset import DataLoaderKwargs

    from influent.models.causal_lm import CausalLMTask

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)]
    ours = CausalLMTask()

    class KfTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            return ours.per_example_loss(model, batch).sum()

        def compute_measurement(self, batch, model):
            return ours.per_example_loss(model, batch).sum()

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    def as_items(batches):
        return [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]

    def collate(items):
        width = max(int(it["input_ids"].shape[0]) for it in items)
        pad = {k: torch.stack([nn.functional.pad(it[k], (0, width - it[k].shape[0])) for it in items])
               for k in items[0]}
        return pad

    kmodel = prepare_model(copy.deepcopy(model).eval(), KfTask())
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="lm", model=kmodel, task=KfTask(), cpu=True, output_dir=out,
                            disable_tqdm=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=as_items(train), per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                                 overwrite_output_dir=True)
        fit_s = time.perf_counter() - t0
        log(f"kronfluence fit {fit_s:.1f} s")
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name="s", factors_name="ekfac", query_dataset=as_items([query]),
                                         train_dataset=as_items(train), per_device_query_batch_size=1,
                                         per_device_train_batch_size=batch_size, score_args=ScoreArguments(),
                                         overwrite_output_dir=True)
        score_s = time.perf_counter() - t0
        scores = analyzer.load_pairwise_scores("s")["all_modules"].double()
    return fit_s, score_s, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--last-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--kf-n", type=int, default=64, help="training sequences kronfluence scores (0: skip)")
    ap.add_argument("--factored", action="store_true", help="also time influent's factored engine on the subset")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index-dir", default=None, help="keep the index here (default: a temporary folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from influent.curvature.config import FactorConfig
    from influent.data.lm_text import lm_batches, read_documents, tokenize_documents
    from influent.factored_influence import FactoredInfluence
    from influent.index import GradientIndex, IndexConfig, build_index
    from influent.models.causal_lm import CausalLMTask, freeze_all_but_last_blocks, load_causal_lm

    load = {"start": list(os.getloadavg())}
    t0 = time.perf_counter()
    model, tok = load_causal_lm(None, progress=False)
    freeze_all_but_last_blocks(model, args.last_k)
    docs = read_documents("rotten_tomatoes")
    seqs = tokenize_documents(tok, docs[: args.n + args.queries], args.max_length)
    train, held = seqs[: args.n], seqs[args.n: args.n + args.queries]
    pad = int(tok.pad_token_id)
    batches = lm_batches(train, args.batch_size, pad)
    log(f"model and {len(train)} sequences ({sum(len(s.input_ids) for s in train)} tokens) in "
        f"{time.perf_counter() - t0:.1f} s")
    task, pattern = CausalLMTask(), tracked_regex(model)
    tmp = tempfile.TemporaryDirectory(prefix="influent-lm-index-")
    folder = Path(args.index_dir or tmp.name)
    t0 = time.perf_counter()
    manifest = build_index(model, task, batches, folder, IndexConfig(rank=args.rank, modules=pattern,
                                                                     shard_size=512), progress=False)
    build_s = time.perf_counter() - t0
    load["after_build"] = list(os.getloadavg())
    log(f"index build {build_s:.1f} s ({manifest['build_seconds']:.1f} s of passes), "
        f"{manifest['bytes_per_example']} bytes per example")
    index = GradientIndex(folder)
    queries = lm_batches(held, 1, pad)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.top_k(index.query_vectors(model, task, [q]), 10)
        times.append(time.perf_counter() - t0)
    load["after_queries"] = list(os.getloadavg())
    log(f"index per query: median {np.median(times):.3f} s")
    result = {
        "n_sequences": len(train), "tokens": sum(len(s.input_ids) for s in train), "max_length": args.max_length,
        "batch_size": args.batch_size, "last_k": args.last_k, "rank": args.rank,
        "modules": list(manifest["modules"]), "width": manifest["width"],
        "bytes_per_example": manifest["bytes_per_example"],
        "index_bytes": sum((folder / s["file"]).stat().st_size for s in manifest["shards"]),
        "build_s": round(build_s, 2), "build_passes_s": round(manifest["build_seconds"], 2),
        "build_s_per_sequence": round(build_s / len(train), 4),
        "index_query_s": [round(t, 4) for t in times], "index_query_median_s": round(float(np.median(times)), 4),
        "threads": args.threads, "load": load,
    }
    print(json.dumps(result), flush=True)  # the index's figures, in case what follows fails
    if args.kf_n > 0:
        sub = batches[: max(1, args.kf_n // args.batch_size)]
        m = sum(int(b["input_ids"].shape[0]) for b in sub)
        if args.factored:
            method = FactoredInfluence(model, task, sub, FactorConfig(strategy="ekfac", modules=pattern),
                                       progress=False)
            method.fit()
            t0 = time.perf_counter()
            ours = method.pairwise_scores(queries[:1])
            inf_s = time.perf_counter() - t0
            log(f"influent factored engine: {inf_s:.1f} s for 1 query x {m} sequences")
            result.update({"factored_subset": m, "factored_score_s": round(inf_s, 2),
                           "factored_query_s_at_n": round(inf_s * len(train) / m, 2),
                           "speedup_vs_factored": round(inf_s * len(train) / m / float(np.median(times)), 1)})
        try:
            kf_fit, kf_s, theirs = run_kronfluence(model, pattern, sub, queries[0], args.batch_size)
        except Exception as exc:  # noqa: BLE001 - report, keep the index's figures
            result["kronfluence_error"] = f"{type(exc).__name__}: {exc}"
        else:
            scale = len(train) / m
            if args.factored:
                a, b = ours.numpy().ravel(), theirs.numpy().ravel()
                result["kronfluence_vs_factored_pearson"] = round(float(np.corrcoef(a, b)[0, 1]), 4)
            result.update({
                "kronfluence_subset": m, "kronfluence_fit_s": round(kf_fit, 2), "kronfluence_score_s": round(kf_s, 2),
                "kronfluence_query_s_at_n": round(kf_s * scale, 2),
                "speedup_vs_kronfluence": round(kf_s * scale / float(np.median(times)), 1),
            })
        load["end"] = list(os.getloadavg())
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
