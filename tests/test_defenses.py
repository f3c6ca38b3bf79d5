"""Rankers, detection metrics and the defence experiments on synthetic features (fast)."""

import numpy as np
import pytest
import torch
from test_attacks import toy_text_experiment

from influent.attacks.experiment import synthetic_experiment
from influent.attacks.trigger import make_trigger_poison
from influent.defenses.audit import read_queries
from influent.defenses.evaluate import mislabel_experiment, random_label_noise, trigger_defense
from influent.defenses.inputs import head_audit_inputs
from influent.defenses.rankers import RANKERS, available_rankers, score_all, spectral_signature
from influent.errors import UserError
from influent.evaluation.detection import auprc, auroc, detection_metrics, ranking, recall_at_k


def test_detection_metrics_on_hand_cases():
    bad = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    perfect = np.arange(10)[::-1].astype(float)
    assert auroc(perfect, bad) == 1.0 and auprc(perfect, bad) == 1.0
    assert recall_at_k(perfect, bad, 1) == 0.5 and recall_at_k(perfect, bad, 2) == 1.0
    assert auroc(-perfect, bad) == 0.0
    m = detection_metrics(perfect, bad, fractions=(0.1, 0.3))
    assert m["recall@k=n_bad"] == 1.0 and m["recall@10%"] == 0.5 and m["recall@30%"] == 1.0
    # a constant ranker is random, not storage order
    flat = np.zeros(1000)
    bad = np.zeros(1000, bool)
    bad[:100] = True
    assert recall_at_k(flat, bad, 100, seed=0) < 0.3
    assert sorted(ranking(flat)) == list(range(1000))
    with pytest.raises(ValueError):
        auroc(np.array([np.nan, 1.0]), np.array([True, False]))


def noisy_data(seed=0, n=500):
    exp = synthetic_experiment(n=n, d=8, noise=0.6, seed=seed)
    y, idx = random_label_noise(exp.train_y, 0.1, 2, seed)
    bad = np.zeros(n, bool)
    bad[idx] = True
    data = head_audit_inputs(exp.train_x, y, 2, exp.l2, query_x=exp.val_x, query_y=exp.val_y, seed=seed, folds=3)
    return exp, data, bad


def test_every_ranker_is_finite_and_loss_like_rankers_find_mislabels():
    _, data, bad = noisy_data()
    assert set(available_rankers(data)) == set(RANKERS)
    scores = score_all(data)
    for name, s in scores.items():
        assert s.shape == (data.n,) and np.isfinite(s).all(), name
    for name in (
        "loss",
        "loss_oof",
        "cleanlab",
        "self_influence",
        "loo_loss",
        "tracin_self",
        "query_influence",
        "query_influence_abs",
        "grad_cosine",
    ):
        assert auroc(scores[name], bad) > 0.75, name
    assert abs(auroc(scores["random"], bad) - 0.5) < 0.1
    # the influence-predicted leave-one-out loss is an out-of-fold loss without retraining
    assert np.corrcoef(scores["loo_loss"], scores["loss_oof"])[0, 1] > 0.9


def test_query_ranker_sign_poison_is_an_opponent_of_its_query():
    exp = synthetic_experiment(n=300, d=4, noise=0.3, seed=4)
    # one training point copied onto a query with the wrong label: removing it helps the query
    q = exp.eval_x[:1]
    qy = exp.eval_y[:1]
    x = torch.cat([exp.train_x, q.repeat(3, 1)])
    y = torch.cat([exp.train_y, (1 - qy).repeat(3)])
    data = head_audit_inputs(x, y, 2, exp.l2, query_x=q, query_y=qy)
    s = score_all(data, ["query_influence", "relatif", "grad_cosine"])
    for name, v in s.items():
        assert set(np.argsort(-v)[:3]) == {300, 301, 302}, name


def test_spectral_signature_finds_a_shifted_cluster():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(400, 10))
    labels = np.zeros(400, int)
    reps[:20] += 4 * np.eye(10)[3]
    s = spectral_signature(reps, labels)
    assert auroc(s, np.arange(400) < 20) > 0.95


def test_cleanlab_ranker_uses_flagged_issues_first():
    _, data, bad = noisy_data(seed=1)
    s = score_all(data, ["cleanlab"])["cleanlab"]
    assert (s > 2).sum() > 0  # cleanlab flagged something
    assert bad[s > 2].mean() > 0.3  # 3x the 10% base rate


def test_mislabel_experiment_reports_every_ranker_and_fixing_helps():
    exp = synthetic_experiment(n=500, d=8, noise=0.6, seed=5)
    out = mislabel_experiment(exp, rankers=["random", "loss", "self_influence", "query_influence"])
    assert out["n_flipped"] == 50
    r = out["rankers"]
    assert r["loss"]["recall@10%"] > r["random"]["recall@10%"]
    assert r["self_influence"]["accuracy_after_fix"] >= out["accuracy_noisy_model"] - 0.01
    for row in r.values():
        assert {"auroc", "auprc", "recall@5%", "recall@10%", "recall@20%", "recall@30%"} <= set(row)


def test_trigger_defense_finds_poisons_with_trigger_queries():
    exp = toy_text_experiment(n=800)
    poison = make_trigger_poison(exp, 40, "zq zq zq", n_eval=200, n_val=150)
    out = trigger_defense(exp, poison, rankers=["random", "query_influence", "loss"], remove_fractions=(0.1,))
    q = out["rankers"]["query_influence"]
    assert q["auroc"] > 0.9
    assert q["auroc"] > out["rankers"]["random"]["auroc"]
    assert out["poisoned"]["attack_success"] > out["control"]["attack_success"]
    after = q["after_removal"]["10%"]
    assert after["attack_success"] < out["poisoned"]["attack_success"]


def test_read_queries_errors_are_one_line(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text("text,label\nnice film,fresh\nawful,1\n")
    texts, labels = read_queries(f, ["rotten", "fresh"])
    assert texts == ["nice film", "awful"] and labels.tolist() == [1, 1]
    f.write_text("text,label\nnice,great\n")
    with pytest.raises(UserError, match="row 2") as err:
        read_queries(f, ["rotten", "fresh"])
    assert err.value.field == "query_file"
    with pytest.raises(UserError, match="no column"):
        read_queries(f, ["rotten", "fresh"], label_column="y")
    with pytest.raises(UserError, match="not found"):
        read_queries(tmp_path / "missing.csv", ["a", "b"])


def _closed_form_grads(model, x, y):
    """``(p - y) [x, 1]`` per example for the binary head (weights, then bias)."""
    p = torch.sigmoid(x @ model.linear.weight.detach()[0] + model.linear.bias.detach()[0])
    return (p - y.double())[:, None] * torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)


def test_head_curvature_free_rankers_equal_their_closed_form():
    from influent.defenses.inputs import newton_checkpoints
    from influent.models.refit import fit_head

    exp = synthetic_experiment(n=120, d=3, noise=0.5, seed=6)
    qx, qy = exp.val_x[:9], exp.val_y[:9]
    data = head_audit_inputs(exp.train_x, exp.train_y, 2, exp.l2, query_x=qx, query_y=qy, tracin_checkpoints=3)
    s = score_all(data, ["tracin_self", "grad_cosine", "loss", "query_influence"])
    final, _ = fit_head(exp.train_x, exp.train_y, 2, exp.l2)
    models = [final, *newton_checkpoints(exp.train_x, exp.train_y, 2, exp.l2, 3)]
    tracin = sum(_closed_form_grads(m, exp.train_x, exp.train_y).pow(2).sum(1) for m in models) / len(models)
    np.testing.assert_allclose(s["tracin_self"], tracin.numpy(), rtol=1e-10, atol=1e-14)
    G = _closed_form_grads(final, exp.train_x, exp.train_y)
    Gq = _closed_form_grads(final, qx, qy)
    cos = (Gq / Gq.norm(dim=1, keepdim=True)) @ (G / G.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(s["grad_cosine"], -cos.sum(0).numpy(), rtol=1e-9)
    p = torch.sigmoid(exp.train_x @ final.linear.weight.detach()[0] + final.linear.bias.detach()[0])
    ce = -(exp.train_y * torch.log(p) + (1 - exp.train_y) * torch.log(1 - p))
    np.testing.assert_allclose(s["loss"], ce.numpy(), rtol=1e-10, atol=1e-12)
    X = torch.cat([exp.train_x, torch.ones(len(exp.train_x), 1, dtype=torch.float64)], 1)
    H = (X.T * (p * (1 - p))) @ X / len(X) + exp.l2 * torch.eye(X.shape[1], dtype=torch.float64)
    np.testing.assert_allclose(s["query_influence"], -(Gq @ torch.linalg.solve(H, G.T)).sum(0).numpy(), rtol=1e-8)
