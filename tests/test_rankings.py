"""Rankings of explanations (``influent.rankings``): RelatIF and the H^-1-cosine against their definitions
computed here from the head's closed-form gradients and Hessian (dense solve) or from autograd gradients, the
similarity references against numpy / scikit-learn, and ``--rank`` end to end through the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from test_explain import _finetuned_setup, _head_setup

from influent.explain import Query, explain
from influent.rankings import (
    RANKINGS,
    embedding_similarity,
    proponent_order,
    tfidf_similarity,
)


def dense_head_gradients(setup, xq: torch.Tensor, yq: torch.Tensor):
    """Training gradients ``[n, p]``, query gradients ``[Q, p]`` and the Hessian ``[p, p]`` of the binary head."""
    w = setup.model.linear.weight.detach()[0]
    b = setup.model.linear.bias.detach()[0]

    def with_bias(x):
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    X, XQ = with_bias(setup.train_x), with_bias(xq)
    p = torch.sigmoid(setup.train_x @ w + b)
    G = (p - setup.train_y.double())[:, None] * X
    GQ = (torch.sigmoid(xq @ w + b) - yq.double())[:, None] * XQ
    H = (X.T * (p * (1 - p))) @ X / len(X) + setup.task.l2 * torch.eye(X.shape[1], dtype=torch.float64)
    return G, GQ, H


def test_relatif_and_cosine_equal_their_dense_definitions_on_the_head(tmp_path):
    setup = _head_setup(tmp_path, n=50, d=4, seed=3)
    xq = setup.test_x[:6]
    yq = setup.model.probabilities(xq).detach().argmax(1)
    G, GQ, H = dense_head_gradients(setup, xq, yq)
    Hinv = torch.linalg.inv(H)
    raw = GQ @ Hinv @ G.T  # [Q, n]
    self_train = torch.einsum("ip,pq,iq->i", G, Hinv, G)
    self_query = torch.einsum("ip,pq,iq->i", GQ, Hinv, GQ)
    expected = {
        "influence": raw,
        "relatif": raw / self_train.sqrt()[None, :],
        "cosine": raw / (self_train.sqrt()[None, :] * self_query.sqrt()[:, None]),
    }
    method = setup.influence()
    batch = (xq, yq)
    scores = method.pairwise_scores(batch)
    for name, want in expected.items():
        assert RANKINGS[name](method, scores, batch) == pytest.approx(want, rel=1e-8, abs=1e-12), name
    cos = expected["cosine"]
    assert float(cos.abs().max()) <= 1 + 1e-9  # a cosine in the H^-1 inner product
    # explain(): ranked by the value, records keep the raw score and loss_change = score / n
    queries = [Query("q", xq[i], None, None) for i in range(len(xq))]
    for name in ("relatif", "cosine"):
        results = explain(method, setup, queries, top=3, rank=name)
        for q, result in enumerate(results):
            assert result["ranking"] == name
            order = torch.argsort(expected[name][q], descending=True)[:3]
            ids = [setup.corpus.ids[int(i)] for i in order if raw[q, i] > 0]
            assert [r["id"] for r in result["proponents"]] == ids
            assert [r["rank_value"] for r in result["proponents"]] == pytest.approx(
                expected[name][q, order[: len(ids)]].tolist(), rel=1e-8)
            assert [r["score"] for r in result["proponents"]] == pytest.approx(
                raw[q, order[: len(ids)]].tolist(), rel=1e-8)
            assert [r["loss_change"] for r in result["proponents"]] == pytest.approx(
                (raw[q, order[: len(ids)]] / 50).tolist(), rel=1e-8)
            low = torch.argsort(expected[name][q])[:3]
            assert [r["id"] for r in result["opponents"]] == [setup.corpus.ids[int(i)] for i in low if raw[q, i] < 0]


def test_relatif_reorders_the_raw_ranking_on_the_head(tmp_path):
    """Not a no-op: on this panel RelatIF puts a different example on top for some query."""
    setup = _head_setup(tmp_path, n=60, d=3, seed=0)
    queries = [Query("q", setup.test_x[i], None, None) for i in range(10)]
    method = setup.influence()
    raw = [r["proponents"][0]["id"] for r in explain(method, setup, queries, top=1, rank="influence")]
    rel = [r["proponents"][0]["id"] for r in explain(method, setup, queries, top=1, rank="relatif")]
    assert raw != rel


def test_finetuned_cosine_with_identity_curvature_is_the_gradient_cosine(tmp_path):
    from test_explain import _autograd_grad

    setup = _finetuned_setup(tmp_path)
    method = setup.influence("identity", damping=0.5, progress=False)
    text = setup.corpus.texts[25]
    [result] = explain(method, setup, [Query(text, None, None, None)], top=3, rank="cosine")
    label = ["neg", "pos"].index(result["query"]["explained_label"])
    gq = _autograd_grad(setup, text, label)
    G = torch.stack([_autograd_grad(setup, setup.corpus.texts[i], int(setup.corpus.labels[i])) for i in range(24)])
    cos = (G @ gq) / (G.norm(dim=1) * gq.norm())  # (I + damping)^-1 cancels in the cosine
    order = torch.argsort(cos, descending=True)[:3]
    picked = [int(i) for i in order if cos[i] > 0]
    assert [r["id"] for r in result["proponents"]] == [setup.corpus.ids[i] for i in picked]
    assert [r["rank_value"] for r in result["proponents"]] == pytest.approx(cos[picked].tolist(), rel=1e-3)
    assert [r["score"] for r in result["proponents"]] == pytest.approx((G[picked] @ gq / 1.5).tolist(), rel=1e-3)


def test_similarity_references_against_numpy_and_sklearn():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    a, b = query.numpy().astype(np.float64), train.numpy().astype(np.float64)
    want = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert embedding_similarity(train, query).numpy() == pytest.approx(want, rel=1e-10)
    texts = ["a great film", "a dull film", "great acting, dull plot", "nothing works"]
    queries = ["great great film", "dull"]
    vec = TfidfVectorizer(sublinear_tf=True).fit(texts)
    want = cosine_similarity(vec.transform(queries), vec.transform(texts))
    got = tfidf_similarity(texts, queries).numpy()
    assert got == pytest.approx(want, rel=1e-10)
    assert int(np.argmax(got[1])) in (1, 2)  # "dull" is nearest to a text with "dull"


def test_proponent_order_keeps_positive_values_only():
    values = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.1])
    assert proponent_order(values, 4).tolist() == [2, 0, 4]
    assert proponent_order(values, 4, positive_only=False).tolist() == [2, 0, 4, 3]


def test_rank_reaches_the_json(capsys, base_args, tiny_encoder_dir, reviews_csv, tmp_path):
    from influent.cli.explain import DEFAULT_RANK, RANK_CHOICES
    from influent.explain import DEFAULT_RANKING
    from influent.pipeline import prepare_head

    assert list(RANK_CHOICES) == list(RANKINGS) and DEFAULT_RANK == DEFAULT_RANKING
    text = "a great and witty film"
    code, out, err = run_cli(capsys, ["explain", "--text", text, "--top", "3", "--json", "--rank", "relatif",
                                      *base_args])
    assert code == 0, err
    result = json.loads(out)
    assert result["ranking"] == "relatif"
    setup = prepare_head(str(reviews_csv), text_column="review", label_column="sentiment",
                         encoder=str(tiny_encoder_dir), cache_dir=tmp_path / "cache", l2=0.01, progress=False)
    xq = setup.embed([text])[0][None]
    yq = setup.model.probabilities(xq).detach().argmax(1)
    G, GQ, H = dense_head_gradients(setup, xq, yq)
    raw = (GQ @ torch.linalg.solve(H, G.T))[0]
    rel = raw / torch.einsum("ip,ip->i", G, torch.linalg.solve(H, G.T).T).sqrt()
    order = torch.argsort(rel, descending=True)[:3]
    assert [r["id"] for r in result["proponents"]] == [setup.corpus.ids[setup.train_idx[int(i)]] for i in order]
    assert [r["rank_value"] for r in result["proponents"]] == pytest.approx(rel[order].tolist(), rel=1e-8)
    assert [r["score"] for r in result["proponents"]] == pytest.approx(raw[order].tolist(), rel=1e-8)
    code, out, err = run_cli(capsys, ["explain", "--text", text, "--rank", "cosine", *base_args])
    assert code == 0 and "Ranked by cosine" in out and "cosine=+" in out
    code, _, err = run_cli(capsys, ["explain", "--text", text, "--rank", "nope", *base_args])
    assert code == 2 and "invalid choice: 'nope'" in err
