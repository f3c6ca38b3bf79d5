"""Where influent's LM EK-FAC time goes (scratch profile behind the README's pass-cost figures).

Run from the worktree root: ``OMP_NUM_THREADS=1 PYTHONPATH=src python
benchmarks/results/lm-vs-kronfluence/profile_influent.py``. Same model shape and 1,000 pairs as
``lm_vs_kronfluence.py`` but 200 pre-training snippets and one epoch each (timing only, not fidelity).
Prints, in one process: a plain forward + backward over the training data (every parameter's gradient),
influent's capture pass alone (the tracked modules' activations and output gradients, no curvature work),
the default fit (one pass, captures kept in memory) and scores (from those tokens), the same with
``memory_max_bytes=0`` (two fit passes, a scoring pass), then cProfile of the default fit + scores.
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lm_vs_kronfluence as bench

from influent.curvature.linear_grads import captured_passes, select_linear_modules
from influent.data.lm_text import lm_batches
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import CausalLMTask, mlp_pattern
from influent.task import length_buckets

torch.set_num_threads(1)
args = SimpleNamespace(seed=0, n_pretrain=200, n_train=1000, n_query=20, vocab=2000, max_length=32, hidden=128,
                       intermediate=512, layers=2, pretrain_epochs=1, finetune_epochs=1, damping=None, batch_size=32)
_, model, train, queries, _ = bench.build_model(args)
tb, qb = lm_batches(train, 32, 0), lm_batches(queries, len(queries), 0)
cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(model))


def timed(label, fn):
    t0 = time.perf_counter()
    out = fn()
    print(label, round(time.perf_counter() - t0, 2), "s", flush=True)
    return out


def plain():
    for b in tb:
        CausalLMTask().per_example_loss(model, b).sum().backward()
    model.zero_grad()


def capture():
    modules = select_linear_modules(model, mlp_pattern(model))
    for _ in captured_passes(model, CausalLMTask(), modules, length_buckets(tb)[0]):
        pass


for rep in range(2):
    timed("plain forward+backward pass (all parameter gradients)", plain)
    timed("capture pass (tracked modules' a and g, no curvature work)", capture)
two = FactoredInfluence(model, CausalLMTask(), tb, cfg, progress=False, memory_max_bytes=0)
timed("fit, memory off (two passes)", two.fit)
timed("scores, memory off (a pass over the training data)", lambda: two.pairwise_scores(qb))
method = FactoredInfluence(model, CausalLMTask(), tb, cfg, progress=False)
prof = cProfile.Profile()
prof.enable()
timed("fit, default (one pass)", method.fit)
timed("scores, default (from the tokens kept in memory)", lambda: method.pairwise_scores(qb))
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
