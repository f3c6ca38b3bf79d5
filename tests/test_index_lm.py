"""``influent index build --model lm`` and ``influent trace --index`` on a tiny LLaMA built in code, against
``influent trace`` itself (the factored engine over every training sequence)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import run_cli
from lm_fixtures import FACTS, tiny_lm_folder

QUERY = ["--prompt", "the capital of italy", "--completion", "is rome", "--top", "4", "--json"]


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-index")
    folder = tiny_lm_folder(root / "model", "llama")
    data = root / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    base = ["--data", str(data), "--base-model", str(folder), "--cache-dir", str(root / "cache"), "--last-k", "1",
            "--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet"]
    return root, base


def build(capsys, base, folder, *extra) -> dict:
    code, out, err = run_cli(capsys, ["index", "build", "--model", "lm", "--index", str(folder), "--json",
                                      *extra, *base])
    assert code == 0, err
    return json.loads(out)


def trace_json(capsys, argv) -> dict:
    code, out, err = run_cli(capsys, ["trace", *argv])
    assert code == 0, err
    return json.loads(out)


def test_lossless_index_gives_the_factored_top_k_and_rerank_the_exact_scores(capsys, lm_files):
    root, base = lm_files
    exact = trace_json(capsys, [*QUERY, "--damping", "1e-3", "--top", "10", *base])  # all 10 sequences
    # rank 64 >= every MLP width (8, 12): an orthogonal projection is a rotation, nothing is lost
    built = build(capsys, base, root / "full", "--rank", "64", "--projection", "orthogonal", "--damping", "1e-3")
    assert built["n_examples"] == 10 and built["bytes_per_example"] == 4 * 3 * (8 * 12)  # gate, up, down of block 1
    full = trace_json(capsys, [*QUERY, "--index", str(root / "full"), "--report", str(root / "r.html"), *base])
    assert "<html" in (root / "r.html").read_text().lower()
    assert full["candidates"] == {"method": "index", "kept": 10, "of": 10}
    assert full["query"] == exact["query"]
    assert [r["id"] for r in full["results"]] == [r["id"] for r in exact["results"][:4]]
    top = max(abs(r["score"]) for r in exact["results"])
    for got, want in zip(full["results"], exact["results"]):
        assert got["score"] == pytest.approx(want["score"], rel=1e-3, abs=1e-5 * top)
        assert got["loss_change"] == pytest.approx(got["score"] / 10)
    # the margin measurement and RelatIF (the stored self-influence) through the same lossless index
    margin = ["--measurement", "margin", "--rank", "relatif", "--damping", "1e-3"]
    exact_m = trace_json(capsys, [*QUERY, *margin, "--top", "10", *base])
    full_m = trace_json(capsys, [*QUERY, *margin, "--index", str(root / "full"), *base])
    assert full_m["query"] == exact_m["query"] and full_m["ranking"] == "relatif"
    assert [r["id"] for r in full_m["results"]] == [r["id"] for r in exact_m["results"][:4]]
    top_m = max(abs(r["rank_value"]) for r in exact_m["results"])
    for got, want in zip(full_m["results"], exact_m["results"]):
        assert got["rank_value"] == pytest.approx(want["rank_value"], rel=1e-3, abs=1e-5 * top_m)
    # a lossy index (rank 2) reranked: the factored engine's own scores, re-sorted
    build(capsys, base, root / "small", "--rank", "2")
    small = trace_json(capsys, [*QUERY, "--index", str(root / "small"), "--rerank", "6", "--damping", "1e-3", *base])
    by_id = {r["id"]: r["score"] for r in exact["results"]}
    scores = [r["score"] for r in small["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4 and small["index"]["rerank"] == 6
    assert scores == pytest.approx([by_id[r["id"]] for r in small["results"]], rel=1e-6)
    values = {r["id"]: r["rank_value"] for r in exact_m["results"]}
    small_m = trace_json(capsys, [*QUERY, *margin, "--index", str(root / "small"), "--rerank", "6", *base])
    got = [r["rank_value"] for r in small_m["results"]]
    assert got == sorted(got, reverse=True) and got == pytest.approx([values[r["id"]] for r in small_m["results"]],
                                                                     rel=1e-6)


def test_index_flags_are_checked(capsys, lm_files, tmp_path):
    root, base = lm_files
    build(capsys, base, root / "flags", "--rank", "2")
    for extra, needle in ((["--rerank", "2"], "--rerank"), (["--candidates", "3"], "--candidates"),
                          (["--rerank", "6", "--modules", "all"], "--modules")):
        code, _, err = run_cli(capsys, ["trace", *QUERY, "--index", str(root / "flags"), *extra, *base])
        assert code == 2 and needle in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, ["trace", *QUERY, "--rerank", "5", *base])  # no --index
    assert code == 2 and "--index" in err
    code, _, err = run_cli(capsys, ["trace", *QUERY, "--index", str(tmp_path / "none"), *base])
    assert code == 2 and "no complete index" in err
