"""The influence protocol: both implementations agree with themselves (self = diagonal of pairwise,
query self-scores = diagonal of pairwise on the same examples) and with a dense definition."""

import torch

from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.influence import ExactInfluence, InfluenceMethod
from influent.models.head import train_head


def _head(n=60, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    model, task, _ = train_head(x, y, 2, 1e-2)
    return model, task, x, y


def _methods():
    model, task, x, y = _head()
    exact = ExactInfluence(model, task, (x, y), damping=1e-3)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]
    factored = FactoredInfluence(
        model, task, batches, FactorConfig(strategy="ekfac", damping=1e-3), progress=False
    )
    return [exact, factored], (x, y)


def test_protocol_self_is_diagonal_of_pairwise():
    methods, (x, y) = _methods()
    for m in methods:
        assert isinstance(m, InfluenceMethod)
        assert m.n_train == len(y)
        pair = m.pairwise_scores([(x[:20], y[:20]), (x[20:], y[20:])])
        assert pair.shape == (1 * len(y), len(y))
        torch.testing.assert_close(m.self_scores().double(), pair.diagonal().double(), rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(
            m.query_self_scores((x, y)).double(), pair.diagonal().double(), rtol=1e-6, atol=1e-10
        )
        torch.testing.assert_close(m.loss_change(pair), pair / len(y))
        assert isinstance(m.describe(), dict)


def test_exact_matches_dense_definition():
    model, task, x, y = _head()
    m = ExactInfluence(model, task, (x, y), damping=1e-3)
    H = m.curvature_matrix + 1e-3 * torch.eye(m.space.dim, dtype=torch.float64)
    G = m.train_grads
    torch.testing.assert_close(m.pairwise_scores((x[:5], y[:5])), G[:5] @ torch.linalg.solve(H, G.T))
