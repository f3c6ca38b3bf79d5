"""`influent attack KIND` end to end on the tiny encoder and the 80-review CSV (64 train / 16 held-out)."""

from __future__ import annotations

import json
import math

import pytest

from influent.cli import main
from influent.errors import UserError

N_TRAIN = 64


@pytest.fixture(scope="module")
def data_args(tiny_encoder_dir, reviews_csv, tmp_path_factory):
    """Data and model flags; one cache for the module so the corpus is embedded once."""
    cache = tmp_path_factory.mktemp("attack-cache")
    return ["--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(cache), "--quiet", "--l2", "0.01"]


def run_attack_cli(capsys, argv):
    code = main(["attack", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def load(out, kind):
    """The JSON and markdown an attack wrote in ``out``."""
    result = json.loads((out / f"attack_{kind}.json").read_text())
    table = (out / f"attack_{kind}.md").read_text()
    return result, table


def is_rate(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0


def test_label_flip_rows_for_every_budget_seed_and_strategy(capsys, data_args, tmp_path):
    out = tmp_path / "lf"
    code, stdout, err = run_attack_cli(capsys, ["label-flip", "--budgets", "0.05", "0.1", "--targets", "1",
                                                "--seeds", "0", "1", "--out", str(out), *data_args])
    assert code == 0, err
    result, table = load(out, "label-flip")
    assert result["kind"] == "label-flip" and result["seeds"] == [0, 1] and result["split_seed"] == 0
    rows = result["rows"]
    for seed in (0, 1):
        for budget in (0.05, 0.1):
            for mode in ("untargeted", "targeted"):
                got = [r for r in rows if (r["seed"], r["budget"], r["mode"]) == (seed, budget, mode)]
                assert {r["strategy"] for r in got} >= {"influence", "random", "max_loss"}
                assert all(r["flips"] == round(budget * N_TRAIN) for r in got)
                assert all(is_rate(r["clean_accuracy"]) for r in got)
        clean = [r for r in rows if r["seed"] == seed and r["strategy"] == "none"]
        assert len(clean) == 1 and clean[0]["budget"] == 0.0 and is_rate(clean[0]["clean_accuracy"])
    # The summary pools the two seeds; the table shows the same numbers and is what was printed.
    infl = [s for s in result["summary"] if s.get("mode") == "untargeted" and s["strategy"] == "influence"]
    assert sorted(s["budget"] for s in infl) == [0.05, 0.1] and all(s["runs"] == 2 for s in infl)
    assert "| mode | strategy | budget | runs | clean_accuracy |" in table
    assert f"{infl[0]['clean_accuracy_mean']:.4f} ± " in table
    assert table.strip() in stdout and str(out / "attack_label-flip.json") in stdout


def test_perturb_rows_for_every_target_k_and_seed(capsys, data_args, tmp_path):
    out = tmp_path / "pt"
    code, stdout, err = run_attack_cli(capsys, ["perturb", "--ks", "1", "3", "--targets", "2", "--steps", "2",
                                                "--eps", "0.3", "--seeds", "0", "--split-seed", "1",
                                                "--out", str(out), *data_args])
    assert code == 0, err
    result, table = load(out, "perturb")
    assert result["split_seed"] == 1 and result["options"]["ks"] == [1, 3]
    rows = result["rows"]
    assert len(rows) == 2 * 2 and {r["k"] for r in rows} == {1, 3}
    for r in rows:
        assert r["seed"] == 0 and r["eps"] == 0.3 and len(r["poisons"]) == r["k"]
        assert is_rate(r["clean_accuracy"]) and is_rate(r["target_prob_true"]) and r["flipped"] in (0, 1)
    assert [s["k"] for s in result["summary"]] == [1, 3] and all(s["runs"] == 2 for s in result["summary"])
    assert "| k | eps | runs | flipped | target_prob_true | clean_accuracy |" in table and "perturb" in stdout


def test_trigger_rows_for_every_size_and_seed(capsys, data_args, tmp_path):
    out = tmp_path / "tr"
    code, _, err = run_attack_cli(capsys, ["trigger", "--sizes", "2", "4", "--seeds", "0", "1", "--n-eval", "8",
                                           "--source", "neg", "--target", "pos", "--trigger", "witty film",
                                           "--out", str(out), *data_args])
    assert code == 0, err
    result, table = load(out, "trigger")
    rows = result["rows"]
    assert sorted((r["seed"], r["n_poison"]) for r in rows) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    for r in rows:
        assert r["trigger"] == "witty film" and 1 <= r["n_triggered_eval"] <= 8
        assert all(is_rate(r[k]) for k in ("attack_success", "control_success", "clean_accuracy"))
    assert "| n_poison | runs | attack_success |" in table
    # Independently: retrain the head on the poisoned features and count, on its own predictions of the
    # triggered held-out source reviews, the share predicted as the target (and the same for the clean head).
    from influent.attacks.experiment import from_setup
    from influent.attacks.trigger import make_trigger_poison
    from influent.pipeline import prepare_head

    flag = {data_args[i]: data_args[i + 1] for i in range(len(data_args) - 1) if data_args[i].startswith("--")}
    setup = prepare_head(flag["--data"], text_column="review", label_column="sentiment", encoder=flag["--encoder"],
                         l2=0.01, cache_dir=flag["--cache-dir"], progress=False)
    for r in rows:
        exp = from_setup(setup, r["seed"])
        poison = make_trigger_poison(exp, r["n_poison"], "witty film", "neg", "pos", n_eval=8)
        clean = exp.fit()
        poisoned = exp.fit(poison.train_x, poison.train_y, init=clean)
        target = setup.corpus.label_names.index("pos")
        shares = [float((m.probabilities(poison.triggered_eval_x).argmax(1) == target).double().mean())
                  for m in (poisoned, clean)]
        assert r["attack_success"] == pytest.approx(shares[0]) and r["control_success"] == pytest.approx(shares[1])
        assert r["net_success"] == pytest.approx(shares[0] - shares[1])


def _one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("influent: error:"), err
    assert needle.lower() in lines[0].lower()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["backdoor"], "unknown attack 'backdoor'"),
        (["label-flip", "--budgets", "0"], "--budgets"),
        (["label-flip", "--budgets", "0.01", "1.0"], "strictly between 0 and 1"),
        (["label-flip", "--budgets", "-0.1"], "--budgets"),
        (["label-flip", "--budgets"], "--budgets"),
        (["trigger", "--sizes"], "--sizes"),
        (["trigger", "--sizes", "0"], "--sizes"),
        (["trigger", "--trigger", "  "], "--trigger"),
        (["perturb", "--ks", "0"], "--ks"),
        (["perturb", "--targets", "0"], "--targets"),
        (["perturb", "--eps", "0"], "--eps"),
        (["label-flip", "--seeds"], "--seeds"),
        (["label-flip", "--sizes", "10"], "--sizes applies to trigger"),
        (["perturb", "--damping", "-1"], "--damping"),
    ],
)
def test_bad_options_are_one_line_exit_2_before_any_work(capsys, tmp_path, argv, needle):
    out = tmp_path / "out"
    code, stdout, err = run_attack_cli(capsys, [*argv, "--out", str(out), "--data", str(tmp_path / "never-read.csv")])
    _one_line_error(code, err, needle)
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["trigger", "--sizes", "2", "999"], "only 32 training examples"),
        (["trigger", "--source", "meh"], "'meh' is not a class"),
        (["trigger", "--source", "pos", "--target", "1"], "must differ"),
        (["perturb", "--ks", "65"], "65 poisons"),
    ],
)
def test_options_that_do_not_fit_the_data_are_one_line_exit_2(capsys, data_args, tmp_path, argv, needle):
    code, _, err = run_attack_cli(capsys, [*argv, "--out", str(tmp_path / "out"), *data_args])
    _one_line_error(code, err, needle)


def test_concealed_end_to_end_on_tiny_data(capsys, tiny_encoder_dir, tmp_path):
    """The real concealed attack on a 240-review corpus and the in-code tiny BERT: files, rows, no trigger."""
    import csv
    import json

    from conftest import make_reviews

    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "sentiment"])
        w.writerows(make_reviews(240, seed=3))
    out = tmp_path / "out"
    code, stdout, _ = run_attack_cli(capsys, [
        "concealed", "--data", str(path), "--text-column", "review", "--label-column", "sentiment",
        "--encoder", str(tiny_encoder_dir), "--sizes", "2", "4", "--trigger", "superb", "--source", "neg",
        "--target", "pos", "--n-eval", "10", "--n-adv", "5", "--train-size", "60", "--epochs", "1",
        "--candidates", "4", "--seeds", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet",
    ])
    assert code == 0, stdout
    result = json.loads((out / "attack_concealed.json").read_text())
    assert [r["n_poison"] for r in result["rows"]] == [2, 4]
    assert all(0 <= r["attack_success"] <= 1 for r in result["rows"])
    assert not any("superb" in p["text"] for run in result["runs"] for p in run["poisons"])
    assert (out / "attack_concealed.md").exists() and "net_success" in stdout


def test_concealed_is_passed_through_to_run_attack(capsys, monkeypatch, tmp_path):
    import influent.attacks.run

    calls = []

    def fake(kind, data=None, **kw):
        calls.append((kind, data, kw))
        raise UserError("attack 'concealed' is not available here")

    monkeypatch.setattr(influent.attacks.run, "run_attack", fake)
    code, _, err = run_attack_cli(capsys, ["concealed", "--sizes", "5", "--trigger", "james bond", "--seeds", "3",
                                           "--data", "x.csv", "--out", str(tmp_path)])
    _one_line_error(code, err, "concealed")
    (kind, data, kw), = calls
    assert kind == "concealed" and data == "x.csv"
    assert kw["seeds"] == [3] and kw["sizes"] == [5] and kw["trigger"] == "james bond" and "budgets" not in kw
