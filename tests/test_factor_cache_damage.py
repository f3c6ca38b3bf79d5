"""A damaged factor-cache or token-cache file is recomputed with a one-line warning, never used.

One byte is flipped in each kind of file the factored engine reads back (``factors.safetensors``,
``manifest.json``, the partial / finished-stage / eigendecomposition checkpoints of an interrupted fit, a
training token-cache batch); the scores then equal those of a clean run without any cache. The store
(:mod:`influent.store`) checksums every file; the factor manifest also pins its factors file.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_factored import BertTask, chunks, make_bert

from influent.curvature import strategies
from influent.factored_influence import FactorConfig, FactoredInfluence, fit_factors

torch.set_num_threads(1)
CFG = FactorConfig(strategy="ekfac")


def flip_byte(path, where: float = 0.6) -> None:
    """XOR one byte ``where`` of the way into ``path`` (for safetensors: in the tensor data)."""
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


class Interrupt(Exception):
    pass


class StoppingTask(BertTask):
    """BertTask whose ``stop_at``-th training-loss evaluation raises (a killed fit)."""

    def __init__(self):
        self.calls, self.stop_at = 0, None

    def per_example_loss(self, model, batch):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise Interrupt
        return super().per_example_loss(model, batch)

    def query_measurement(self, model, batch):  # queries are not counted
        return BertTask.per_example_loss(self, model, batch)


@pytest.fixture(scope="module")
def setup():
    model, batch = make_bert(n=20)
    train = chunks(batch, 20, 2)  # 10 batches per pass
    queries = chunks(batch, 20, 4)[0]
    clean = FactoredInfluence(model, BertTask(), train, CFG, progress=False)
    return model, train, queries, clean.pairwise_scores(queries)


def scores_with_cache(model, task, train, queries, tmp_path, train_cache=False):
    method = FactoredInfluence(
        model, task, train, CFG, cache_dir=tmp_path, train_cache=train_cache, progress=False
    )
    return method.pairwise_scores(queries)


def assert_recomputed(record, scores, reference):
    messages = [str(w.message) for w in record if "damaged" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["factors.safetensors", "manifest.json"])
@pytest.mark.parametrize("where", [0.02, 0.6])
def test_damaged_factor_file_is_refitted(setup, tmp_path, name, where):
    model, train, queries, reference = setup
    scores_with_cache(model, BertTask(), train, queries, tmp_path)
    (path,) = tmp_path.rglob(name)
    flip_byte(path, where)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = scores_with_cache(model, BertTask(), train, queries, tmp_path)
    assert_recomputed(record, got, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refitted entry is whole again: read without a warning
        torch.testing.assert_close(scores_with_cache(model, BertTask(), train, queries, tmp_path), reference)


@pytest.mark.parametrize("checkpoint", ["partial-lambda", "eigen", "stage-covariance"])
def test_damaged_checkpoint_of_an_interrupted_fit_is_recomputed(setup, tmp_path, checkpoint, monkeypatch):
    model, train, queries, reference = setup
    task = StoppingTask()
    if checkpoint == "stage-covariance":  # killed in the eigendecomposition, after the covariance pass
        monkeypatch.setattr(strategies.EighOnce, "__call__", lambda *a: (_ for _ in ()).throw(Interrupt()))
    else:  # killed in the eigenvalue pass after its checkpoint at batch 4
        task.stop_at = 10 + 6
    with pytest.raises(Interrupt):
        fit_factors(model, task, train, CFG, cache_dir=tmp_path, checkpoint_every=4, progress=False,
                    memory_max_bytes=0)  # two passes: the second writes the lambda checkpoints
    monkeypatch.undo()
    (path,) = tmp_path.rglob(f"{checkpoint}.safetensors")
    flip_byte(path)
    task.stop_at = None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = scores_with_cache(model, task, train, queries, tmp_path)
    assert_recomputed(record, got, reference)


def test_damaged_token_cache_file_is_recomputed(setup, tmp_path):
    model, train, queries, reference = setup
    task = StoppingTask()  # the token cache is keyed by the task's class: the same one both times
    scores_with_cache(model, task, train, queries, tmp_path, train_cache=True)
    files = sorted((tmp_path / "train-tokens").rglob("batch-*.safetensors"))
    assert len(files) == 10
    flip_byte(files[2])
    task.calls = 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = scores_with_cache(model, task, train, queries, tmp_path, train_cache=True)
    assert task.calls == 1  # only the damaged batch ran a pass
    assert_recomputed(record, got, reference)


def test_intact_factor_file_of_another_fit_is_not_used(setup, tmp_path):
    """The manifest pins its factors file's checksum: a whole, valid file from another fit is refitted."""
    model, train, queries, reference = setup
    scores_with_cache(model, BertTask(), train, queries, tmp_path / "a")
    other = FactoredInfluence(
        model, BertTask(), train, FactorConfig(strategy="ekfac", fisher="true"), cache_dir=tmp_path / "b",
        progress=False,
    )
    other.fit()
    (mine,), (theirs,) = (tmp_path / "a").rglob("factors.safetensors"), (tmp_path / "b").rglob("factors.safetensors")
    mine.write_bytes(theirs.read_bytes())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = scores_with_cache(model, BertTask(), train, queries, tmp_path / "a")
    assert_recomputed(record, got, reference)
