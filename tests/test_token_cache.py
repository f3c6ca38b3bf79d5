"""Training token cache: scores from stored token factors equal scores from fresh passes."""

from __future__ import annotations

import pytest
import torch
from test_factored import BertTask, chunks, make_bert, mixed_batches, trimmed

from influent.factored_influence import FactorConfig, fit_factors, pairwise_scores, self_scores

torch.set_num_threads(1)


class CountingTask(BertTask):
    """BertTask that counts training-loss evaluations (one per training batch pass)."""

    def __init__(self):
        self.calls = 0

    def per_example_loss(self, model, batch):
        self.calls += 1
        return super().per_example_loss(model, batch)

    def query_measurement(self, model, batch):  # queries are not counted
        return BertTask.per_example_loss(self, model, batch)


def cache_files(root):
    return sorted((root / "train-tokens").glob("*/batch-*.safetensors"))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_scores_from_cache_equal_fresh_passes(strategy, tmp_path):
    """First call writes the cache (scores unchanged), second call reads it without any pass."""
    model, batch = make_bert(n=23)
    task = CountingTask()
    train = mixed_batches(batch, 23, 5)
    f = fit_factors(model, task, train, FactorConfig(strategy=strategy), progress=False)
    queries = [trimmed(chunks(batch, 23, 4)[1])]
    ref = pairwise_scores(model, task, f, queries, train, progress=False)
    ref_self = self_scores(model, task, f, train, progress=False)

    first = pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    torch.testing.assert_close(first, ref, rtol=1e-9, atol=1e-12)
    assert len(cache_files(tmp_path)) == 5  # 23 examples re-formed into batches of 5 by length

    task.calls = 0
    second = pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    assert task.calls == 0  # no training pass: everything came from the cache
    torch.testing.assert_close(second, ref, rtol=1e-9, atol=1e-12)
    cached_self = self_scores(model, task, f, train, progress=False, train_cache=tmp_path)
    assert task.calls == 0
    torch.testing.assert_close(cached_self, ref_self, rtol=1e-9, atol=1e-12)
    low = pairwise_scores(model, task, f, queries, train, progress=False, query_rank=2)
    low_cached = pairwise_scores(model, task, f, queries, train, progress=False, query_rank=2, train_cache=tmp_path)
    if strategy in ("kfac", "ekfac"):  # rank 2 of the query in the eigenbasis = rank 2 in the parameters'
        torch.testing.assert_close(low_cached, low, rtol=1e-8, atol=1e-12)


def test_ekfac_fit_writes_the_cache_scoring_reads(tmp_path):
    """The empirical-Fisher EK-FAC fit stores the rotated tokens of its eigenvalue pass; scoring the same
    batches then runs no pass, and a missing or damaged batch file is recomputed and rewritten."""
    model, batch = make_bert(n=23)
    task = CountingTask()
    train = mixed_batches(batch, 23, 5)
    cfg = FactorConfig(strategy="ekfac")
    ref_f = fit_factors(model, task, train, cfg, progress=False)
    queries = [trimmed(chunks(batch, 23, 4)[1])]
    ref = pairwise_scores(model, task, ref_f, queries, train, progress=False)

    f = fit_factors(model, task, train, cfg, progress=False, train_cache=tmp_path)
    files = cache_files(tmp_path)
    assert len(files) == 5
    task.calls = 0
    got = pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    assert task.calls == 0
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)

    files[1].unlink()
    files[3].write_bytes(b"not a safetensors file")
    task.calls = 0
    got = pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    assert task.calls == 2  # only the two bad batches were recomputed
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    assert len(cache_files(tmp_path)) == 5
    task.calls = 0
    pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    assert task.calls == 0  # and rewritten


def test_cache_is_keyed_by_data_factors_and_task(tmp_path):
    """Other training examples, other factors or another fit never read a cache written for these."""
    model, batch = make_bert(n=23)
    task = CountingTask()
    train = mixed_batches(batch, 23, 5)
    f = fit_factors(model, task, train, FactorConfig(strategy="ekfac"), progress=False)
    queries = [trimmed(chunks(batch, 23, 4)[1])]
    pairwise_scores(model, task, f, queries, train, progress=False, train_cache=tmp_path)
    assert len(list((tmp_path / "train-tokens").iterdir())) == 1

    flipped = [dict(b, labels=(b["labels"] + 1) % 3) for b in train]  # same inputs, other labels
    ref = pairwise_scores(model, task, f, queries, flipped, progress=False)
    got = pairwise_scores(model, task, f, queries, flipped, progress=False, train_cache=tmp_path)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    f2 = fit_factors(model, task, train, FactorConfig(strategy="ekfac", damping=0.3), progress=False)
    ref2 = pairwise_scores(model, task, f2, queries, train, progress=False)
    got2 = pairwise_scores(model, task, f2, queries, train, progress=False, train_cache=tmp_path)
    torch.testing.assert_close(got2, ref2, rtol=1e-9, atol=1e-12)
    assert len(list((tmp_path / "train-tokens").iterdir())) == 3


def test_cache_over_the_size_limit_is_not_written(tmp_path):
    model, batch = make_bert(n=12)
    task = BertTask()
    train = chunks(batch, 12, 6)
    f = fit_factors(model, task, train, FactorConfig(strategy="ekfac"), progress=False)
    queries = [chunks(batch, 12, 4)[0]]
    ref = pairwise_scores(model, task, f, queries, train, progress=False)
    with pytest.warns(UserWarning, match="training token cache skipped"):
        got = pairwise_scores(
            model, task, f, queries, train, progress=False, train_cache=tmp_path, train_cache_max_bytes=1000
        )
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert not (tmp_path / "train-tokens").exists()
