"""Fit probe for lm_lds.py: trains the full model (2,000 snippets, seed 0) for each EPOCHS:LR argument and prints
train / query / held-out nats per token, and first the unigram baseline on the held-out snippets.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/results/lm-lds/probe.py 3:3e-3 6:3e-3``."""

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lm_lds as B

from influent.data.lm_text import lm_batches

torch.set_num_threads(1)
texts = B.snippets(0)
tr, q, va = texts[:2000], texts[2000:2040], texts[2040:2540]
tok = B.word_tokenizer(tr, 2000)
train, queries, val = (B.sequences_of(tok, t, 24) for t in (tr, q, va))
cfg = B.llama_config(len(tok), 128, 512, 2, 24)
tb, qb, vb = lm_batches(train, 100, 0), lm_batches(queries, 40, 0), lm_batches(val, 100, 0)


def targets(seqs):
    return sum(sum(x.loss_mask) for x in seqs)


counts = Counter(i for s in train for i in s.input_ids[1:])
total = sum(counts.values())
held = [i for s in val for i in s.input_ids[1:]]
print("unigram val nats/token", -np.mean([math.log((counts[i] + 0.5) / (total + 0.5 * len(tok))) for i in held]))
for ep, lr in [tuple(map(float, a.split(":"))) for a in sys.argv[1:]]:
    t0 = time.perf_counter()
    m = B.train_from_scratch(cfg, train, epochs=int(ep), lr=lr, batch_size=32, seed=0)
    s = time.perf_counter() - t0
    print(json.dumps({"epochs": ep, "lr": lr, "s": round(s, 1), "train": B.losses(m, tb).sum() / targets(train),
                      "query": B.losses(m, qb).sum() / targets(queries), "val": B.losses(m, vb).sum() / targets(val)}))
