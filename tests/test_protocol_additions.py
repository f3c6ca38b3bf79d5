"""What the audit rankers need from the influence protocol (``train_losses``, ``train_gradients``, the exact
method's ``identity`` curvature), in both implementations, against the closed-form logistic head."""

import torch

from influent.curvature.config import FactorConfig
from influent.factored_influence import FactoredInfluence
from influent.influence import ExactInfluence
from influent.models.head import train_head


def _head(n=50, d=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    model, task, _ = train_head(x, y, 2, 1e-2)
    return model, task, x, y


def _closed_form(model, x, y):
    """Cross-entropy and its gradient ``(p - y) [x, 1]`` of every example of the binary head."""
    z = x @ model.linear.weight.detach()[0] + model.linear.bias.detach()[0]
    p = torch.sigmoid(z)
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    grads = (p - y.double())[:, None] * torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    return loss, grads


def test_train_losses_and_gradients_match_the_closed_form_in_both_methods():
    model, task, x, y = _head()
    loss, grads = _closed_form(model, x, y)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]
    methods = [
        ExactInfluence(model, task, (x, y)),
        FactoredInfluence(model, task, batches, FactorConfig(strategy="kfac", damping=1e-3), progress=False),
    ]
    for m in methods:
        torch.testing.assert_close(m.train_losses(), loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.train_gradients(), grads, rtol=1e-10, atol=1e-12)


def test_identity_curvature_gives_gradient_dot_products():
    model, task, x, y = _head()
    _, grads = _closed_form(model, x, y)
    exact = ExactInfluence(model, task, (x, y), curvature="identity")
    torch.testing.assert_close(exact.pairwise_scores((x[:7], y[:7])), grads[:7] @ grads.T)
    torch.testing.assert_close(exact.self_scores(), grads.pow(2).sum(1))
    # the factored identity strategy is the same up to its (1 + damping + l2) scale
    factored = FactoredInfluence(model, task, [(x, y)], FactorConfig(strategy="identity", damping=1.0), progress=False)
    torch.testing.assert_close(factored.self_scores() * (2.0 + task.l2), grads.pow(2).sum(1))
