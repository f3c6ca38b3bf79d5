"""Where influent's LM EK-FAC time goes (scratch profile behind the README's pass-cost figures).

Run from the worktree root: ``OMP_NUM_THREADS=1 PYTHONPATH=src python
benchmarks/results/lm-vs-kronfluence/profile_influent.py``. Same model shape and 1,000 pairs as
``lm_vs_kronfluence.py`` but 200 pre-training snippets and one epoch each (timing only, not fidelity).
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

from influent.data.lm_text import lm_batches
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import CausalLMTask, mlp_pattern

torch.set_num_threads(1)
args = SimpleNamespace(seed=0, n_pretrain=200, n_train=1000, n_query=20, vocab=2000, max_length=32, hidden=128,
                       intermediate=512, layers=2, pretrain_epochs=1, finetune_epochs=1, damping=None, batch_size=32)
_, model, train, queries, _ = bench.build_model(args)
tb, qb = lm_batches(train, 32, 0), lm_batches(queries, len(queries), 0)
method = FactoredInfluence(model, CausalLMTask(), tb, FactorConfig(strategy="ekfac", modules=mlp_pattern(model)),
                           progress=False)
t0 = time.perf_counter()
for b in tb:  # one plain forward + backward (all parameter gradients) over the training data
    CausalLMTask().per_example_loss(model, b).sum().backward()
print("plain forward+backward pass", round(time.perf_counter() - t0, 2), "s")
prof = cProfile.Profile()
prof.enable()
t0 = time.perf_counter()
method.fit()
t1 = time.perf_counter()
method.pairwise_scores(qb)
t2 = time.perf_counter()
prof.disable()
print("fit", round(t1 - t0, 2), "s; scores", round(t2 - t1, 2), "s")
pstats.Stats(prof).sort_stats("tottime").print_stats(12)
