"""``influent.explain.explain``: one function over the influence protocol for the head and the fine-tuned
classifier, checked against values computed here without the library (closed-form Hessian of the head,
leave-one-out retraining, autograd dot products)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetuned import tiny_encoder, toy_data

from influent.data import Corpus
from influent.data.corpus import text_id
from influent.explain import Query, explain
from influent.models.head import HeadTask, train_head
from influent.pipeline import FinetunedSetup, HeadSetup

L2 = 0.05


def _corpus(texts: list[str], labels: list[int]) -> Corpus:
    return Corpus([text_id(t) for t in texts], texts, np.asarray(labels), ["neg", "pos"], "test")


def _head_setup(tmp_path: Path, n: int = 60, d: int = 3, seed: int = 0) -> HeadSetup:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 10, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(n + 10, generator=g, dtype=torch.float64) > 0).long()
    corpus = _corpus([f"example {i}" for i in range(n + 10)], y.tolist())
    tr, te = np.arange(n), np.arange(n, n + 10)
    model, task, _ = train_head(x[:n], y[:n], 2, L2)
    return HeadSetup(corpus, tr, te, x[:n], y[:n], x[n:], y[n:], model, task, {}, tmp_path, None, None)


def dense_head_scores(setup: HeadSetup, xq: torch.Tensor, yq: int) -> torch.Tensor:
    """``g_q^T H^-1 g_i`` of the binary logistic head from its closed-form gradients and Hessian."""
    w = setup.model.linear.weight.detach()[0]
    b = setup.model.linear.bias.detach()[0]
    X = torch.cat([setup.train_x, torch.ones(len(setup.train_x), 1, dtype=torch.float64)], 1)
    p = torch.sigmoid(setup.train_x @ w + b)
    G = (p - setup.train_y.double())[:, None] * X
    l2 = setup.task.l2
    H = (X.T * (p * (1 - p))) @ X / len(X) + l2 * torch.eye(X.shape[1], dtype=torch.float64)
    pq = torch.sigmoid(xq @ w + b)
    gq = (pq - yq) * torch.cat([xq, torch.ones(1, dtype=torch.float64)])
    return G @ torch.linalg.solve(H, gq)


def test_head_proponents_are_the_top_of_a_dense_solve(tmp_path):
    setup = _head_setup(tmp_path)
    xq = setup.test_x[0]
    [result] = explain(setup.influence(), setup, [Query("q", xq, None, int(setup.test_y[0]))], top=4,
                       rank="influence")
    pred = int(setup.model.probabilities(xq[None]).argmax())
    assert result["query"]["explained_label"] == ["neg", "pos"][pred]
    dense = dense_head_scores(setup, xq, pred)
    order = torch.argsort(dense, descending=True)
    ids = setup.corpus.ids
    assert [r["id"] for r in result["proponents"]] == [ids[int(i)] for i in order[:4]]
    assert [r["id"] for r in result["opponents"]] == [ids[int(i)] for i in order.flip(0)[:4]]
    assert [r["score"] for r in result["proponents"]] == pytest.approx(dense[order[:4]].tolist(), rel=1e-8)
    assert [r["score"] for r in result["opponents"]] == pytest.approx(dense[order.flip(0)[:4]].tolist(), rel=1e-8)
    assert result["solver"]["method"] == "exact" and result["solver"]["residual"] < 1e-10


def test_head_loss_change_predicts_leave_one_out_retraining(tmp_path):
    setup = _head_setup(tmp_path, n=80, seed=1)
    xq = setup.test_x[1]
    [result] = explain(setup.influence(), setup, [Query("q", xq, None, None)], top=3, rank="influence")
    label = ["neg", "pos"].index(result["query"]["explained_label"])
    batch_q = (xq[None], torch.tensor([label]))
    base = float(HeadTask(L2).per_example_loss(setup.model, batch_q).detach())
    for r in result["proponents"] + result["opponents"]:
        i = setup.corpus.ids.index(r["id"])
        keep = torch.as_tensor([j for j in range(len(setup.train_y)) if j != i])
        model, _, _ = train_head(setup.train_x[keep], setup.train_y[keep], 2, L2)
        retrained = float(HeadTask(L2).per_example_loss(model, batch_q).detach()) - base
        # removing a proponent raises the query loss, removing an opponent lowers it, by about score / n
        assert r["loss_change"] == pytest.approx(retrained, rel=0.15, abs=2e-4), r


def _finetuned_setup(tmp_path: Path) -> FinetunedSetup:
    from influent.models.finetuned import train_finetuned

    texts, labels = toy_data(24, 0)
    texts = [f"{t} {'a ' * (i % 3)}".strip() for i, t in enumerate(texts)]  # distinct texts (distinct ids)
    q_texts, q_labels = toy_data(4, 5)
    model, tok, _ = train_finetuned(
        texts, labels, q_texts, q_labels, None, encoder=tiny_encoder(tmp_path), last_k=1, epochs=2, lr=3e-3,
        batch_size=8, max_length=16, seed=0, progress=False,
    )
    corpus = _corpus(texts + q_texts, labels + q_labels)
    return FinetunedSetup(corpus, np.arange(24), np.arange(24, 28), model.eval(), tok, {"max_length": 16}, {},
                          tmp_path / "ft")


def _autograd_grad(setup: FinetunedSetup, text: str, label: int) -> torch.Tensor:
    """Gradient of one example's cross-entropy over the weights and biases of the trainable linear layers."""
    from influent.models.finetuned import FinetunedTask

    params = [p for m in setup.model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
              for p in (m.weight, m.bias)]
    [batch] = setup.text_batches([text], [label])
    loss = FinetunedTask().per_example_loss(setup.model, batch).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def test_finetuned_explain_with_identity_curvature_is_the_gradient_dot_product(tmp_path):
    setup = _finetuned_setup(tmp_path)
    damping = 0.5
    method = setup.influence("identity", damping=damping, progress=False)
    query = Query(setup.corpus.texts[25], setup.held_out_features(1), None, int(setup.corpus.labels[25]))
    [result] = explain(method, setup, [query], top=3, rank="influence")
    label = ["neg", "pos"].index(result["query"]["explained_label"])
    gq = _autograd_grad(setup, query.text, label)
    dots = torch.stack([
        gq @ _autograd_grad(setup, setup.corpus.texts[i], int(setup.corpus.labels[i])) for i in range(24)
    ]) / (1 + damping)  # identity curvature: (I + damping)^-1
    order = torch.argsort(dots, descending=True)
    assert [r["id"] for r in result["proponents"]] == [setup.corpus.ids[int(i)] for i in order[:3]]
    assert [r["score"] for r in result["proponents"]] == pytest.approx(dots[order[:3]].tolist(), rel=1e-3)
    assert [r["score"] for r in result["opponents"]] == pytest.approx(dots[order.flip(0)[:3]].tolist(), rel=1e-3)
    assert result["proponents"][0]["loss_change"] == pytest.approx(float(dots[order[0]]) / 24, rel=1e-3)
    assert result["curvature"] == {"strategy": "identity", "modules": "trainable", "fisher": "empirical",
                                   "damping": damping}
    with torch.no_grad():
        inputs = {k: v for k, v in setup.text_batches([query.text], [0])[0].items() if k != "labels"}
        probs = torch.softmax(setup.model(**inputs).logits.double(), -1)[0]
    assert result["query"]["probability"] == pytest.approx(float(probs.max()), rel=1e-6)
