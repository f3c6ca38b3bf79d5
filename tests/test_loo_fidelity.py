"""Influence vs leave-one-out retraining with the issue's design (>= 1,000 examples, 3 queries x 50 examples).

This runs ``benchmarks/loo_fidelity.py``'s comparison on SYNTHETIC data so that the test needs no encoder:
1,000 Gaussian feature vectors of dimension 384 (the MiniLM embedding size; coordinates N(0, 1/384), so
norms are about 1 like sentence embeddings) with labels drawn from a planted logistic model, and the default
head's L2 (1e-3). The benchmark itself runs the same comparison on the real MiniLM embeddings of the bundled
corpus. The head and each leave-one-out model are trained by an independent hand-written Newton iteration
for binary logistic regression (not the library's ``fit_newton``), leave-one-out warm-started from the
optimum, to gradient norm <= 1e-10.
"""

import importlib.util
from pathlib import Path

import torch

from influent.influence import SolverOptions

L2 = 1e-3  # influent.pipeline.DEFAULT_L2


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loo_fidelity.py"
    spec = importlib.util.spec_from_file_location("loo_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ClosedFormNewton:
    """Binary logistic regression with one logit, minimised in place from the model's current parameters.

    Objective ``mean BCE(x w + b, y) + (l2/2)(||w||^2 + b^2)`` with gradient and Hessian written out by hand.
    The first call (training from zeros) runs full Newton and keeps the Cholesky factor of the Hessian at its
    optimum; later calls (leave-one-out, warm-started from that optimum) iterate with that fixed Hessian (a
    chord method, linear convergence at rate O(1/n)) and fall back to full Newton if it stalls. Every call
    stops on the true gradient norm of its own objective; it returns that norm.
    """

    def __init__(self):
        self.chol = None

    def __call__(self, model, task, batch, tol, max_iter=50):
        x, y = batch
        A = torch.cat([x, torch.ones(len(y), 1, dtype=x.dtype)], dim=1)  # [n, d+1]
        theta = torch.cat([model.linear.weight.detach()[0], model.linear.bias.detach()])
        n, eye = len(y), torch.eye(A.shape[1], dtype=x.dtype)
        chord = self.chol is not None
        for it in range(max_iter):
            p = torch.sigmoid(A @ theta)
            g = A.T @ (p - y.to(x.dtype)) / n + task.l2 * theta
            if float(g.norm()) <= tol:
                break
            if chord and it < 30:
                step = torch.cholesky_solve(g[:, None], self.chol)[:, 0]
            else:
                H = (A * (p * (1 - p))[:, None]).T @ A / n + task.l2 * eye
                step = torch.linalg.solve(H, g)
            theta = theta - step
        if not chord:
            p = torch.sigmoid(A @ theta)
            self.chol = torch.linalg.cholesky((A * (p * (1 - p))[:, None]).T @ A / n + task.l2 * eye)
        with torch.no_grad():
            model.linear.weight.copy_(theta[:-1].unsqueeze(0))
            model.linear.bias.copy_(theta[-1:])
        return float(g.norm())


def test_influence_predicts_leave_one_out_on_1000_examples_3_queries_x_50():
    bench = _load_benchmark()
    gen = torch.Generator().manual_seed(0)
    d, n = 384, 1000
    w_true = 2.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n + 3, d, generator=gen, dtype=torch.float64) / d**0.5
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=gen).long()
    out = bench.loo_comparison(
        x[:n],
        y[:n],
        x[n:],
        y[n:],
        2,
        L2,
        top=25,
        random=25,
        seed=0,
        solvers=("exact", "cg"),
        options=SolverOptions(cg_tol=1e-10),
        retrain=ClosedFormNewton(),
        log=lambda _: None,
    )
    exact, cg = out["solvers"]["exact"], out["solvers"]["cg"]
    print(
        f"LOO (synthetic, n={out['n_train']}, {out['pairs']} pairs): exact pearson {exact['pearson']:.5f} "
        f"spearman {exact['spearman']:.5f}; CG pearson {cg['pearson']:.5f} residual {cg['residual']:.1e}"
    )
    assert out["n_train"] == 1000 and out["queries"] == 3 and out["pairs"] == 150
    assert out["loo_max_grad_norm"] <= 1e-10
    assert out["pearson"] >= 0.99
    assert min(exact["pearson_per_query"]) >= 0.99
    assert cg["residual"] <= 1e-8 and cg["cosine_to_exact_min"] >= 0.9999
    assert cg["pearson"] >= 0.99
