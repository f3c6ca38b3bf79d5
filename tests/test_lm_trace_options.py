"""``trace`` options on tiny LLaMA-config models built in code: the margin measurement, ``--fit-size``, the
rankings, and the cached candidate index.

Independent truths: the margin by hand from the logits (a loop over positions, the other tokens' logits
cut out explicitly); per-example gradients by autograd of the hand measurements on one unpadded sequence at
a time; the dense EK-FAC matrix formed from the gradients of exactly the fitted sample; self-influences and
norms as dense quadratic forms; candidates of a freshly built index.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import (
    FACTS,
    dense_ekfac_inverse,
    dense_gradients,
    hand_margin_measurement,
    mlp_modules,
    tiny_lm_folder,
)

from influent.cli import main
from influent.data.lm_text import lm_batches, pair_ids, pair_sequence, tokenize_documents
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.lm_pipeline import fit_sample
from influent.models.causal_lm import CausalLMTask, load_causal_lm, mlp_pattern
from influent.trace import ranking_values

DAMPING = 0.05


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tiny_lm_folder(tmp_path_factory.mktemp("llama"), "llama", seed=3)
    model, tokenizer = load_causal_lm(str(folder))
    model = model.double()
    docs = [(f, None) for f in FACTS[:6]] + [("the capital of italy", "is rome"), ("the cat", "sat on the mat")]
    seqs = tokenize_documents(tokenizer, docs, max_length=8)
    query = pair_sequence(*pair_ids(tokenizer, "where is the capital of france", "paris and rome"), tokenizer)
    train = [dense_gradients(model, mlp_modules(model), s) for s in seqs]
    return model, tokenizer, seqs, query, train


def method_for(model, tokenizer, seqs, measurement="loss", fit=None, cache_dir=None):
    pad = tokenizer.pad_token_id
    return FactoredInfluence(model, CausalLMTask(measurement), lm_batches(seqs, 3, pad),
                             FactorConfig(strategy="ekfac", modules=mlp_pattern(model), damping=DAMPING),
                             progress=False, cache_dir=cache_dir,
                             fit_batches=None if fit is None else lm_batches(fit, 3, pad))


def quad(a: dict, inverses: dict, b: dict) -> float:
    return sum(float(a[n].reshape(-1) @ inverses[n] @ b[n].reshape(-1)) for n in a)


def test_margin_measurement_equals_hand_computation(llama):
    model, tokenizer, _, query, _ = llama
    other = pair_sequence(*pair_ids(tokenizer, "the dog", "ran to the big old sea and the river"), tokenizer)
    batch = lm_batches([query, other], 2, tokenizer.pad_token_id)[0]  # the query is padded in its batch
    got = CausalLMTask("margin").query_measurement(model, batch)
    for k, seq in enumerate([query, other]):
        targets = [t for t, m in enumerate(seq.loss_mask) if m]
        want = float(hand_margin_measurement(model, list(seq.input_ids), targets).detach())
        assert float(got[k].detach()) == pytest.approx(want, rel=1e-10)
    loss = CausalLMTask("loss").query_measurement(model, batch)
    assert torch.all(got < loss)  # -margin <= NLL: logsumexp over the others is below logsumexp over all
    with pytest.raises(ValueError, match="measurement"):
        CausalLMTask("accuracy")


def test_margin_scores_equal_dense_definition(llama):
    model, tokenizer, seqs, query, train = llama
    method = method_for(model, tokenizer, seqs, "margin")
    qbatch = lm_batches([query], 1, tokenizer.pad_token_id)
    got = method.pairwise_scores(qbatch)[0]
    gq = dense_gradients(model, mlp_modules(model), query, measure=hand_margin_measurement)[0]
    inverses = dense_ekfac_inverse(*[[t[k] for t in train] for k in range(3)], DAMPING)
    want = torch.tensor([quad(gq, inverses, gi) for gi, _, _ in train], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    loss_scores = method_for(model, tokenizer, seqs, "loss").pairwise_scores(qbatch)[0]
    assert not torch.allclose(got, loss_scores, rtol=1e-3)  # a different measurement, the same factors


def test_fit_size_fits_on_a_seeded_sample_and_scores_equal_dense_definition(llama, tmp_path):
    model, tokenizer, seqs, query, train = llama
    sample = fit_sample(seqs, 4, seed=1)
    assert fit_sample(seqs, 4, seed=1) == sample  # seeded
    assert fit_sample(seqs, 4, seed=2) != sample
    assert fit_sample(seqs, None, 0) == seqs and fit_sample(seqs, 8, 0) == seqs
    with pytest.raises(ValueError, match="fit_size"):
        fit_sample(seqs, 9, 0)
    full = method_for(model, tokenizer, seqs, cache_dir=tmp_path)
    part = method_for(model, tokenizer, seqs, fit=sample, cache_dir=tmp_path)
    again = method_for(model, tokenizer, seqs, fit=fit_sample(seqs, 4, seed=1), cache_dir=tmp_path)
    assert full.factors.n_examples == 8 and part.factors.n_examples == 4
    assert part.factors.manifest["key"] == again.factors.manifest["key"] != full.factors.manifest["key"]
    assert len(list((tmp_path / "factors").iterdir())) == 2  # the sample has its own cache entry
    for name, t in part.factors.tensors.items():
        assert torch.equal(t, again.factors.tensors[name]), name

    qbatch = lm_batches([query], 1, tokenizer.pad_token_id)
    got = part.pairwise_scores(qbatch)[0]
    assert got.shape == (8,)  # every training sequence is scored, against the sample's curvature
    positions = [next(i for i, s in enumerate(seqs) if s is x) for x in sample]
    fitted = [train[i] for i in positions]
    inverses = dense_ekfac_inverse(*[[t[k] for t in fitted] for k in range(3)], DAMPING)
    gq = dense_gradients(model, mlp_modules(model), query)[0]
    want = torch.tensor([quad(gq, inverses, gi) for gi, _, _ in train], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("rank", ["relatif", "cosine"])
def test_rankings_equal_dense_definitions(llama, rank):
    model, tokenizer, seqs, query, train = llama
    method = method_for(model, tokenizer, seqs)
    qbatch = lm_batches([query], 1, tokenizer.pad_token_id)[0]
    scores = method.pairwise_scores([qbatch])[0].numpy()
    inverses = dense_ekfac_inverse(*[[t[k] for t in train] for k in range(3)], DAMPING)
    gq = dense_gradients(model, mlp_modules(model), query)[0]
    own = np.array([quad(gi, inverses, gi) for gi, _, _ in train])
    want = np.array([quad(gq, inverses, gi) for gi, _, _ in train]) / np.sqrt(own)
    if rank == "cosine":
        want = want / np.sqrt(quad(gq, inverses, gq))
        assert np.all(np.abs(want) <= 1 + 1e-9)
    got = ranking_values(method, rank, scores, qbatch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    subset = [5, 0, 7]  # the candidate path: self-influences of the scored subset only
    sub = ranking_values(method, rank, scores[subset], qbatch, lm_batches([seqs[i] for i in subset], 2, 0))
    np.testing.assert_allclose(sub, want[subset], rtol=1e-6)
    assert np.array_equal(ranking_values(method, "influence", scores, qbatch), scores)


def test_candidate_index_is_cached_and_a_damaged_entry_rebuilt(tmp_path, monkeypatch):
    from influent import retrieval

    texts = [*FACTS, "paris is a big old city on the river", "rome and paris"]
    query = "is paris the capital of france"
    fresh = {m: retrieval.CandidateFilter(texts).top(query, 5, m) for m in ("tfidf", "bm25")}
    relevance = {m: retrieval.CandidateFilter(texts).relevance(query, m) for m in ("tfidf", "bm25")}
    for m in ("tfidf", "bm25"):
        assert np.array_equal(retrieval.CandidateFilter(texts, cache_dir=tmp_path).top(query, 5, m), fresh[m])
    assert len(list((tmp_path / "retrieval").glob("*/index.json"))) == 2

    def no_build(texts):
        raise AssertionError("the index was rebuilt instead of read from the cache")

    with monkeypatch.context() as patch:
        patch.setattr(retrieval, "build_tfidf", no_build)
        patch.setattr(retrieval, "build_bm25", no_build)
        for m in ("tfidf", "bm25"):
            cached = retrieval.CandidateFilter(texts, cache_dir=tmp_path)
            assert np.array_equal(cached.top(query, 5, m), fresh[m])
            assert np.array_equal(cached.relevance(query, m), relevance[m])
        other = retrieval.CandidateFilter(texts[:-1], cache_dir=tmp_path)  # another corpus: another key
        with pytest.raises(AssertionError, match="rebuilt"):
            other.top(query, 5, "tfidf")

    for path in (tmp_path / "retrieval").glob("*/index.safetensors"):
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF  # flip a byte of the tensor data: the checksum no longer matches
        path.write_bytes(bytes(raw))
    for m in ("tfidf", "bm25"):
        with pytest.warns(UserWarning, match="damaged"):
            assert np.array_equal(retrieval.CandidateFilter(texts, cache_dir=tmp_path).top(query, 5, m), fresh[m])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # rewritten: read back without a warning
            assert np.array_equal(retrieval.CandidateFilter(texts, cache_dir=tmp_path).top(query, 5, m), fresh[m])


# ------------------------------------------------------------------------------------------------ CLI
def test_trace_options_reach_the_json(tmp_path, capsys):
    folder = tiny_lm_folder(tmp_path / "model", "llama")
    data = tmp_path / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    base = ["trace", "--data", str(data), "--base-model", str(folder), "--cache-dir", str(tmp_path / "cache"),
            "--last-k", "-1", "--epochs", "1", "--lr", "1e-2", "--batch-size", "4", "--quiet",
            "--prompt", "the capital of italy", "--completion", "is rome", "--json"]

    def run(*extra):
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain = run("--top", "10")
    assert plain["ranking"] == "influence" and plain["query"]["measurement"] == "loss"
    assert plain["query"]["measurement_value"] == pytest.approx(plain["query"]["loss"])
    score = {r["id"]: r["score"] for r in plain["results"]}
    for rank in ("relatif", "cosine"):
        ranked = run("--top", "10", "--rank", rank)
        assert ranked["ranking"] == rank
        values = [r["rank_value"] for r in ranked["results"]]
        assert values == sorted(values, reverse=True)
        for r in ranked["results"]:  # the raw influence is kept beside the ranking value
            assert r["score"] == pytest.approx(score[r["id"]], rel=1e-4)  # float32 model, two runs
            assert r["loss_change"] == pytest.approx(r["score"] / 10)
            assert np.sign(r["rank_value"]) == np.sign(r["score"])
        if rank == "cosine":
            assert all(abs(v) <= 1 + 1e-9 for v in values)
    passes = run("--top", "10", "--memory-gb", "0")  # no tokens kept: scores from a pass over the data
    assert {r["id"]: r["score"] for r in passes["results"]} == pytest.approx(score, rel=1e-4)
    assert main([*base, "--memory-gb", "-1"]) == 2
    assert "--memory-gb" in capsys.readouterr().err
    margin = run("--measurement", "margin")
    assert margin["query"]["measurement"] == "margin"
    assert margin["query"]["measurement_value"] < margin["query"]["loss"]
    sampled = run("--fit-size", "5", "--top", "10")
    assert sorted(r["id"] for r in sampled["results"]) == sorted(score)  # all scored, other factors
    assert [r["score"] for r in sampled["results"]] != [r["score"] for r in plain["results"]]
    assert main([*base, "--fit-size", "11"]) == 2
    assert "--fit-size" in capsys.readouterr().err


def test_demo_lm_runs_end_to_end_and_again_from_the_caches(tmp_path, monkeypatch, capsys):
    """``influent demo lm`` with a tiny LLaMA in place of SmolLM2 (the real run is timed in docs/lm.md)."""
    from influent import lm_pipeline
    from influent.curvature import fitting
    from influent.models import causal_lm

    folder = tiny_lm_folder(tmp_path / "model", "llama", context=64)
    monkeypatch.setattr(lm_pipeline, "load_causal_lm", lambda name, progress=True: load_causal_lm(str(folder)))
    argv = ["demo", "lm", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--lm-pairs", "10", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "completion given" in printed and "completion generated" in printed
    result = json.loads((tmp_path / "out" / "demo_lm_traces.json").read_text())
    given, generated = result["traces"]
    with (tmp_path / "out" / "demo_lm_train.csv").open(newline="") as fh:
        train_rows = list(csv.DictReader(fh))
    assert len(train_rows) == 8 and result["model"]["n_sequences"] == 8
    assert {r["completion"] for r in train_rows} == {"positive", "negative"}
    prompts = {r["prompt"].split("\n")[0] for r in train_rows}
    for t in (given, generated):  # the queries are held out
        assert t["query"]["prompt"].split("\n")[0] not in prompts
    assert given["kind"] == "completion given" and generated["kind"] == "completion generated (greedy)"
    for t in (given, generated):
        assert t["candidates"] == {"method": "all", "kept": 8, "of": 8} and len(t["results"]) == 3
        assert t["query"]["loss"] > 0
        for row in t["results"]:
            assert abs(sum(x["score"] for x in row["tokens"]) - row["score"]) <= 1e-5 * abs(row["score"])

    def no_rerun(*args, **kwargs):
        raise AssertionError("the second run fine-tuned or fitted again instead of reading the caches")

    monkeypatch.setattr(causal_lm, "fine_tune", no_rerun)
    monkeypatch.setattr(lm_pipeline, "fine_tune", no_rerun)
    monkeypatch.setattr(fitting.FitContext, "run_pass", no_rerun)
    assert main(argv) == 0
    again = json.loads((tmp_path / "out" / "demo_lm_traces.json").read_text())
    for first, second in zip(result["traces"], again["traces"]):
        assert [r["id"] for r in first["results"]] == [r["id"] for r in second["results"]]
        for a, b in zip(first["results"], second["results"]):
            assert b["score"] == pytest.approx(a["score"], rel=1e-4)
