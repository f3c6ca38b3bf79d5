"""The gradient index against independent truths: autograd per-example gradients projected densely, the
factored engine, a full sort, an uninterrupted build, and a single-process run (2 gloo ranks)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from influent.curvature.config import FactorConfig
from influent.factored_influence import FactoredInfluence, Factors, fit_factors, pairwise_scores
from influent.index import GradientIndex, IndexConfig, build_index, merge_top, rerank, shards
from influent.index.build import module_slices
from influent.index.projection import projections, random_projection
from influent.task import Task


class TokenModel(nn.Module):
    """Embedding -> Linear -> tanh -> masked mean over tokens -> Linear logits (tokens matter, padding masked)."""

    def __init__(self, vocab: int = 20, d: int = 6, h: int = 5, c: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, h)
        self.out = nn.Linear(h, c)

    def forward(self, ids, mask):
        x = torch.tanh(self.hidden(self.emb(ids)))
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.out((x * m).sum(1) / m.sum(1))


class TokenTask(Task):
    def model_output(self, model, batch):
        return model(batch["input_ids"], batch["attention_mask"])

    def output_loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch["labels"], reduction="none")


def token_data(n: int, batch_size: int = 7, seed: int = 0, width: int = 6):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        ids = torch.randint(1, 20, (b, width), generator=gen)
        lengths = torch.randint(2, width + 1, (b,), generator=gen)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask,
                        "labels": torch.randint(0, 3, (b,), generator=gen)})
    return batches


def tiny_model(seed: int = 0) -> TokenModel:
    torch.manual_seed(seed)
    return TokenModel()


class MLPTask(Task):
    def model_output(self, model, batch):
        return model(batch[0])

    def output_loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1], reduction="none")


def dense_projected(model, task, batches, index_folder) -> torch.Tensor:
    """Rows ``vec(P_out G_i P_in^T)`` from autograd per-example gradients (weight | bias), float64."""
    idx = GradientIndex(index_folder)
    params = dict(model.named_parameters())
    rows = []
    for batch in batches:
        for i in range(task.batch_size(batch)):
            one = {k: v[i: i + 1] for k, v in batch.items()}
            loss = task.per_example_loss(model, one).sum()
            parts = []
            for name, p in idx.projections.items():
                w, b = params[f"{name}.weight"], params[f"{name}.bias"]
                gw, gb = torch.autograd.grad(loss, [w, b], retain_graph=True)
                grad = torch.cat([gw, gb[:, None]], 1).double()
                parts.append((p.p_out.double() @ grad @ p.p_in.double().T).reshape(-1))
            rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_projection_and_scores_equal_the_dense_definition(tmp_path):
    model, task, batches = tiny_model(), TokenTask(), token_data(30)
    manifest = build_index(model, task, batches, tmp_path, IndexConfig(rank=3, modules="all", strategy="identity",
                                                                      shard_size=10), progress=False)
    idx = GradientIndex(tmp_path, verify=True)
    stored = torch.cat([g for _, g in idx.shard_blocks()]).double()
    truth = dense_projected(model, task, batches, tmp_path)
    assert manifest["bytes_per_example"] == 4 * truth.shape[1] == 4 * (3 * 3 + 3 * 3)
    torch.testing.assert_close(stored, truth, rtol=1e-5, atol=1e-7)
    queries = token_data(4, seed=5)
    vectors = idx.query_vectors(model, task, queries)
    torch.testing.assert_close(vectors, dense_projected(model, task, queries, tmp_path), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(idx.pairwise_scores(vectors), vectors @ truth.T, rtol=1e-5, atol=1e-7)


def test_projection_is_seeded_and_orthogonal_rows_are_orthonormal():
    a, b = random_projection(4, 9, seed=3), random_projection(4, 9, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_projection(4, 9, seed=4))
    q = random_projection(4, 9, seed=3, kind="orthogonal").double()
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    p = projections({"m": (5, 7)}, rank=10, seed=0)["m"]
    assert p.p_in.shape == (7, 7) and p.p_out.shape == (5, 5)  # capped at the module's widths


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_full_rank_orthogonal_index_equals_the_factored_engine(tmp_path, strategy):
    """A rotation of each module's gradient space leaves EK-FAC (and dot products) unchanged."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    train = [(x[s: s + 8], y[s: s + 8]) for s in range(0, 40, 8)]
    queries = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    task = MLPTask()
    cfg = IndexConfig(rank=7, modules="all", projection="orthogonal", strategy=strategy, damping=0.05, shard_size=16)
    build_index(model, task, train, tmp_path, cfg, progress=False)
    idx = GradientIndex(tmp_path)
    ours = idx.pairwise_scores(idx.query_vectors(model, task, queries))
    damping = 0.05 if strategy == "ekfac" else 0.0
    exact = FactoredInfluence(model, task, train, FactorConfig(strategy=strategy, modules="all", damping=damping),
                              progress=False).pairwise_scores(queries)
    torch.testing.assert_close(ours, exact, rtol=2e-4, atol=1e-6)


def test_streaming_top_k_equals_a_full_sort(tmp_path):
    model, task, batches = tiny_model(), TokenTask(), token_data(61)
    build_index(model, task, batches, tmp_path, IndexConfig(rank=4, modules="all", shard_size=9), progress=False)
    idx = GradientIndex(tmp_path)
    vectors = idx.query_vectors(model, task, token_data(5, seed=7))
    full = idx.pairwise_scores(vectors)
    top = idx.top_k(vectors, 8)
    order = torch.argsort(full, dim=1, descending=True, stable=True)
    assert torch.equal(top.proponent_rows, order[:, :8])
    assert torch.equal(top.opponent_rows, torch.argsort(full, dim=1, stable=True)[:, :8])
    torch.testing.assert_close(top.proponent_scores, full.gather(1, order[:, :8]))


def test_merge_top_breaks_ties_by_row():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    rows = torch.tensor([[9, 7, 4, 1]])
    s, r = merge_top(scores, rows, 3, largest=True)
    assert r.tolist() == [[4, 7, 1]] and s.tolist() == [[3.0, 3.0, 2.0]]


def test_rerank_gives_the_factored_engines_scores(tmp_path):
    model, task, batches = tiny_model(), TokenTask(), token_data(40)
    build_index(model, task, batches, tmp_path, IndexConfig(rank=2, modules="all", shard_size=16), progress=False)
    idx = GradientIndex(tmp_path)
    queries = token_data(3, seed=9)
    method = FactoredInfluence(model, task, batches, FactorConfig(modules="all"), progress=False)
    top = rerank(idx.top_k(idx.query_vectors(model, task, queries), 12), method, queries, depth=5)
    exact = method.pairwise_scores(queries)
    # the engine scores its training batches from the tokens its one-pass fit kept (in the eigenbasis), rerank
    # runs passes over the candidates: the same scores up to float32 rounding
    torch.testing.assert_close(top.proponent_scores, exact.gather(1, top.proponent_rows), rtol=1e-5, atol=1e-9)
    assert bool((top.proponent_scores[:, :-1] >= top.proponent_scores[:, 1:]).all())
    assert top.proponent_rows.shape == (3, 5)


def test_resume_after_a_killed_build_gives_the_same_shards(tmp_path, monkeypatch):
    model, task, batches = tiny_model(), TokenTask(), token_data(50)
    cfg = IndexConfig(rank=3, modules="all", shard_size=10)
    build_index(model, task, batches, tmp_path / "whole", cfg, progress=False)
    from influent.index import build as build_module

    real, calls = build_module._write, []

    def dies_after_two(folder, index, *rest):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        real(folder, index, *rest)

    monkeypatch.setattr(build_module, "_write", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, task, batches, tmp_path / "resumed", cfg, progress=False)
    assert not (tmp_path / "resumed" / shards.MANIFEST).exists()
    monkeypatch.setattr(build_module, "_write", real)
    manifest = build_index(model, task, batches, tmp_path / "resumed", cfg, progress=False)
    assert manifest["shards_built_this_run"] == len(manifest["shards"]) - 2
    whole = build_index(model, task, batches, tmp_path / "whole", cfg, progress=False)
    assert_same_shards(tmp_path / "resumed", tmp_path / "whole", len(whole["shards"]))
    a, b = GradientIndex(tmp_path / "whole"), GradientIndex(tmp_path / "resumed", verify=True)
    for name in a.pre:
        assert torch.equal(a.pre[name], b.pre[name])


def assert_same_shards(a, b, count: int) -> None:
    """Shard by shard, the same tensors (gradients, rows, covariance sums) bit for bit.

    (Not the files' sha256: safetensors writes its metadata map in no fixed order.)"""
    from influent.store import read_tensors

    for s in range(count):
        left, right = read_tensors(shards.shard_path(a, s)), read_tensors(shards.shard_path(b, s))
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), s


def test_a_folder_of_another_build_is_refused(tmp_path):
    from influent.errors import UserError

    model, task, batches = tiny_model(), TokenTask(), token_data(20)
    build_index(model, task, batches, tmp_path, IndexConfig(rank=2, modules="all"), progress=False)
    with pytest.raises(UserError, match="another build"):
        build_index(model, task, batches, tmp_path, IndexConfig(rank=3, modules="all"), progress=False)


def test_shards_are_memory_mapped(tmp_path):
    model, task, batches = tiny_model(), TokenTask(), token_data(20)
    build_index(model, task, batches, tmp_path, IndexConfig(rank=2, modules="all"), progress=False)
    grads, rows = shards.open_shard(shards.shard_path(tmp_path, 0))
    assert isinstance(grads, np.memmap) and rows.tolist() == list(range(20))
    assert module_slices(GradientIndex(tmp_path).projections)["out"] == (4, 8)


# ------------------------------------------------------------------------------------------ 2 gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, task, batches = tiny_model(), TokenTask(), token_data(61)
        build_index(model, task, batches, folder, IndexConfig(rank=3, modules="all", shard_size=9), progress=False)
        idx = GradientIndex(folder)
        top = idx.top_k(idx.query_vectors(model, task, token_data(4, seed=3)), 6)
        factors = fit_factors(model, task, batches, FactorConfig(modules="all"), progress=False)
        if rank == 0:
            torch.save({"pro": top.proponent_rows, "pro_s": top.proponent_scores, "opp": top.opponent_rows,
                        "factors": factors.tensors, "manifest": factors.manifest}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    model, task, batches = tiny_model(), TokenTask(), token_data(61)
    single = build_index(model, task, batches, tmp_path / "one", IndexConfig(rank=3, modules="all", shard_size=9),
                         progress=False)
    idx = GradientIndex(tmp_path / "one")
    top = idx.top_k(idx.query_vectors(model, task, token_data(4, seed=3)), 6)
    out = str(tmp_path / "top.pt")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "two"), out), nprocs=2, join=True)
    two = GradientIndex(tmp_path / "two", verify=True)
    assert two.manifest["world_size"] == 2 and two.manifest["shards_built_this_run"] == len(single["shards"])
    assert_same_shards(tmp_path / "two", tmp_path / "one", len(single["shards"]))
    for name in idx.pre:
        if name.startswith("lambda/"):
            torch.testing.assert_close(two.pre[name], idx.pre[name], rtol=1e-6, atol=1e-12)
    queries = token_data(4, seed=3)  # the preconditioner, whatever the eigenvectors' signs
    torch.testing.assert_close(two.query_vectors(model, task, queries), idx.query_vectors(model, task, queries),
                               rtol=1e-6, atol=1e-12)
    got = torch.load(out)
    assert torch.equal(got["pro"], top.proponent_rows) and torch.equal(got["opp"], top.opponent_rows)
    torch.testing.assert_close(got["pro_s"], top.proponent_scores, rtol=1e-6, atol=0)
    # the curvature package's EK-FAC, its covariances and corrections all-reduced over the ranks
    config = FactorConfig(modules="all")
    one = fit_factors(model, task, batches, config, progress=False)
    assert got["manifest"]["n_examples"] == one.manifest["n_examples"] == 61
    for name, value in one.tensors.items():
        if "lambda" in name or "eigval" in name:
            torch.testing.assert_close(got["factors"][name], value, rtol=1e-6, atol=1e-12)
    queries = token_data(4, seed=3)
    two_factors = Factors(config, got["manifest"], got["factors"])
    torch.testing.assert_close(pairwise_scores(model, task, two_factors, queries, batches, progress=False),
                               pairwise_scores(model, task, one, queries, batches, progress=False),
                               rtol=1e-6, atol=1e-9)


def test_the_causal_lm_plugs_in_full_rank_index_equals_the_factored_engine(tmp_path):
    """A tiny LLaMA built in code: the same build and query code, a rotation at full rank, equal scores."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from lm_fixtures import FACTS, tiny_lm_folder, tiny_tokenizer

    from influent.data.lm_text import lm_batches, tokenize_documents
    from influent.models.causal_lm import CausalLMTask, load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_lm_folder(tmp_path / "lm", "llama")))
    model = model.double()
    seqs = tokenize_documents(tiny_tokenizer(), [(f, None) for f in FACTS[:6]], max_length=8)
    train = lm_batches(seqs[:5], 2, tokenizer.pad_token_id)
    queries = lm_batches(seqs[5:], 2, tokenizer.pad_token_id)
    task = CausalLMTask()
    config = IndexConfig(rank=512, modules="mlp", projection="orthogonal", strategy="identity")  # >= every width
    build_index(model, task, train, tmp_path / "index", config, progress=False)
    idx = GradientIndex(tmp_path / "index")
    ours = idx.pairwise_scores(idx.query_vectors(model, task, queries))
    exact = FactoredInfluence(model, task, train, FactorConfig(strategy="identity", modules="mlp", damping=0.0),
                              progress=False).pairwise_scores(queries)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("rank", ["relatif", "cosine"])
def test_relatif_and_cosine_from_the_index_equal_the_factored_definitions(tmp_path, rank):
    """Full-rank orthogonal index (a rotation): the stored self-influence is the factored engine's, and the
    index's top-k under RelatIF / the cosine is a full sort of ``influent.rankings``' values; a rank-2 index
    reranked gives those exact values."""
    from influent.index.explain import ranked_top_k
    from influent.rankings import RANKINGS

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    train = [(x[s: s + 8], y[s: s + 8]) for s in range(0, 40, 8)]
    queries = [(torch.randn(3, 4), torch.randint(0, 3, (3,)))]
    task = MLPTask()
    cfg = IndexConfig(rank=7, modules="all", projection="orthogonal", damping=0.05, shard_size=16)
    build_index(model, task, train, tmp_path / "full", cfg, progress=False)
    idx = GradientIndex(tmp_path / "full")
    method = FactoredInfluence(model, task, train, FactorConfig(modules="all", damping=0.05), progress=False)
    torch.testing.assert_close(idx.self_influence(), method.self_scores(), rtol=2e-4, atol=1e-8)
    values = RANKINGS[rank](method, method.pairwise_scores(queries), queries)
    top = ranked_top_k(idx, model, task, queries, 6, rank)
    order = torch.argsort(values, dim=1, descending=True)[:, :6]
    assert torch.equal(top.proponent_rows, order)
    assert torch.equal(top.opponent_rows, torch.argsort(values, dim=1)[:, :6])
    torch.testing.assert_close(top.proponent_values, values.gather(1, order), rtol=2e-4, atol=1e-7)
    if rank == "cosine":
        assert float(top.proponent_values.abs().max()) <= 1 + 1e-6
    build_index(model, task, train, tmp_path / "small", IndexConfig(rank=2, modules="all"), progress=False)
    small = GradientIndex(tmp_path / "small")
    again = rerank(ranked_top_k(small, model, task, queries, 12, rank), method, queries, depth=4, rank=rank)
    torch.testing.assert_close(again.proponent_values, values.gather(1, again.proponent_rows), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(again.opponent_values, values.gather(1, again.opponent_rows), rtol=1e-6, atol=1e-12)
    assert bool((again.proponent_values[:, :-1] >= again.proponent_values[:, 1:]).all())


def test_an_index_without_self_influence_refuses_relatif(tmp_path):
    from influent.errors import UserError
    from influent.index.explain import ranked_top_k

    model, task, batches = tiny_model(), TokenTask(), token_data(20)
    build_index(model, task, batches, tmp_path, IndexConfig(rank=2, modules="all"), progress=False)
    (tmp_path / shards.SELF_INFLUENCE).unlink()  # as an index of format 1 has it
    idx = GradientIndex(tmp_path)
    assert ranked_top_k(idx, model, task, token_data(2, seed=1), 3).proponent_rows.shape == (2, 3)
    with pytest.raises(UserError, match="self-influence"):
        ranked_top_k(idx, model, task, token_data(2, seed=1), 3, "relatif")


def test_bfloat16_storage_halves_the_rows_and_keeps_the_ranking(tmp_path):
    """bfloat16 rows: half the bytes, the stored rows are the float32 ones rounded, and the top-k is the one
    a full sort of the bfloat16 product gives (scores within bfloat16's 8 significant bits of float32's)."""
    model, task, batches = tiny_model(), TokenTask(), token_data(61)
    cfg = IndexConfig(rank=4, modules="all", shard_size=9)
    wide = build_index(model, task, batches, tmp_path / "f32", cfg, progress=False)
    half = build_index(model, task, batches, tmp_path / "bf16", IndexConfig(**{**cfg.__dict__, "storage": "bfloat16"}),
                       progress=False)
    assert half["bytes_per_example"] * 2 == wide["bytes_per_example"]
    a, b = GradientIndex(tmp_path / "f32"), GradientIndex(tmp_path / "bf16", verify=True)
    rows32 = torch.cat([g for _, g in a.shard_blocks()])
    rows16 = torch.cat([g for _, g in b.shard_blocks()])
    assert rows16.dtype == torch.bfloat16 and torch.equal(rows16, rows32.to(torch.bfloat16))
    queries = token_data(5, seed=7)
    vectors = b.query_vectors(model, task, queries)
    full = b.pairwise_scores(vectors)
    top = b.top_k(vectors, 8)
    order = torch.argsort(full, dim=1, descending=True, stable=True)[:, :8]
    assert torch.equal(top.proponent_rows, order)
    exact = a.pairwise_scores(a.query_vectors(model, task, queries))
    scale = exact.abs().amax(1, keepdim=True)
    assert float(((full - exact).abs() / scale).max()) < 2e-2
