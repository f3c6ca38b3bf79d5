"""LDS (influent.evaluation.lds) against hand-computed cases and an exactly linear datamodel."""

from __future__ import annotations

import numpy as np
import pytest

from influent.errors import UserError
from influent.evaluation.lds import lds, lds_summary, predicted_group_change, random_subsets


def test_hand_computed_prediction_and_spearman():
    # n = 4 training examples, one query; scores (positive = proponent), 4 subsets
    scores = np.array([[4.0, -8.0, 2.0, 6.0]])
    keep = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    # predicted change = sum of the removed examples' scores / n
    want = np.array([[(2 + 6) / 4], [(4 + 6) / 4], [-8 / 4], [(4 - 8) / 4]])  # 2.0, 2.5, -2.0, -1.0
    np.testing.assert_allclose(predicted_group_change(scores, keep), want)
    # prediction ranks 3, 4, 1, 2; actual ranks 4, 3, 1, 2: sum d^2 = 2 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8
    actual = np.array([[0.9], [0.5], [0.1], [0.2]])
    mean, per_query = lds(scores, keep, actual)
    assert mean == pytest.approx(0.8) and per_query.tolist() == pytest.approx([0.8])


def test_exact_linear_datamodel_scores_one_and_its_negation_minus_one():
    rng = np.random.default_rng(3)
    n, q, m = 40, 5, 30
    effect = rng.normal(size=(q, n))  # loss contribution of including example i, per query
    keep = random_subsets(n, m, 0.5, seed=1)
    actual = 2.0 + keep.astype(float) @ effect.T  # [m, Q]: the loss of the model trained on each subset
    scores = -n * effect  # a proponent (effect < 0: it lowers the loss when included) has score > 0
    mean, per_query = lds(scores, keep, actual)
    assert mean == pytest.approx(1.0) and np.allclose(per_query, 1.0)
    assert lds(-scores, keep, actual)[0] == pytest.approx(-1.0)
    assert lds(0.01 * scores, keep, actual)[0] == pytest.approx(1.0)  # invariant to a positive rescaling
    noisy = actual + rng.normal(scale=3.0, size=actual.shape)
    assert 0.0 < lds(scores, keep, noisy)[0] < 0.9  # noise lowers it


def test_random_subsets_are_seeded_halves():
    a = random_subsets(11, 6, 0.5, seed=4)
    assert a.shape == (6, 11) and (a.sum(1) == 6).all()  # round(5.5) = 6
    assert np.array_equal(a, random_subsets(11, 6, 0.5, seed=4))
    assert not np.array_equal(a, random_subsets(11, 6, 0.5, seed=5))
    with pytest.raises(UserError):
        random_subsets(10, 3, 1.0)


def test_summary_interval_and_undefined_queries():
    rng = np.random.default_rng(0)
    n, m = 20, 25
    keep = random_subsets(n, m, 0.5, seed=0)
    effect = rng.normal(size=(3, n))
    actual = keep.astype(float) @ effect.T + rng.normal(scale=1.0, size=(m, 3))
    actual[:, 2] = 7.0  # a query whose measurement never changes: Spearman undefined, left out
    out = lds_summary(-n * effect, keep, actual, seed=0)
    per = out["per_query"]
    assert np.isnan(per[2]) and out["m"] == 2
    assert out["mean"] == pytest.approx(np.mean(per[:2]))
    assert min(per[:2]) <= out["low"] <= out["mean"] <= out["high"] <= max(per[:2])
