"""The package's one Newton loop (models.newton.minimise) against independent optima.

Checked: a quadratic (one exact step to A^-1 b), a non-convex function whose Hessian is indefinite at the
start (the Levenberg-Marquardt shift), and the logistic head's optimum from both of its fitters (closed-form
derivatives in models.refit, autograd Hessian in models.newton.fit_newton) against scikit-learn's
LogisticRegression at the same penalty.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from influent.gradients import ParameterSpace, full_gradient
from influent.models.head import LogisticHead, train_head
from influent.models.newton import minimise
from influent.models.refit import fit_head


def test_minimise_solves_a_quadratic_in_one_step():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    A = M @ M.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    result = minimise(lambda t: 0.5 * t @ A @ t - b @ t, torch.zeros(6, dtype=torch.float64), lambda t: A, 1e-12, 20)
    assert torch.allclose(result.theta, torch.linalg.solve(A, b), atol=1e-12)
    assert result.iterations == 1 and result.grad_norm < 1e-12
    assert result.objective == pytest.approx(-0.5 * float(b @ torch.linalg.solve(A, b)), rel=1e-12)


def test_minimise_shifts_an_indefinite_hessian_and_reaches_the_minimum():
    # f(x, y) = x^4/4 - x^2/2 + y^2/2: Hessian diag(3x^2 - 1, 1) is indefinite at x = 0.1; minima at (+-1, 0)
    def f(t):
        return t[0] ** 4 / 4 - t[0] ** 2 / 2 + t[1] ** 2 / 2

    def hess(t):
        return torch.diag(torch.stack([3 * t[0] ** 2 - 1, torch.ones((), dtype=t.dtype)]))

    result = minimise(f, torch.tensor([0.1, 1.0], dtype=torch.float64), hess, 1e-12, 100)
    assert result.grad_norm < 1e-12
    assert torch.allclose(result.theta, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-10)


def _data(n, d, classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    logits = x @ torch.randn(d, classes, dtype=torch.float64, generator=gen)
    y = logits.argmax(1)
    flip = torch.rand(n, generator=gen) < 0.2  # noise keeps the problem away from separability
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=gen), y)
    return x, y


def _sklearn_optimum(x, y, classes, l2):
    """``[K', d + 1]`` optimum of mean CE + (l2/2)||[W | b]||^2 (bias penalised: a ones column, no intercept)."""
    X = np.hstack([x.numpy(), np.ones((len(y), 1))])
    clf = LogisticRegression(C=1.0 / (len(y) * l2), fit_intercept=False, tol=1e-12, max_iter=10_000)
    clf.fit(X, y.numpy())
    return clf.coef_  # binary: [1, d+1] for class 1; multiclass: [K, d+1] (all K penalised, as the head)


def _flat(model: LogisticHead) -> np.ndarray:
    return torch.cat([model.linear.weight, model.linear.bias[:, None]], dim=1).detach().numpy()


@pytest.mark.parametrize("classes", [2, 3])
def test_both_head_fitters_reach_sklearns_optimum(classes):
    l2 = 1e-2
    x, y = _data(300, 4, classes)
    reference = _sklearn_optimum(x, y, classes, l2)
    fast, task = fit_head(x, y, classes, l2, tol=1e-11)
    generic, _, report = train_head(x, y, classes, l2, tol=1e-11)
    for model in (fast, generic):
        assert np.allclose(_flat(model), reference, atol=1e-6)
        grad = full_gradient(ParameterSpace(model, task), ParameterSpace(model, task).flat(), (x, y))
        assert float(grad.norm()) < 1e-10
    assert report.grad_norm < 1e-11 and 1 <= report.iterations < 20
    assert np.allclose(_flat(fast), _flat(generic), atol=1e-10)


def test_fit_head_with_zero_tolerance_runs_exactly_max_iter_newton_steps():
    """The rankers' TracIn checkpoints are the first Newton iterates: tol=0 must not stop early."""
    x, y = _data(200, 3, 2)
    one = _flat(fit_head(x, y, 2, 1e-2, tol=0.0, max_iter=1)[0])
    two = _flat(fit_head(x, y, 2, 1e-2, tol=0.0, max_iter=2)[0])
    # first iterate from zeros: p = 1/2 everywhere, so the step solves (X^T X / 4n + l2 I) w = X^T (1/2 - y) / n
    X = np.hstack([x.numpy(), np.ones((200, 1))])
    H = X.T @ X / (4 * 200) + 1e-2 * np.eye(4)
    g = X.T @ (0.5 - y.numpy()) / 200
    assert np.allclose(one[0], -np.linalg.solve(H, g), atol=1e-12)
    assert not np.allclose(one, two)
