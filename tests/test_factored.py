"""Factored curvature (identity / diagonal / K-FAC / EK-FAC) over linear modules, on tiny models built in code."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from influent.curvature.eigh import robust_eigh
from influent.curvature.keys import EIGVEC_A, EIGVEC_S, LAMBDA, tensor_key
from influent.curvature.linear_grads import per_example_linear_grads, select_linear_modules
from influent.errors import NumericalError, UserError
from influent.factored_influence import FactorConfig, fit_factors, loss_change, pairwise_scores, self_scores
from influent.task import Task, iter_chunks

torch.set_num_threads(1)
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


# ------------------------------------------------------------------------------------------ models
class MLPTask(Task):
    def model_output(self, model, batch):
        return model(batch[0])

    def per_example_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


class BertTask(Task):
    def model_output(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, model, batch):
        return nn.functional.cross_entropy(self.model_output(model, batch), batch["labels"], reduction="none")


def make_mlp(seed: int = 0, n: int = 192, noise: float = 0.7):
    """5-7-6-3 tanh MLP after 150 full-batch Adam steps; labels ``argmax(x w + noise * eps)``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = (x @ w + noise * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(-1)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, (x, y)


def make_bert(seed: int = 0, n: int = 24, length: int = 9):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(2, 40, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def chunks(batch, n, size):
    return [b for _, b in iter_chunks(batch, n, size)]


# ---------------------------------------------------------------------------- exact reference (MLP)
def flat_grads(model, task, batch, n):
    """Autograd per-example gradients of all Linear modules, [n, p] in module [W | b] layout."""
    mods = select_linear_modules(model, "all")
    rows = []
    for i in range(n):
        sl = chunks(batch, n, 1)[i]
        loss = task.per_example_loss(model, sl).sum()
        parts = []
        for m in mods.values():
            gw, gb = torch.autograd.grad(loss, [m.weight, m.bias], retain_graph=True)
            parts.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def exact_scores(model, task, batch, n, queries, factors, fisher):
    """Scores with the exact damped Fisher / GNH: ``(full matrix, its per-module blocks only)``.

    The block-diagonal variant keeps each module's exact block and drops the cross-module blocks: the
    best any per-module method (diagonal, K-FAC, EK-FAC) can do.
    """
    mods = select_linear_modules(model, "all")
    g_train = flat_grads(model, task, batch, n)
    g_q = flat_grads(model, task, queries, queries[0].shape[0])
    if fisher == "empirical":
        fisher_m = g_train.T @ g_train / n
    else:  # exact expectation over labels from the model's predictive distribution (the GNH)
        x = batch[0]
        probs = torch.softmax(model(x), -1).detach()
        fisher_m = torch.zeros(g_train.shape[1], g_train.shape[1], dtype=torch.float64)
        for c in range(probs.shape[1]):
            gc = flat_grads(model, task, (x, torch.full_like(batch[1], c)), n)
            fisher_m += (gc * probs[:, c : c + 1]).T @ gc / n
    sizes = [(m.in_features + 1) * m.out_features for m in mods.values()]
    damp = torch.cat([torch.full((s,), factors.damping[k]) for k, s in zip(mods, sizes)]).double()
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    blocks = torch.where(owner[:, None] == owner[None, :], fisher_m, torch.zeros_like(fisher_m))
    return tuple(g_q @ torch.linalg.solve(m + torch.diag(damp), g_train.T) for m in (fisher_m, blocks))


def output_layer_terms(model, batch):
    """Input ``[h, 1]`` of the last Linear, predictive probabilities and ``p - onehot(y)`` (closed form)."""
    x, y = batch
    with torch.no_grad():
        a = torch.cat([model[:-1](x), torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        p = torch.softmax(model(x), -1)
    return a, p, p - nn.functional.one_hot(y, p.shape[1]).to(p)


def exact_output_layer(model, batch, queries, fisher):
    """Exact Fisher / GNH of the last Linear's ``[W | b]`` (row-major) and its per-example gradients.

    ``G_i = r_i a_i^T`` with ``r_i = p_i - onehot(y_i)``; GNH ``= mean_i (diag p_i - p_i p_i^T) ⊗ a_i a_i^T``,
    empirical Fisher ``= mean_i r_i r_i^T ⊗ a_i a_i^T``. Closed form, independent of the library's hooks.
    """
    a, p, r = output_layer_terms(model, batch)
    aq, _, rq = output_layer_terms(model, queries)
    n, k, d = a.shape[0], p.shape[1], a.shape[1]
    if fisher == "empirical":
        out_cov = r[:, :, None] * r[:, None, :]
    else:
        out_cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    fisher_m = torch.einsum("noq,ni,nj->oiqj", out_cov, a, a).reshape(k * d, k * d) / n
    g_train = (r[:, :, None] * a[:, None, :]).reshape(n, -1)
    g_q = (rq[:, :, None] * aq[:, None, :]).reshape(aq.shape[0], -1)
    return fisher_m, g_q, g_train


def spearman(a, b) -> float:
    return round(float(spearmanr(a.flatten(), b.flatten())[0]), 3)


# ------------------------------------------------------------------------------------------- tests
def test_module_selection_bert():
    model, _ = make_bert()
    mlp = select_linear_modules(model, "mlp")
    assert mlp and all(("intermediate.dense" in k or "output.dense" in k) for k in mlp)
    assert not any("attention" in k for k in mlp)
    assert len(mlp) == 4
    assert len(select_linear_modules(model, "all")) == 2 * 6 + 2  # + pooler + classifier
    assert list(select_linear_modules(model, r"layer\.1\.attention\.self\.query")) == [
        "bert.encoder.layer.1.attention.self.query"
    ]
    with pytest.raises(UserError):
        select_linear_modules(model, "nothing-matches")
    mlp_model, _ = make_mlp()
    assert len(select_linear_modules(mlp_model, "mlp")) == 3


@pytest.mark.parametrize("which", ["mlp", "bert"])
def test_hook_grads_equal_autograd(which):
    if which == "mlp":
        model, batch = make_mlp(n=6)
        task, n = MLPTask(), 6
    else:
        model, batch = make_bert(n=5)
        task, n = BertTask(), 5
    hook = per_example_linear_grads(model, task, batch, "all")
    mods = select_linear_modules(model, "all")
    for i in range(n):
        sl = chunks(batch, n, 1)[i]
        loss = task.per_example_loss(model, sl).sum()
        for name, m in mods.items():
            gw, gb = torch.autograd.grad(loss, [m.weight, m.bias], retain_graph=True)
            ref = torch.cat([gw, gb[:, None]], 1)
            torch.testing.assert_close(hook[name][i], ref, rtol=1e-10, atol=1e-12)


def test_hook_grads_with_frozen_parameters():
    model, batch = make_bert(n=4)
    task = BertTask()
    ref = per_example_linear_grads(model, task, batch, "all")
    for name, p in model.named_parameters():
        p.requires_grad_("layer.1" in name or "classifier" in name)
    got = per_example_linear_grads(model, task, batch, "all")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


def test_padding_contributes_nothing():
    model, batch = make_bert(n=8)
    task = BertTask()
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(8, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(8, 5, dtype=torch.long)], 1),
        "labels": batch["labels"],
    }
    g1 = per_example_linear_grads(model, task, batch)
    g2 = per_example_linear_grads(model, task, padded)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-12)
    for strategy in ("diagonal", "ekfac"):
        cfg = FactorConfig(strategy=strategy)
        f1 = fit_factors(model, task, [batch], cfg, progress=False)
        f2 = fit_factors(model, task, [padded], cfg, progress=False)
        s1 = pairwise_scores(model, task, f1, [batch], [batch], progress=False)
        s2 = pairwise_scores(model, task, f2, [padded], [padded], progress=False)
        torch.testing.assert_close(s1, s2, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_batch_size_independent(fisher):
    model, batch = make_bert(n=24)
    task = BertTask()
    cfg = FactorConfig(strategy="ekfac", fisher=fisher, seed=3)
    a = fit_factors(model, task, chunks(batch, 24, 24), cfg, progress=False)
    b = fit_factors(model, task, chunks(batch, 24, 5), cfg, progress=False)
    for k in a.tensors:
        if "eigvec" not in k:  # eigenvectors are defined up to sign
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-8, atol=1e-12)
    q = chunks(batch, 24, 4)[:1]
    sa = pairwise_scores(model, task, a, q, chunks(batch, 24, 24), progress=False)
    sb = pairwise_scores(model, task, b, q, chunks(batch, 24, 7), progress=False)
    torch.testing.assert_close(sa, sb, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        self_scores(model, task, a, chunks(batch, 24, 24), progress=False),
        self_scores(model, task, b, chunks(batch, 24, 5), progress=False),
        rtol=1e-7,
        atol=1e-10,
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_equals_pairwise_diagonal(strategy):
    model, batch = make_bert(n=12)
    task = BertTask()
    f = fit_factors(model, task, chunks(batch, 12, 5), FactorConfig(strategy=strategy), progress=False)
    pair = pairwise_scores(model, task, f, chunks(batch, 12, 6), chunks(batch, 12, 5), progress=False)
    selfs = self_scores(model, task, f, chunks(batch, 12, 4), progress=False)
    torch.testing.assert_close(selfs, pair.diagonal(), rtol=1e-8, atol=1e-12)
    assert (selfs > 0).all()
    torch.testing.assert_close(pair, pair.T, rtol=1e-8, atol=1e-12)  # symmetric preconditioner


def test_low_rank_queries():
    model, batch = make_bert(n=10)
    task = BertTask()
    f = fit_factors(model, task, [batch], FactorConfig(strategy="ekfac"), progress=False)
    q = chunks(batch, 10, 3)[:1]
    full = pairwise_scores(model, task, f, q, [batch], progress=False)
    exact_rank = pairwise_scores(model, task, f, q, [batch], query_rank=64, progress=False)
    torch.testing.assert_close(full, exact_rank, rtol=1e-8, atol=1e-10)
    r1 = pairwise_scores(model, task, f, q, [batch], query_rank=1, progress=False)
    assert spearmanr(full.flatten(), r1.flatten())[0] > 0.5


def test_ground_truth_spearman_mlp(record_property):
    """Factored scores against exact damped Fisher/GNH scores on a tiny MLP, same absolute damping for all.

    Printed for the record (docs/ekfac.md, "Ground truth"). On this 3-layer MLP (111 parameters, 192
    examples it fits to training accuracy 0.99, damping 0.1 x the mean diagonal of the exact empirical
    Fisher) every factored method is far from the exact answer (Spearman about 0.3), and the reason is
    structural: even the exact per-module blocks of the same matrix (``blockdiag``, the ceiling of any
    per-module method) reach only about 0.5, and within a module the Kronecker eigenbasis is off because
    the curvature sits on a few examples near the decision boundaries. The former target of EK-FAC >= 0.9
    against the full matrix here is retired (it is beyond any per-layer method); the figures are reported
    (printed and recorded as the test's ``spearman`` property), not asserted, apart from the ordering a
    per-module method must show. ``test_ground_truth_spearman_output_layer`` asserts 0.9 where it holds.
    """
    model, batch = make_mlp(n=192)
    task = MLPTask()
    n = 192
    qx = torch.randn(16, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    queries = (qx, model(qx).argmax(-1))
    damping = 0.1 * float(flat_grads(model, task, batch, n).square().mean())
    report = {}
    for fisher in ("empirical", "true"):
        rho = {}
        exact = None
        for strategy in ("ekfac", "kfac", "diagonal", "identity"):
            cfg = FactorConfig(strategy=strategy, fisher=fisher, damping=damping)
            f = fit_factors(model, task, chunks(batch, n, 64), cfg, progress=False)
            approx = pairwise_scores(model, task, f, [queries], chunks(batch, n, 64), progress=False)
            if exact is None:
                exact, blockdiag = exact_scores(model, task, batch, n, queries, f, fisher)
                rho["blockdiag"] = spearman(blockdiag, exact)
            rho[strategy] = spearman(approx, exact)
        report[fisher] = rho
    print(f"\nSpearman vs exact damped Fisher/GNH (tiny MLP, all 3 layers, damping {damping:.2e}):", report)
    record_property("spearman", report)
    rho = report["empirical"]
    assert rho["ekfac"] >= rho["kfac"] and rho["ekfac"] >= rho["diagonal"], report
    assert rho["ekfac"] > 0.2, report
    # the exact per-module blocks are the ceiling of every per-module method (their own value is reported)
    for r in report.values():
        assert max(r["ekfac"], r["kfac"], r["diagonal"]) < r["blockdiag"], report


def test_ground_truth_spearman_output_layer():
    """EK-FAC >= 0.9 Spearman against the exact GNH where the Kronecker assumption nearly holds.

    Same 5-7-6-3 MLP and training recipe, 1,000 examples, only the output Linear tracked (influence over
    a classifier head, as with a frozen encoder), so there are no cross-module blocks; the exact
    reference is the damped GNH (``fisher='true'``, expectation over labels; the factors sample one label
    per example) and the empirical Fisher of those 21 parameters, in closed form. Damping 0.1 x the mean
    diagonal of the exact matrix (= kronfluence's heuristic for EK-FAC).

    K-FAC / EK-FAC assume an example's output-gradient covariance ``diag p - p p^T`` does not depend on
    its activations; that holds when the curvature is spread evenly over the examples. ``neff`` measures
    that spread: ``(sum w)^2 / (n sum w^2)`` with ``w_i = 1 - |p_i|^2``. With label noise 3.0 (training
    accuracy 0.61, neff 0.95) EK-FAC reaches 0.95 and is asserted >= 0.9; with noise 1.0 (a classifier like
    the project's frozen-encoder head: training accuracy 0.80, held-out 0.76, neff 0.67) it is about 0.76,
    printed and not asserted at 0.9.
    """
    task = MLPTask()
    n = 1000
    report = {}
    for noise in (3.0, 1.0):
        model, batch = make_mlp(n=n, noise=noise)
        qx = torch.randn(16, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        queries = (qx, model(qx).argmax(-1))
        _, p, _ = output_layer_terms(model, batch)
        w = 1 - p.square().sum(-1)
        entry = {
            "train_acc": round(float((p.argmax(-1) == batch[1]).double().mean()), 3),
            "neff": round(float(w.sum() ** 2 / (n * w.square().sum())), 3),
        }
        for fisher in ("true", "empirical"):
            fisher_m, g_q, g_train = exact_output_layer(model, batch, queries, fisher)
            damping = 0.1 * float(fisher_m.diagonal().mean())
            eye = torch.eye(fisher_m.shape[0], dtype=torch.float64)
            exact = g_q @ torch.linalg.solve(fisher_m + damping * eye, g_train.T)
            rho = {}
            for strategy in ("ekfac", "kfac", "diagonal", "identity"):
                cfg = FactorConfig(strategy=strategy, fisher=fisher, damping=damping, modules=r"^4$")
                f = fit_factors(model, task, chunks(batch, n, 250), cfg, progress=False)
                approx = pairwise_scores(model, task, f, [queries], chunks(batch, n, 250), progress=False)
                rho[strategy] = spearman(approx, exact)
            entry[fisher] = rho
        report[noise] = entry
    print(
        "\nSpearman vs exact damped GNH / empirical Fisher (tiny MLP, output layer, by label noise):", report
    )
    for fisher in ("true", "empirical"):
        rho = report[3.0][fisher]
        assert rho["ekfac"] >= 0.9, report
        # EK-FAC and K-FAC tie here (differences of -0.007..+0.012 over 8 model seeds): allow 0.01
        assert rho["ekfac"] >= rho["kfac"] - 0.01 and rho["kfac"] >= 0.9, report
        assert rho["kfac"] >= rho["diagonal"] + 0.15 and rho["diagonal"] >= rho["identity"], report
        rho = report[1.0][fisher]  # practitioner-like confidence: curvature still helps, 0.9 not reached
        assert rho["ekfac"] >= 0.7 and rho["ekfac"] >= rho["diagonal"] + 0.1, report
        assert rho["diagonal"] >= rho["identity"], report


def test_factored_curvature_equals_dense_definitions():
    """Each factored preconditioner equals its definition as a dense block-diagonal p x p matrix.

    ``[W | b]`` row-major vec (the layout of ``flat_grads``): the K-FAC block is ``kron(S, A)`` (``kron(A, S)``,
    the column-major convention, differs by about 120% here), EK-FAC's is ``Q diag(Lambda) Q^T`` with
    ``Q = kron(Q_S, Q_A)`` and ``Lambda = diag(Q^T F_m Q)`` of the exact empirical Fisher block ``F_m``.
    Activations and output gradients come from an explicit forward pass, not the library's hooks.
    """
    model, batch = make_mlp(n=64)
    task = MLPTask()
    x, y = batch
    n = 64
    queries = chunks(batch, n, 5)[0]
    z1 = model[0](x)
    z2 = model[2](torch.tanh(z1))
    z3 = model[4](torch.tanh(z2))
    # the loss is a sum over independent examples: row i of dL/dz is example i's output gradient
    outs = torch.autograd.grad(nn.functional.cross_entropy(z3, y, reduction="sum"), [z1, z2, z3])
    ones = torch.ones(n, 1, dtype=torch.float64)
    acts = [torch.cat([v.detach(), ones], 1) for v in (x, torch.tanh(z1), torch.tanh(z2))]
    g_train = flat_grads(model, task, batch, n)
    g_q = flat_grads(model, task, queries, 5)
    fisher_m = g_train.T @ g_train / n
    damping = 1e-3
    sizes = [a.shape[1] * g.shape[1] for a, g in zip(acts, outs)]
    offsets = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    for strategy in ("kfac", "ekfac", "diagonal"):
        f = fit_factors(
            model, task, [batch], FactorConfig(strategy=strategy, damping=damping), progress=False
        )
        blocks = []
        for k, (name, a, g) in enumerate(zip(f.names, acts, outs)):
            exact_block = fisher_m[offsets[k] : offsets[k + 1], offsets[k] : offsets[k + 1]]
            if strategy == "diagonal":
                blocks.append(torch.diag(exact_block.diagonal()))
                continue
            a_cov, s_cov = a.T @ a / n, g.T @ g / n
            if strategy == "kfac":
                blocks.append(torch.kron(s_cov, a_cov))
                continue
            q = torch.kron(f.tensors[tensor_key(name, EIGVEC_S)].double(), f.tensors[tensor_key(name, EIGVEC_A)].double())
            torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64))
            q_s, q_a = torch.linalg.eigh(s_cov)[1], torch.linalg.eigh(a_cov)[1]
            torch.testing.assert_close(  # the library's eigenbasis is that of A and S (up to signs)
                (q.T @ torch.kron(q_s, q_a)).abs(),
                torch.eye(q.shape[0], dtype=torch.float64),
                atol=1e-6,
                rtol=0,
            )
            lam = (q.T @ exact_block @ q).diagonal()
            torch.testing.assert_close(f.tensors[tensor_key(name, LAMBDA)].reshape(-1), lam, rtol=1e-9, atol=1e-14)
            blocks.append(q @ torch.diag(lam) @ q.T)
        dense = torch.block_diag(*blocks) + damping * torch.eye(sum(sizes), dtype=torch.float64)
        expected = g_q @ torch.linalg.solve(dense, g_train.T)
        got = pairwise_scores(model, task, f, [queries], [batch], progress=False)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_cache_round_trip_and_resume(tmp_path):
    model, batch = make_bert(n=20)
    calls = {"n": 0, "fail_at": None}

    class CountingTask(BertTask):
        def model_output(self, model, b):
            calls["n"] += 1
            if calls["fail_at"] is not None and calls["n"] == calls["fail_at"]:
                raise KeyboardInterrupt("simulated interruption")
            return super().model_output(model, b)

    task = CountingTask()
    batches = chunks(batch, 20, 2)  # 10 batches per pass, 2 passes for EK-FAC (1 with the captures kept)
    cfg = FactorConfig(strategy="ekfac", fisher="true", seed=1)
    reference = fit_factors(model, task, batches, cfg, progress=False, memory_max_bytes=0, checkpoint_every=4)
    assert calls["n"] == 20

    calls.update(n=0, fail_at=15)  # dies in the eigenvalue-correction pass, after its checkpoint at 4
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, task, batches, cfg, cache_dir=tmp_path, checkpoint_every=4, progress=False,
                    memory_max_bytes=0)
    assert any(tmp_path.rglob("partial-lambda.safetensors")) and any(tmp_path.rglob("eigen.safetensors"))
    calls.update(n=0, fail_at=None)
    resumed = fit_factors(model, task, batches, cfg, cache_dir=tmp_path, checkpoint_every=4, progress=False)
    assert calls["n"] == 10 - 4  # only the lambda batches after the checkpoint
    for k in reference.tensors:
        torch.testing.assert_close(resumed.tensors[k], reference.tensors[k], rtol=1e-10, atol=1e-12)

    # one pass: an interruption in the covariance pass resumes from its checkpoint at 4; the batches
    # captured after the resume are replayed, the first 4 recomputed: 6 + 4 calls in all
    one_pass = tmp_path / "one-pass"
    calls.update(n=0, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, task, batches, cfg, cache_dir=one_pass, checkpoint_every=4, progress=False)
    calls.update(n=0, fail_at=None)
    resumed = fit_factors(model, task, batches, cfg, cache_dir=one_pass, checkpoint_every=4, progress=False)
    assert calls["n"] == 6 + 4
    for k in reference.tensors:
        torch.testing.assert_close(resumed.tensors[k], reference.tensors[k], rtol=1e-10, atol=1e-12)

    calls.update(n=0)
    loaded = fit_factors(model, task, batches, cfg, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 0
    manifest = loaded.manifest
    assert manifest["strategy"] == "ekfac" and manifest["fisher"] == "true" and manifest["n_examples"] == 20
    assert set(manifest) >= {
        "modules",
        "damping",
        "data_fingerprint",
        "model_fingerprint",
        "damping_per_module",
    }
    assert not any(tmp_path.rglob("partial-*")) and not any(tmp_path.rglob("*.tmp"))
    # different settings or data -> a different cache entry
    fit_factors(model, task, batches[:5], cfg, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 5  # one pass of 5 batches
    assert len(list((tmp_path / "factors").iterdir())) == 2


def test_loss_change_and_sign():
    model, batch = make_mlp(n=64)
    task = MLPTask()
    f = fit_factors(model, task, [batch], FactorConfig(strategy="ekfac"), progress=False)
    s = pairwise_scores(model, task, f, [chunks(batch, 64, 4)[0]], [batch], progress=False)
    # an example is a proponent of itself: positive self score on the diagonal
    assert (s[:, :4].diagonal() > 0).all()
    torch.testing.assert_close(loss_change(s, 64), s / 64)


def test_robust_eigh_fallbacks():
    m = torch.randn(6, 3, dtype=torch.float64)
    vals, vecs = robust_eigh(m @ m.T)  # rank-deficient PSD
    assert torch.isfinite(vals).all() and (vals >= 0).all()
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, m @ m.T, atol=1e-10, rtol=1e-8)
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(NumericalError):
        robust_eigh(bad)


def test_bad_options():
    model, batch = make_mlp(n=8)
    for cfg in (FactorConfig(strategy="nope"), FactorConfig(fisher="x"), FactorConfig(damping=-1.0)):
        with pytest.raises(UserError):
            fit_factors(model, MLPTask(), [batch], cfg, progress=False)


# ------------------------------------------------------------ length bucketing, query preconditioning
def trimmed(batch, extra: int = 0):
    """``batch`` with its padding cut to its longest example, plus ``extra`` padded columns."""
    width = int(batch["attention_mask"].sum(1).max()) + extra
    pad = max(0, width - batch["input_ids"].shape[1])
    out = {}
    for k, v in batch.items():
        if v.dim() == 2:
            v = torch.cat([v, torch.zeros(v.shape[0], pad, dtype=v.dtype)], 1)[:, :width]
        out[k] = v
    return out


def mixed_batches(batch, n, size):
    """Batches of mixed widths: some trimmed to their longest, some padded past the input's width."""
    return [trimmed(b, extra=(3 if i % 2 else 0)) for i, b in enumerate(chunks(batch, n, size))]


def test_length_buckets_reform_and_order():
    from influent.task import length_buckets

    _, batch = make_bert(n=23)
    batches = mixed_batches(batch, 23, 5)
    new, order = length_buckets(batches)
    assert sorted(order.tolist()) == list(range(23))
    assert [b["input_ids"].shape[0] for b in new] == [5, 5, 5, 5, 3]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in new])
    assert (lengths[:-1] >= lengths[1:]).all()  # longest first
    for b in new:
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())  # trimmed to its longest
    padded_before = sum(b["attention_mask"].numel() for b in batches)
    assert sum(b["attention_mask"].numel() for b in new) < padded_before
    torch.testing.assert_close(torch.cat([b["labels"] for b in new]), batch["labels"][order])
    ids_new = [row[row != 0] for b in new for row in b["input_ids"]]
    ids_old = [row[row != 0] for row in batch["input_ids"]]
    for j, i in enumerate(order.tolist()):
        assert torch.equal(ids_new[j], ids_old[i])
    # other batch types, left padding and nothing to trim: left as they are
    _, mlp_batch = make_mlp(n=8)
    assert length_buckets(chunks(mlp_batch, 8, 4)) is None
    left = {k: v.flip(1) if v.dim() == 2 else v for k, v in batches[0].items()}
    assert length_buckets([left, left]) is None
    no_padding = {k: v[:, :3] if v.dim() == 2 else v for k, v in batch.items()}  # lengths are >= 3
    assert length_buckets(chunks(no_padding, 23, 5)) is None


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_bucketed_scores_equal_input_order(strategy):
    """Bucketed passes give the unbucketed scores in the input order, for any padding of the input."""
    model, batch = make_bert(n=23)
    task = BertTask()
    batches = mixed_batches(batch, 23, 5)
    cfg = FactorConfig(strategy=strategy)
    f = fit_factors(model, task, batches, cfg, progress=False, bucket=False)
    fb = fit_factors(model, task, batches, cfg, progress=False)
    for k in f.tensors:
        if "eigvec" not in k:  # eigenvectors are defined up to sign
            torch.testing.assert_close(fb.tensors[k], f.tensors[k], rtol=1e-8, atol=1e-12)
    q = [trimmed(chunks(batch, 23, 4)[0])]
    ref = pairwise_scores(model, task, f, q, batches, progress=False, bucket=False)
    got = pairwise_scores(model, task, f, q, batches, progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    # padding invariance: the same examples padded to the full width, in batches of another size
    wide = pairwise_scores(model, task, f, q, chunks(batch, 23, 7), progress=False)
    torch.testing.assert_close(wide, ref, rtol=1e-7, atol=1e-10)
    ref_self = self_scores(model, task, f, batches, progress=False, bucket=False)
    torch.testing.assert_close(
        self_scores(model, task, f, batches, progress=False), ref_self, rtol=1e-7, atol=1e-10
    )
    torch.testing.assert_close(
        self_scores(model, task, f, chunks(batch, 23, 7), progress=False), ref_self, rtol=1e-7, atol=1e-10
    )


def test_bucketed_true_fisher_keeps_each_examples_label():
    model, batch = make_bert(n=23)
    task = BertTask()
    batches = mixed_batches(batch, 23, 5)
    cfg = FactorConfig(strategy="ekfac", fisher="true", seed=2)
    f = fit_factors(model, task, batches, cfg, progress=False, bucket=False)
    fb = fit_factors(model, task, batches, cfg, progress=False)
    for k in f.tensors:
        if "eigvec" not in k:
            torch.testing.assert_close(fb.tensors[k], f.tensors[k], rtol=1e-8, atol=1e-12)


def test_precondition_from_tokens_and_float32():
    """Query preconditioning from token factors = from formed gradients; float32 within 1e-4 of float64."""
    import copy

    from influent.curvature.linear_grads import LinearCapture, per_example_grads_from

    model, batch = make_bert(n=12)
    task = BertTask()
    f = fit_factors(model, task, chunks(batch, 12, 6), FactorConfig(strategy="ekfac"), progress=False)
    q = chunks(batch, 12, 4)[0]
    with torch.enable_grad(), LinearCapture(select_linear_modules(model, "all")) as cap:
        cap.set_mask(task.token_mask(q))
        captured = cap.backward(task.per_example_loss(model, q))
    for name, a, g in captured:
        ref = f.precondition(name, per_example_grads_from(a, g))
        torch.testing.assert_close(f.precondition_tokens(name, a, g), ref, rtol=1e-9, atol=1e-12)
        # 50 more (zero) token rows: rotating the formed gradient is cheaper, the other branch
        a_long = torch.cat([a, a.new_zeros(a.shape[0], 50, a.shape[2])], 1)
        g_long = torch.cat([g, g.new_zeros(g.shape[0], 50, g.shape[2])], 1)
        torch.testing.assert_close(f.precondition_tokens(name, a_long, g_long), ref, rtol=1e-9, atol=1e-12)
    # float32 model, gradients and rotations against float64, same factors
    model32 = copy.deepcopy(model).float()
    s64 = pairwise_scores(model, task, f, [q], chunks(batch, 12, 6), progress=False)
    s32 = pairwise_scores(model32, task, f, [q], chunks(batch, 12, 6), progress=False)
    assert float((s32 - s64).norm() / s64.norm()) < 1e-4


@pytest.mark.parametrize("shape", [(40, 9), (9, 40), (12, 12)])
def test_per_example_dots_in_blocks(shape, monkeypatch):
    """Dot products with per-example gradients formed a block of rows / columns at a time = formed whole."""
    from influent.curvature.linear_grads import GradBuffers, PerExampleDots, per_example_grads_from

    g_ = torch.Generator().manual_seed(0)
    d_out, d_in = shape
    p = torch.randn(3, d_out, d_in, generator=g_, dtype=torch.float64)
    a = torch.randn(5, 4, d_in, generator=g_, dtype=torch.float64)
    g = torch.randn(5, 4, d_out, generator=g_, dtype=torch.float64)
    ref = p.reshape(3, -1) @ per_example_grads_from(a, g).reshape(5, -1).T
    monkeypatch.setattr(PerExampleDots, "CHUNK", 50)  # blocks of 5 (or 4) rows / columns, the last shorter
    dots = PerExampleDots(p)
    assert dots.blocks is not None and len(dots.spans) > 2
    buffers = GradBuffers()
    for _ in range(2):  # reused buffers
        torch.testing.assert_close(dots(a, g, buffers), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dots(a[:, :1], g[:, :1], buffers),
        p.reshape(3, -1) @ per_example_grads_from(a[:, :1], g[:, :1]).reshape(5, -1).T,
    )


def test_pairwise_scores_with_blocked_dots(monkeypatch):
    from influent.curvature.linear_grads import PerExampleDots

    model, batch = make_bert(n=12)
    task = BertTask()
    f = fit_factors(model, task, chunks(batch, 12, 6), FactorConfig(strategy="ekfac"), progress=False)
    q = chunks(batch, 12, 4)[:1]
    ref = pairwise_scores(model, task, f, q, chunks(batch, 12, 5), progress=False)
    monkeypatch.setattr(PerExampleDots, "CHUNK", 40)
    got = pairwise_scores(model, task, f, q, chunks(batch, 12, 5), progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
