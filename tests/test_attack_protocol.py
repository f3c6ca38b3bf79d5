"""The protocol methods the attacks use beyond scores, against independent truths.

``ExactInfluence.mean_query_scores`` (the label-flip gain's s_test contraction) against retraining with one
example up-weighted; ``FactoredInfluence.preconditioned_query_gradients`` (the concealed poisons' direction)
contracted with autograd training gradients against the method's own pairwise scores.
"""

from __future__ import annotations

import torch

from influent.curvature.config import FactorConfig
from influent.factored_influence import FactoredInfluence
from influent.influence import ExactInfluence
from influent.models.head import HeadTask, per_example_loss
from influent.models.refit import fit_head


def _data(n=80, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(n, k, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def test_mean_query_scores_predict_upweighting_a_relabelled_example():
    """``s^T g_z`` = ``-n dA/d eps`` where A is the mean query loss after retraining with ``eps l(z) / n``
    added to the objective (central difference over exact Newton refits), for z a training input with
    another label."""
    x, y = _data()
    qx, qy = _data(n=30, seed=1)
    n, l2, k = len(y), 1e-2, 3
    model, _ = fit_head(x, y, k, l2, tol=1e-13)
    method = ExactInfluence(model, HeadTask(l2), (x, y))
    rows = [0, 7, 19]
    alt = (y[rows] + 1) % k
    predicted = method.mean_query_scores((qx, qy), (x[rows], alt))
    eps = 1e-3
    for j, i in enumerate(rows):
        objective = []
        for e in (eps, -eps):
            xs, ys = torch.cat([x, x[i : i + 1]]), torch.cat([y, alt[j : j + 1]])
            # fit_head's mean is over its n + 1 rows: these weights make it sum(l) / n + e l(z) / n
            weights = torch.cat([torch.ones(n), torch.tensor([e])]).double() * (n + 1) / n
            m, _ = fit_head(xs, ys, k, l2, weights=weights, init=model, tol=1e-13)
            objective.append(float(per_example_loss(m, qx, qy).mean()))
        actual = -n * (objective[0] - objective[1]) / (2 * eps)
        assert abs(float(predicted[j]) - actual) < 1e-4 * max(1.0, abs(actual)), (i, float(predicted[j]), actual)
    # on the training examples themselves it is the row mean of the pairwise scores
    torch.testing.assert_close(method.mean_query_scores((qx, qy)), method.pairwise_scores((qx, qy)).mean(0))


def test_preconditioned_query_gradients_contract_to_the_pairwise_scores():
    """``sum_modules <(F + damping)^-1 g_q, g_i>`` with ``g_i`` from autograd = the factored pairwise score."""
    x, y = _data()
    model, task = fit_head(x, y, 3, 1e-2)
    model = model.float()
    x32 = x.float()
    batches = [(x32[i : i + 20], y[i : i + 20]) for i in range(0, len(y), 20)]
    method = FactoredInfluence(model, task, batches, FactorConfig(strategy="ekfac", damping=1e-3), progress=False)
    queries = (x32[:5], y[:5])
    pre = method.preconditioned_query_gradients(queries)
    assert set(pre) == {"linear"} and pre["linear"].shape == (5, 3, 5)
    scores = method.pairwise_scores(queries)
    for i in (0, 11, 42):
        loss = task.per_example_loss(model, (x32[i : i + 1], y[i : i + 1])).sum()
        gw, gb = torch.autograd.grad(loss, [model.linear.weight, model.linear.bias])
        g = torch.cat([gw, gb[:, None]], dim=1).double()
        contracted = (pre["linear"].double() * g).sum((1, 2))
        torch.testing.assert_close(contracted, scores[:, i], rtol=1e-4, atol=1e-7)
