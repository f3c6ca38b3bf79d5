"""The exact engine against independent truths: autograd loops, direct solves, finite differences, retraining."""

import copy

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from influent.curvature.exact import HessianOperator, exact_hessian, gauss_newton
from influent.curvature.solvers import DirectSolver, NumericalError, conjugate_gradient, lissa
from influent.gradients import ParameterSpace
from influent.influence import ExactInfluence, SolverOptions
from influent.models.head import HeadTask, LogisticHead, train_head
from influent.models.newton import fit_newton


def make_data(n=200, d=6, classes=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    logits = x @ w + 0.5 * torch.randn(n, classes, generator=gen, dtype=torch.float64)
    return x, logits.argmax(1)


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("classes", [2, 3])
def test_per_example_grads_equal_autograd_loop(classes):
    x, y = make_data(classes=classes)
    model, task, _ = train_head(x, y, classes, l2=1e-2)
    space = ParameterSpace(model, task)
    G = space.per_example_grads((x, y))
    for i in range(0, len(y), 17):
        model.zero_grad()
        task.per_example_loss(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        loop = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert (G[i] - loop).abs().max() <= 1e-8


def test_newton_reaches_stationary_point_and_hessian_matches_finite_differences():
    x, y = make_data(classes=3)
    model, task, report = train_head(x, y, 3, l2=1e-2)
    assert report.grad_norm < 1e-10
    space = ParameterSpace(model, task)
    H = exact_hessian(space, (x, y))
    # Gauss-Newton equals the Hessian for a linear model under cross-entropy.
    assert torch.allclose(gauss_newton(space, (x, y)), H, atol=1e-10)
    v = torch.randn(space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(HessianOperator(space, (x, y)).matvec(v), H @ v, atol=1e-10)


def test_cg_and_lissa_match_direct_solve_and_report_residuals():
    x, y = make_data(n=300, d=8)
    model, task, _ = train_head(x, y, 2, l2=1e-2)
    space = ParameterSpace(model, task)
    H = exact_hessian(space, (x, y))
    B = space.per_example_grads((x[:5], y[:5])).T
    direct = DirectSolver(H).solve(B)
    assert direct.residual < 1e-10
    op = HessianOperator(space, (x, y)).matvec
    cg = conjugate_gradient(op, B, tol=1e-12, max_iter=200)
    assert cg.residual < 1e-10
    assert min(cosine(cg.x[:, j], direct.x[:, j]) for j in range(5)) >= 0.9999
    li = lissa(op, B, depth=600)
    cos_lissa = min(cosine(li.x[:, j], direct.x[:, j]) for j in range(5))
    print(f"CG iterations {cg.iterations} residual {cg.residual:.2e}; LiSSA residual {li.residual:.2e} cos {cos_lissa:.5f}")
    assert cos_lissa >= 0.99
    # Stochastic LiSSA on minibatches still lands close.
    engine = ExactInfluence(
        model, task, (x, y), solver="lissa",
        options=SolverOptions(lissa_depth=400, lissa_repeats=2, lissa_batch_size=100, seed=3),
    )
    sto = engine.inverse_hvp(B)
    assert min(cosine(sto.x[:, j], direct.x[:, j]) for j in range(5)) >= 0.97


def test_direct_solver_rejects_indefinite_matrix_and_damping_fixes_it():
    A = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    with pytest.raises(NumericalError):
        DirectSolver(A)
    sol = DirectSolver(A, damping=1.0).solve(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(sol.x, torch.tensor([0.5, 2.0], dtype=torch.float64))


def test_self_scores_equal_pairwise_diagonal_and_params_influence_matches_definition():
    x, y = make_data(n=120)
    model, task, _ = train_head(x, y, 2, l2=1e-2)
    eng = ExactInfluence(model, task, (x, y))
    pair = eng.pairwise_scores((x[:10], y[:10]))
    assert torch.allclose(eng.self_scores()[:10], pair.diagonal(), atol=1e-10)
    assert (eng.self_scores() >= 0).all()
    ip = eng.params_influence((x[:3], y[:3]))
    H = eng.curvature_matrix
    assert torch.allclose(H @ ip.T, -eng.train_grads[:3].T, atol=1e-10)


def test_pert_influence_matches_finite_difference_of_retrained_query_loss():
    x, y = make_data(n=80, d=4)
    model, task, _ = train_head(x, y, 2, l2=5e-2)
    eng = ExactInfluence(model, task, (x, y))
    q = (x[:1] + 0.3, y[:1])
    t = 7
    ipert = eng.pert_influence(q, (x[t : t + 1], y[t : t + 1]))[0, 0]  # [d]
    base = float(task.per_example_loss(model, q)[0])
    eps = 1e-4
    direction = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    x2[t] += eps * direction
    m2 = copy.deepcopy(model)
    fit_newton(m2, task, (x2, y), tol=1e-13)
    actual = (float(task.per_example_loss(m2, q)[0]) - base) / eps
    predicted = float((ipert * direction).sum()) / len(y)
    assert predicted == pytest.approx(actual, rel=1e-3)


def test_influence_predicts_leave_one_out_retraining():
    x, y = make_data(n=400, d=5)
    model, task, _ = train_head(x, y, 2, l2=1e-2)
    eng = ExactInfluence(model, task, (x, y))
    queries = (x[:3] * 1.5, y[:3])
    scores = eng.loss_change(eng.pairwise_scores(queries))
    base = task.per_example_loss(model, queries).detach()
    predicted, actual = [], []
    idx = np.random.default_rng(0).choice(len(y), 25, replace=False)
    for i in idx:
        keep = torch.tensor([j for j in range(len(y)) if j != i])
        m = copy.deepcopy(model)
        fit_newton(m, task, (x[keep], y[keep]), tol=1e-12)
        actual.append((task.per_example_loss(m, queries).detach() - base).numpy())
        predicted.append(scores[:, i].numpy())
    a, p = np.concatenate(actual), np.concatenate(predicted)
    print(f"LOO pearson {pearsonr(a, p)[0]:.5f} spearman {spearmanr(a, p)[0]:.5f}")
    assert pearsonr(a, p)[0] >= 0.99


def test_scores_sign_convention_on_a_hand_computed_case():
    # One-parameter ridge-free logistic model: theta scalar, no bias. Computed by hand below.
    model = LogisticHead(1, 2).double()
    task = HeadTask(l2=1.0)
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    model.linear.bias.requires_grad_(False)
    torch.nn.init.zeros_(model.linear.bias)
    fit_newton(model, task, (x, y), tol=1e-14)
    w = float(model.linear.weight)
    s = lambda z: 1 / (1 + np.exp(-z))
    g = np.array([(s(w * 1) - 1) * 1, (s(w * 2) - 0) * 2])
    h = (s(w) * (1 - s(w)) * 1 + s(2 * w) * (1 - s(2 * w)) * 4) / 2 + 1.0
    eng = ExactInfluence(model, task, (x, y))
    # Query = the first training example: it must be its own proponent.
    scores = eng.pairwise_scores((x[:1], y[:1]))[0].numpy()
    assert scores == pytest.approx(g[0] * g / h, rel=1e-10)
    assert scores[0] > 0
