"""Time one fine-tuning step (8 sequences x T tokens, forward + backward) of SmolLM2-135M-Instruct: the full
model with the last K blocks trainable vs the cached-prefix fast path (influent.models.causal_prefix), K = 2 and 1,
in one process (same load). Prints one JSON line: seconds per step, speed-ups, the prefix pass, the loss gap.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/causal_prefix_speed.py 64
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
from influent.data.lm_text import lm_batches, pair_sequence
from influent.models.causal_lm import CausalLMTask, freeze_all_but_last_blocks, load_causal_lm
from influent.models.causal_prefix import (
    CachedCausalTask,
    CausalSuffix,
    PrefixCache,
    ScoredPair,
    cached_batches,
)

t=time.time(); model, tok = load_causal_lm(None, progress=False); print("load", time.time()-t, file=sys.stderr, flush=True)
T=int(sys.argv[1]) if len(sys.argv)>1 else 64
g=torch.Generator().manual_seed(0)
pairs=[ScoredPair(tuple(torch.randint(100,40000,(T-1,),generator=g).tolist()), (2731,)) for _ in range(8)]
full=lm_batches([pair_sequence(p.prompt_ids,p.completion_ids,tok) for p in pairs], 8, tok.pad_token_id)[0]
def step(m, task, b):
    t=time.time(); loss=task.per_example_loss(m,b).mean(); loss.backward(); return time.time()-t
res={"T":T}
for k in (2,1):
    freeze_all_but_last_blocks(model, k)
    res[f"full_k{k}"]=min(step(model, CausalLMTask(), full) for _ in range(2))
    suffix=CausalSuffix(model,k); cache=PrefixCache(model,k)
    t=time.time(); fast=cached_batches(cache,pairs,8)[0]; res[f"prefix_k{k}"]=time.time()-t
    res[f"suffix_k{k}"]=min(step(suffix, CachedCausalTask(), fast) for _ in range(3))
    with torch.no_grad():
        a=CausalLMTask().per_example_loss(model,full); b=CachedCausalTask().per_example_loss(suffix,fast)
    res[f"maxdiff_k{k}"]=float((a-b).abs().max()); res[f"speedup_k{k}"]=res[f"full_k{k}"]/res[f"suffix_k{k}"]
res["load"] = os.getloadavg()[0]
print(json.dumps(res), flush=True)
