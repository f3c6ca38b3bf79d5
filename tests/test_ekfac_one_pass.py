"""One-pass EK-FAC fit and scores from the training tokens kept in memory, on a tiny LLaMA-config LM.

Independent truth: the two-pass fit (a second forward/backward pass recomputes every capture) and the
scores of an engine that keeps nothing in memory (a pass over the training data per scoring); pass counts
are counted on the task, not read from the engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import FACTS, tiny_lm_folder

from influent.data.lm_text import lm_batches, pair_ids, pair_sequence, tokenize_documents
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import CausalLMTask, load_causal_lm, mlp_pattern
from influent.task import length_buckets

torch.set_num_threads(1)


class CountingLMTask(CausalLMTask):
    """Counts forward passes of training batches (training loss or sampled labels; queries not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def per_example_loss(self, model, batch):
        self.calls += 1
        return super().per_example_loss(model, batch)

    def query_measurement(self, model, batch):
        return CausalLMTask.per_example_loss(self, model, batch)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model, tok = load_causal_lm(str(tiny_lm_folder(tmp_path_factory.mktemp("llama"), "llama", seed=3)))
    docs = [(f, None) for f in FACTS] + [("the capital of italy", "is rome"), ("the cat", "sat on the mat")]
    train = lm_batches(tokenize_documents(tok, docs, max_length=8), 3, tok.pad_token_id)
    queries = lm_batches([pair_sequence(*pair_ids(tok, "the capital of spain", "is madrid"), tok),
                          pair_sequence(*pair_ids(tok, "the dog", "ran to the sea"), tok)], 2, tok.pad_token_id)
    return model, train, queries


def engine(model, train, fisher="empirical", **kw):
    task = CountingLMTask()
    cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(model), fisher=fisher, seed=1)
    return task, FactoredInfluence(model, task, train, cfg, progress=False, **kw)


def test_one_pass_fit_equals_two_pass_fit(lm):
    model, train, _ = lm
    one_task, one = engine(model, train)
    two_task, two = engine(model, train, memory_max_bytes=0)
    one.fit()
    two.fit()
    n_batches = len(length_buckets(train)[0])  # the passes run over the batches re-formed by length
    assert one_task.calls == n_batches and two_task.calls == 2 * n_batches
    assert one.factors.tensors.keys() == two.factors.tensors.keys()
    for key, value in two.factors.tensors.items():  # eigenvectors, covariance eigenvalues, corrected Lambda
        torch.testing.assert_close(one.factors.tensors[key], value, rtol=1e-6, atol=1e-12)
    assert one.factors.damping == pytest.approx(two.factors.damping, rel=1e-6)


def test_scores_from_memory_equal_scores_with_passes(lm):
    model, train, queries = lm
    task, method = engine(model, train)
    _, reference = engine(model, train, memory_max_bytes=0)
    want = reference.pairwise_scores(queries)
    want_self = reference.self_scores()
    method.fit()
    task.calls = 0
    got = method.pairwise_scores(queries)
    got_self = method.self_scores()
    assert task.calls == 0  # every training batch came from memory
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    torch.testing.assert_close(got_self, want_self, rtol=1e-4, atol=1e-6 * float(want_self.abs().max()))

    with torch.no_grad():  # any in-place change of a parameter drops the kept tokens: passes again
        next(model.parameters()).mul_(1.0)
    method.pairwise_scores(queries)
    assert task.calls > 0
    calls = task.calls
    torch.testing.assert_close(method.pairwise_scores(queries), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert task.calls == calls  # ... which the pass kept again


def test_over_the_budget_two_passes_and_a_pass_per_scoring(lm):
    model, train, queries = lm
    task, method = engine(model, train, memory_max_bytes=1000)  # far below the tokens' size
    method.fit()
    fit_calls = task.calls
    method.pairwise_scores(queries)
    method.pairwise_scores(queries)
    assert task.calls == 2 * fit_calls  # fit: two passes; each scoring: one pass over the same batches


def test_true_fisher_scores_do_not_read_the_sampled_captures():
    """The true-Fisher fit keeps (and replays) gradients at sampled labels; scores need the training
    loss's, so they run their pass. Fit and scores equal the two-pass engine's (test_factored's BERT)."""
    from test_factored import BertTask, chunks, make_bert

    class Counting(BertTask):
        calls = 0

        def model_output(self, model, batch):
            Counting.calls += 1
            return super().model_output(model, batch)

    model, batch = make_bert(n=12)
    train, queries = chunks(batch, 12, 3), chunks(batch, 12, 4)[:1]
    cfg = FactorConfig(strategy="ekfac", fisher="true", seed=2)
    method = FactoredInfluence(model, Counting(), train, cfg, progress=False)
    reference = FactoredInfluence(model, BertTask(), train, cfg, progress=False, memory_max_bytes=0)
    method.fit()
    assert Counting.calls == len(train)  # one pass
    for key, value in reference.factors.tensors.items():
        torch.testing.assert_close(method.factors.tensors[key], value, rtol=1e-6, atol=1e-12)
    got = method.pairwise_scores(queries)
    assert Counting.calls == 2 * len(train) + 1  # a pass over the training batches, plus the query batch
    want = reference.pairwise_scores(queries)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_sums_equal_the_products_they_replace(dtype):
    """GramSums (syrk between flushes, rows shared by consecutive keys, sharing that changes from batch to
    batch) against plain float64 ``x^T x`` added key by key."""
    from influent.curvature.passes import GramSums

    gen = torch.Generator().manual_seed(0)
    sums = {k: torch.zeros(5, 5, dtype=torch.float64) for k in "abcd"}
    want = {k: torch.zeros(5, 5, dtype=torch.float64) for k in "abcd"}
    grams = GramSums()
    for step in range(8):
        x, y = torch.randn(9, 5, generator=gen, dtype=dtype), torch.randn(9, 5, generator=gen, dtype=dtype)
        b_rows = x if step in (0, 1, 4, 5, 6) else y  # b: a's rows in some batches, its own in others
        feed = [("a", x), ("c", x), ("b", b_rows), ("d", x)]  # d shares a's rows only when b does
        for key, rows in feed:
            grams.add(key, rows, source=rows)
            want[key] += rows.double().T @ rows.double()
        if step == 2:
            grams.flush(sums)
    grams.flush(sums)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for key, value in want.items():
        torch.testing.assert_close(sums[key], value, rtol=tol, atol=tol)
