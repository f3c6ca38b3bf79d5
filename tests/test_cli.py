"""The `influent` command end to end on a tiny encoder and a small CSV, and every user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from influent.pipeline import prepare_head


def test_explain_json_matches_a_dense_solve(capsys, base_args, tiny_encoder_dir, reviews_csv, tmp_path):
    from test_explain import dense_head_scores

    text = "a great and witty film"
    code, out, err = run_cli(capsys, ["explain", "--rank", "influence", "--text", text, "--top", "4", "--json",
                                      *base_args])
    assert code == 0, err
    result = json.loads(out)
    setup = prepare_head(str(reviews_csv), text_column="review", label_column="sentiment",
                         encoder=str(tiny_encoder_dir), cache_dir=tmp_path / "cache", l2=0.01, progress=False)
    xq = setup.embed([text])[0]
    probs = setup.model.probabilities(xq[None]).detach()[0]
    pred = int(probs.argmax())
    assert result["query"] == {"text": text, "prediction": ["neg", "pos"][pred], "probability": pytest.approx(
        float(probs[pred]), rel=1e-12), "explained_label": ["neg", "pos"][pred], "true_label": None}
    dense = dense_head_scores(setup, xq, pred)  # closed-form gradients and Hessian of the head
    order = torch.argsort(dense, descending=True)
    n_train = 64  # 80 rows, 20% held out
    for kind, picked in (("proponents", order[:4]), ("opponents", order.flip(0)[:4])):
        assert [r["id"] for r in result[kind]] == [setup.corpus.ids[setup.train_idx[int(i)]] for i in picked]
        assert [r["score"] for r in result[kind]] == pytest.approx(dense[picked].tolist(), rel=1e-8)
        assert [r["loss_change"] for r in result[kind]] == pytest.approx((dense[picked] / n_train).tolist(), rel=1e-8)
        assert [r["label"] for r in result[kind]] == [
            ["neg", "pos"][int(setup.train_y[int(i)])] for i in picked
        ]
    assert set(result["solver"]) == {"method", "residual", "iterations", "converged"}
    assert result["solver"]["converged"] is True  # an exact solve


def test_explain_matches_engine_and_reuses_cache(capsys, base_args, tiny_encoder_dir, reviews_csv, tmp_path):
    code, out, _ = run_cli(capsys, ["explain", "--rank", "influence", "--test-index", "3", "--top", "2", "--json",
                                    *base_args])
    assert code == 0
    result = json.loads(out)
    setup = prepare_head(str(reviews_csv), text_column="review", label_column="sentiment",
                         encoder=str(tiny_encoder_dir), cache_dir=tmp_path / "cache", l2=0.01, progress=False)
    assert (setup.folder / "head.json").exists()
    pred = int(setup.model.probabilities(setup.test_x[3:4]).argmax())
    scores = setup.engine().pairwise_scores((setup.test_x[3:4], torch.tensor([pred])))[0]
    best = int(scores.argmax())
    assert result["proponents"][0]["id"] == setup.corpus.ids[setup.train_idx[best]]
    assert result["proponents"][0]["score"] == pytest.approx(float(scores[best]), rel=1e-8)
    # The text explain shows the same ranking in human form.
    code, out, _ = run_cli(capsys, ["explain", "--rank", "influence", "--test-index", "3", "--top", "2", "--solver",
                                    "cg", *base_args])
    assert code == 0 and "Proponents" in out and "Opponents" in out


def test_train_and_demo_write_outputs(capsys, base_args, tmp_path):
    code, out, _ = run_cli(capsys, ["train", *base_args])
    assert code == 0 and "test accuracy" in out
    code, out, _ = run_cli(capsys, ["demo", "--out", str(tmp_path / "out"), *base_args])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "demo_explanations.json").read_text())
    assert len(saved["explanations"]) == 3


def _one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("influent: error:"), err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower()


@pytest.mark.parametrize(
    "make_file, extra, needle",
    [
        (None, [], "not found"),
        (lambda p: p.write_text(""), [], "empty"),
        (lambda p: p.write_text("review,sentiment\n"), [], "no rows"),
        (lambda p: p.write_bytes(b"\x00\xff\xfe garbage \x00" * 50), [], "reviews.csv"),
        (lambda p: p.write_text("review,sentiment\ngood film,pos\nbad film,neg\n"), ["--text-column", "body"], "body"),
        (lambda p: p.write_text("review,sentiment\ngood film,pos\nnice film,pos\n"), [], "only one class"),
    ],
    ids=["missing", "empty", "header-only", "unreadable", "unknown-column", "single-class"],
)
def test_bad_data_is_one_line_exit_2(capsys, tmp_path, tiny_encoder_dir, make_file, extra, needle):
    path = tmp_path / "reviews.csv"
    if make_file is not None:
        make_file(path)
    args = ["explain", "--text", "good", "--data", str(path), "--text-column", "review", "--label-column",
            "sentiment", "--encoder", str(tiny_encoder_dir), "--cache-dir", str(tmp_path / "c"), "--quiet", *extra]
    code, _, err = run_cli(capsys, args)
    _one_line_error(code, err, needle)


def test_unknown_model_name_is_one_line_exit_2(capsys, reviews_csv, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    args = ["explain", "--text", "good", "--data", str(reviews_csv), "--text-column", "review",
            "--label-column", "sentiment", "--encoder", "no-such-org/no-such-model", "--cache-dir",
            str(tmp_path / "c"), "--quiet"]
    code, _, err = run_cli(capsys, args)
    _one_line_error(code, err, "no-such-org/no-such-model")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--test-index", "999"], "out of range"),
        (["--text", "good", "--test-index", "1"], "exactly one"),
        (["--text", "good", "--label", "meh"], "meh"),
        (["--text", "good", "--top", "0"], "--top"),
    ],
)
def test_bad_options_are_one_line_exit_2(capsys, base_args, extra, needle):
    code, _, err = run_cli(capsys, ["explain", *extra, *base_args])
    _one_line_error(code, err, needle)


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "influent.cli", "explain", "--text", "x", "--data", str(tmp_path / "nope.csv")],
        check=False, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.csv" in proc.stderr


def test_finetuned_train_then_explain_with_ekfac(capsys, base_args, monkeypatch):
    import influent.explain

    calls, calls_setups = [], []
    one_function = influent.explain.explain_rankings  # explain() and the CLI's --rank both go through it

    def spy(method, setup, *args, **kwargs):
        calls.append(method)
        calls_setups.append(setup)
        return one_function(method, setup, *args, **kwargs)

    monkeypatch.setattr(influent.explain, "explain_rankings", spy)
    code, out, err = run_cli(capsys, ["explain", "--text", "good", "--top", "1", "--json", *base_args])
    assert code == 0, err
    assert [type(m).__name__ for m in calls] == ["ExactInfluence"]  # the head goes through explain() too
    calls.clear()
    calls_setups.clear()
    ft = ["--model", "finetuned", "--last-k", "1", "--epochs", "2", "--lr", "1e-3", "--batch-size", "8"]
    base_args = base_args[:-2]  # no --l2: the fine-tuned classifier has none (the flag is refused)
    code, out, err = run_cli(capsys, ["train", *ft, *base_args])
    assert code == 0, err
    assert "test accuracy" in out
    code, out, err = run_cli(capsys, ["explain", "--test-index", "0", "--top", "3", "--json", "--strategy", "ekfac",
                                      "--rank", "influence", *ft, *base_args])
    assert code == 0, err
    result = json.loads(out)
    assert result["curvature"] == {"strategy": "ekfac", "modules": "trainable", "fisher": "empirical",
                                   "damping": None}
    assert [type(m).__name__ for m in calls] == ["FactoredInfluence"]
    # the same numbers as the protocol's method over the same checkpoint (plumbing: ids, labels, n)
    setup = calls_setups[0]
    method = setup.influence("ekfac", progress=False)
    pred = ["neg", "pos"].index(result["query"]["explained_label"])
    row = int(setup.test_idx[0])
    scores = method.pairwise_scores(setup.text_batches([setup.corpus.texts[row]], [pred]))[0]
    best = int(scores.argmax())
    assert result["proponents"][0]["id"] == setup.corpus.ids[setup.train_idx[best]]
    assert result["proponents"][0]["score"] == pytest.approx(float(scores[best]), rel=1e-6)
    assert result["proponents"][0]["loss_change"] == pytest.approx(float(scores[best]) / 64, rel=1e-6)
    # Factors were cached beside the checkpoint: the second explain reuses them and agrees.
    code, out2, _ = run_cli(capsys, ["explain", "--test-index", "0", "--top", "3", "--json", "--strategy", "ekfac",
                                     "--rank", "influence", *ft, *base_args])
    again = json.loads(out2)["proponents"]
    assert [r["id"] for r in again] == [r["id"] for r in result["proponents"]]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in result["proponents"]], rel=1e-6)
    # --train-cache: the first run writes the training token factors, the second reads them; same ranking
    cache_root = Path(base_args[base_args.index("--cache-dir") + 1])
    for _ in range(2):
        code, out3, err = run_cli(capsys, ["explain", "--test-index", "0", "--top", "3", "--json", "--strategy",
                                           "ekfac", "--train-cache", "--rank", "influence", *ft, *base_args])
        assert code == 0, err
        cached = json.loads(out3)["proponents"]
        assert [r["id"] for r in cached] == [r["id"] for r in result["proponents"]]
        assert [r["score"] for r in cached] == pytest.approx([r["score"] for r in result["proponents"]], rel=1e-5)
        assert list(cache_root.rglob("train-tokens/*/batch-*.safetensors"))
    code, _, err = run_cli(capsys, ["explain", "--test-index", "0", "--train-cache", "--train-cache-max-gb", "0",
                                    *ft, *base_args])
    _one_line_error(code, err, "--train-cache-max-gb")
    code, _, err = run_cli(capsys, ["explain", "--test-index", "0", "--modules", "nothing-matches", *ft, *base_args])
    _one_line_error(code, err, "nothing-matches")


def test_validate_head_writes_tables_and_plots(capsys, base_args, tmp_path):
    out = tmp_path / "val"
    code, stdout, err = run_cli(capsys, ["validate", "--examples", "6", "--subsets", "10", "--queries", "2",
                                         "--solver", "exact", "cg", "--out", str(out), *base_args])
    assert code == 0, err
    table = json.loads((out / "validate.json").read_text())
    assert table and (out / "validate.md").exists() and "validate.md" in stdout
    assert list(out.glob("scatter-*.png"))
    code, _, err = run_cli(capsys, ["validate", "--examples", "1", "--out", str(out), *base_args])
    _one_line_error(code, err, "--examples")


def test_audit_writes_ranked_csv_and_json(capsys, base_args, tmp_path):
    out = tmp_path / "audit"
    code, stdout, err = run_cli(capsys, ["audit", "--out", str(out), "--folds", "3", *base_args])
    assert code == 0, err
    assert "ranked 64 training examples" in stdout
    rows = (out / "ranking.csv").read_text().strip().splitlines()
    assert len(rows) == 65  # header + every training example
    assert json.loads((out / "ranking.json").read_text())
