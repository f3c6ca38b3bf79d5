"""``influent index build`` and ``influent explain --index`` on a tiny fine-tuned BERT built in code."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

FT = ["--model", "finetuned", "--last-k", "1", "--epochs", "1", "--lr", "1e-3", "--batch-size", "8"]


@pytest.fixture()
def base_args(data_args):
    return data_args


def test_index_build_then_explain_from_it(capsys, base_args, tmp_path):
    folder = str(tmp_path / "index")
    code, out, err = run_cli(capsys, ["index", "build", "--index", folder, "--rank", "4", "--shard-size", "20",
                                      "--json", *FT, *base_args])
    assert code == 0, err
    built = json.loads(out)
    assert built["n_examples"] == 64 and built["shards"] == 2 and built["bytes_per_example"] == 4 * built["width"]
    query = ["explain", "--test-index", "0", "--top", "3", "--json", *FT, *base_args]
    code, out, err = run_cli(capsys, [*query, "--index", folder])
    assert code == 0, err
    fast = json.loads(out)
    assert fast["index"]["rank"] == 4 and fast["index"]["rerank"] is None
    assert 1 <= len(fast["proponents"]) <= 3
    # reranking every training example with the factored engine is the factored explanation itself, under
    # explain's default ranking (relatif) and under raw influence
    for rank in ("relatif", "influence"):
        code, out, err = run_cli(capsys, [*query, "--index", folder, "--rerank", "64", "--rank", rank])
        assert code == 0, err
        reranked = json.loads(out)
        code, out, err = run_cli(capsys, [*query, "--rank", rank])
        assert code == 0, err
        exact = json.loads(out)
        assert reranked["ranking"] == exact["ranking"] == rank
        for side in ("proponents", "opponents"):
            assert [r["id"] for r in reranked[side]] == [r["id"] for r in exact[side]]
            for key in ("score", "rank_value"):
                assert [r[key] for r in reranked[side]] == pytest.approx([r[key] for r in exact[side]], rel=1e-6)
    # a second build of the same settings finds the index complete; other settings are refused
    code, out, err = run_cli(capsys, ["index", "build", "--index", folder, "--rank", "4", "--shard-size", "20",
                                      "--json", *FT, *base_args])
    assert code == 0 and json.loads(out)["shards_built_this_run"] == 0
    code, _, err = run_cli(capsys, ["index", "build", "--index", folder, "--rank", "5", *FT, *base_args])
    assert code == 2 and "another build" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, needle", [(["--rank", "0"], "--rank"), (["--device", "cuda:7"], "cuda")])
def test_bad_index_options_are_one_line_exit_2(capsys, base_args, tmp_path, extra, needle, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, ["index", "build", "--index", str(tmp_path / "i"), *extra, *FT, *base_args])
    assert code == 2 and needle in err and err.count("\n") == 1
