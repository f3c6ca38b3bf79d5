"""docs/robust-statistics.md's worked example: influent's exact engine against the closed-form influence
functions of the mean (unbounded) and of a smoothed median (bounded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_mean_and_smoothed_median_match_their_closed_forms():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "robust_influence.py"
    spec = importlib.util.spec_from_file_location("robust_influence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table, facts = module.run(n=201, eps=0.05, seed=1)
    assert facts["errors"]["mean"] < 1e-10 and facts["errors"]["median"] < 1e-10
    assert 0.5 < facts["bound"] < 2.5  # ~ 1 / (2 f(m)) = 1.2533 for a standard normal sample (n = 201: rough)
    assert "+10.0000" in table
