"""Every user mistake of issue #10 part 2 that the CLI handles: one line on stderr, exit 2, nothing computed;
and the honest reports of part 3 (non-convergence is a warning and is in the JSON)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import run_cli

from influent.attacks.options import AttackOptions
from influent.cli.common import user_message
from influent.curvature.solvers import conjugate_gradient, lissa
from influent.data.loaders import load_local
from influent.defenses.options import AuditOptions
from influent.errors import UserError
from influent.evaluation.options import ValidateOptions
from influent.models.head import HeadTask, LogisticHead
from influent.models.newton import fit_newton


def one_line_error(code, err, needle, status=2):
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("influent: error:"), err
    assert needle.lower() in lines[0].lower(), err


def with_l2(base_args, value):
    args = list(base_args)
    i = args.index("--l2")
    args[i:i + 2] = [f"--l2={value}"]
    return args


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_l2_not_finite_positive_trains_nothing(capsys, base_args, tmp_path, value):
    code, _, err = run_cli(capsys, ["train", *with_l2(base_args, value)])
    one_line_error(code, err, "--l2")
    assert not (tmp_path / "cache" / "heads").exists()  # no head trained, no NaN cached


@pytest.mark.parametrize(
    "command, extra, needle",
    [
        (["explain", "--text", "good"], ["--damping", "-1"], "--damping"),
        (["explain", "--text", "good"], ["--damping", "nan"], "--damping"),
        (["audit"], ["--damping", "-0.5"], "--damping"),
        (["audit"], ["--damping", "inf"], "--damping"),
        (["explain", "--text", "good"], ["--seed", "-1"], "--seed"),
        (["train"], ["--test-fraction", "nan"], "--test-fraction"),
        (["train"], ["--test-fraction", "1"], "--test-fraction"),
        (["train"], ["--max-length", "1"], "--max-length"),
        (["train", "--model", "finetuned"], ["--epochs", "0"], "--epochs"),
        (["train", "--model", "finetuned"], ["--lr", "nan"], "--lr"),
        (["train", "--model", "finetuned"], ["--train-size", "1"], "--train-size"),
        (["explain", "--text", "good", "--model", "finetuned"], ["--query-rank", "0"], "--query-rank"),
        (["explain", "--text", "good"], ["--top", "0"], "--top"),
        (["demo"], ["--top", "-3"], "--top"),
        (["audit"], ["--primary", "nope"], "--primary"),
        (["audit"], ["--folds", "1"], "--folds"),
        (["audit"], ["--top", "0"], "--top"),
        (["audit"], ["--rankers", "loss", "bogus"], "--rankers"),
        (["audit", "--queries-from", "none"], ["--primary", "query_influence"], "needs queries"),
        (["validate", "--solver", "nope"], [], "--solver"),
        (["validate", "--model", "finetuned", "--strategy", "nope"], [], "--strategy"),
        (["validate", "--subsets", "5"], [], "--subsets"),
        (["validate"], ["--damping", "-1"], "--damping"),
        (["validate"], ["--train-size", "1"], "--train-size"),
        (["attack", "label-flip"], ["--budgets", "nan"], "--budgets"),
        (["attack", "perturb"], ["--eps", "inf"], "--eps"),
        (["attack", "perturb"], ["--damping", "nan"], "--damping"),
        (["attack", "concealed"], ["--pooling", "cls"], "applies to the head's attacks"),
        (["explain", "--text", "good"], ["--top", "x"], "--top"),
    ],
)
def test_bad_option_is_one_line_before_any_work(capsys, base_args, tmp_path, command, extra, needle):
    out = ["--out", str(tmp_path / "out")] if command[0] in ("audit", "validate", "attack", "demo") else []
    code, stdout, err = run_cli(capsys, [*command, *extra, *out, *base_args])
    one_line_error(code, err, needle)
    assert stdout == ""
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--model", "finetuned", "--pooling", "cls"], "--pooling does not apply to the fine-tuned"),
        (["explain", "--text", "good", "--model", "finetuned", "--solver", "cg"], "--solver does not apply"),
        (["explain", "--text", "good", "--strategy", "kfac"], "--strategy does not apply to the frozen-encoder head"),
        (["explain", "--text", "good", "--train-cache"], "--train-cache does not apply"),
        (["train", "--epochs", "3"], "--epochs does not apply to the frozen-encoder head"),
        (["validate", "--fine-tune-last", "2"], "--fine-tune-last does not apply"),
        (["validate", "--model", "finetuned", "--max-length", "20"], "--max-length does not apply"),
    ],
)
def test_options_the_model_kind_does_not_read_are_refused(capsys, base_args, tmp_path, argv, needle):
    out = ["--out", str(tmp_path / "out")] if argv[0] == "validate" else []
    code, _, err = run_cli(capsys, [*argv, *out, *base_args[:-2]])  # base_args without --l2
    one_line_error(code, err, needle)
    assert not (tmp_path / "cache").exists()


def test_train_finetuned_refuses_l2(capsys, base_args):
    code, _, err = run_cli(capsys, ["train", "--model", "finetuned", *base_args])
    one_line_error(code, err, "--l2 does not apply to the fine-tuned classifier")


@pytest.mark.parametrize("flag", ["--max-length", "--pooling", "--test-fraction", "--hf-split"])
def test_audit_refuses_the_options_it_cannot_honour(capsys, base_args, tmp_path, flag):
    value = {"--max-length": "16", "--pooling": "cls", "--test-fraction": "0.3", "--hf-split": "test"}[flag]
    code, _, err = run_cli(capsys, ["audit", flag, value, "--out", str(tmp_path / "out"), *base_args])
    one_line_error(code, err, flag)


@pytest.mark.parametrize("command", [["audit"], ["validate"], ["attack", "label-flip"], ["demo"]])
def test_out_that_is_a_file_or_under_a_file(capsys, base_args, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, needle in ((blocker, "is a file, not a folder"), (blocker / "sub", "cannot be created")):
        code, _, err = run_cli(capsys, [*command, "--out", str(out), *base_args])
        one_line_error(code, err, needle)
        assert "--out" in err
    assert not (tmp_path / "cache").exists()


def test_cache_dir_that_is_a_file(capsys, base_args, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    args = list(base_args)
    args[args.index("--cache-dir") + 1] = str(blocker)
    code, _, err = run_cli(capsys, ["explain", "--text", "good", *args])
    one_line_error(code, err, "--cache-dir")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_out(capsys, base_args, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, ["audit", "--out", str(locked / "audit"), *base_args])
        one_line_error(code, err, "not writable")
    finally:
        locked.chmod(0o700)


def test_broken_pipe_is_quiet(tiny_encoder_dir, reviews_csv, tmp_path):
    """``influent explain --json | head -c 20``: the reader goes away; no traceback, no message."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "influent.cli", "explain", "--text", "a great film", "--json", "--data",
            str(reviews_csv), "--text-column", "review", "--label-column", "sentiment", "--encoder",
            str(tiny_encoder_dir), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before anything is written: every write to stdout fails with EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert err == ""


def test_missing_labels_dropped_and_counted(tmp_path, capsys, tiny_encoder_dir):
    rows = [("good fun film", "pos"), ("bad dull film", "neg"), ("great witty film", "pos"), ("awful film", "neg")]
    rows = rows * 1 + [(f"witty charming {i}", "pos") for i in range(8)] + [(f"boring messy {i}", "neg") for i in range(8)]
    missing = ["NaN", "NA", "", "nan", " n/a ", "null", "None"]
    text = "review,sentiment\n" + "".join(f"{t},{lab}\n" for t, lab in rows)
    text += "".join(f"unlabelled review {i},{m}\n" for i, m in enumerate(missing))
    text += f"{rows[0][0]},{rows[0][1]}\n"  # a duplicate
    path = tmp_path / "labels.csv"
    path.write_text(text)
    corpus = load_local(path, "review", "sentiment")
    assert corpus.label_names == ["neg", "pos"]  # NaN / NA are not classes
    assert len(corpus) == len(rows)
    assert corpus.dropped == {"no_text": 0, "no_label": len(missing), "duplicate": 1}
    code, out, err = run_cli(capsys, ["train", "--data", str(path), "--text-column", "review", "--label-column",
                                      "sentiment", "--encoder", str(tiny_encoder_dir), "--cache-dir",
                                      str(tmp_path / "c"), "--quiet"])
    assert code == 0, err
    assert f"dropped {len(missing) + 1} rows of the data ({len(missing)} without a label, 1 duplicate text)" in out


def test_jsonl_null_labels_dropped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": None}, {"text": "d"}]))
    corpus = load_local(path)
    assert len(corpus) == 2 and corpus.dropped["no_label"] == 2


# --- options dataclasses: the field is named, the CLI spells it as the flag ---------------------------------
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AttackOptions("perturb", eps=math.nan), "eps"),
        (lambda: AttackOptions("label-flip", budgets=[0.5, math.inf]), "budgets"),
        (lambda: AttackOptions("label-flip", seeds=[0, -2]), "seeds"),
        (lambda: AttackOptions("trigger", ks=[1]), "ks"),
        (lambda: AttackOptions("concealed", train_size=1), "train_size"),
        (lambda: ValidateOptions(subsets=5), "subsets"),
        (lambda: ValidateOptions(fine_tune_last=0), "fine_tune_last"),
        (lambda: ValidateOptions(strategies=["kfac", "nope"]), "strategies"),
        (lambda: ValidateOptions(damping=-1e-3), "damping"),
        (lambda: AuditOptions(folds=1), "folds"),
        (lambda: AuditOptions(primary="nope"), "primary"),
        (lambda: AuditOptions(l2=math.nan), "l2"),
        (lambda: AuditOptions(query_file="q.csv", damping=-1.0), "damping"),
    ],
)
def test_options_name_the_field_never_a_flag(make, field):
    with pytest.raises(UserError) as info:
        make()
    assert info.value.field == field
    assert "--" not in str(info.value)


def test_user_message_maps_fields_to_flags():
    assert user_message(UserError("fine_tune_last must be >= 1, got 0", field="fine_tune_last")) == \
        "--fine-tune-last must be >= 1, got 0"
    assert user_message(UserError("strategies must be one of a, b", field="strategies")).startswith("--strategy ")
    assert user_message(UserError("bad file", field="query_file")) == "--queries: bad file"
    assert user_message(UserError("targets must be >= 1", field="target")) == "--target: targets must be >= 1"
    assert user_message(UserError("no field here")) == "no field here"


def test_valid_options_pass_through_unchanged():
    opts = AttackOptions("label-flip", budgets=[0.01, 0.05], targets=0, damping=0.0)
    assert opts.as_kwargs() == {"budgets": [0.01, 0.05], "targets": 0, "damping": 0.0}
    assert ValidateOptions(subsets=0).as_kwargs()["subsets"] == 0
    assert AuditOptions(top=3).as_kwargs()["top"] == 3


# --- honest reports: non-convergence ---------------------------------------------------------------------
def _separable(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long()


def test_newton_at_its_cap_is_not_converged():
    x, y = _separable()
    model = LogisticHead(5, 2).double()
    torch.nn.init.zeros_(model.linear.weight)
    torch.nn.init.zeros_(model.linear.bias)
    report = fit_newton(model, HeadTask(1e-2), (x, y), tol=1e-10, max_iter=1)
    assert report.iterations == 1 and report.grad_norm > 1e-10 and not report.converged
    report = fit_newton(model, HeadTask(1e-2), (x, y), tol=1e-10, max_iter=100)
    assert report.grad_norm <= 1e-10 and report.converged


def test_iterative_solvers_report_convergence_against_the_direct_solve():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.logspace(-3, 1, 30, dtype=torch.float64)) @ q.T
    b = torch.randn(30, generator=g, dtype=torch.float64)
    truth = torch.linalg.solve(A, b)
    short = conjugate_gradient(lambda V: A @ V, b, tol=1e-10, max_iter=3)
    assert not short.converged and short.residual > 1e-10
    full = conjugate_gradient(lambda V: A @ V, b, tol=1e-10, max_iter=1000)
    assert full.converged and torch.allclose(full.x, truth, rtol=1e-6, atol=1e-8)
    shallow = lissa(lambda V: A @ V, b, depth=5)
    assert not shallow.converged and not torch.allclose(shallow.x, truth, rtol=1e-2)


def test_explain_warns_and_records_a_cg_that_did_not_converge(capsys, base_args, monkeypatch):
    import influent.influence

    original = influent.influence.conjugate_gradient
    monkeypatch.setattr(influent.influence, "conjugate_gradient",
                        lambda matvec, B, damping, tol, max_iter: original(matvec, B, damping, tol, 1))
    code, out, err = run_cli(capsys, ["explain", "--text", "good fun", "--solver", "cg", "--json", *base_args])
    assert code == 0, err
    assert json.loads(out)["solver"]["converged"] is False
    assert err.startswith("influent: warning: the cg solve did not converge") and err.count("\n") == 1
    monkeypatch.undo()
    code, out, err = run_cli(capsys, ["explain", "--text", "good fun", "--solver", "exact", "--json", *base_args])
    assert json.loads(out)["solver"]["converged"] is True and err == ""


def test_train_warns_when_newton_stops_above_its_tolerance(capsys, base_args, tmp_path, monkeypatch):
    import influent.pipeline

    original = influent.pipeline.train_head
    monkeypatch.setattr(influent.pipeline, "train_head", lambda x, y, k, l2: original(x, y, k, l2, tol=0.0))
    code, _, err = run_cli(capsys, ["train", *base_args])
    assert code == 0, err
    assert err.startswith("influent: warning: the head's Newton training stopped") and err.count("\n") == 1
    saved = json.loads(next((tmp_path / "cache" / "heads").glob("*/head.json")).read_text())
    assert saved["converged"] is False


def test_library_messages_name_fields_not_flags():
    """Outside the CLI no string literal names a ``--flag`` (the CLI maps fields to flags)."""
    import ast
    import re
    from pathlib import Path

    import influent

    root = Path(influent.__file__).parent
    flagged = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value.replace("pip install --no-deps", "")
                if re.search(r"(^|\s)--[a-z]", text):
                    flagged.append(f"{path.relative_to(root)}:{node.lineno}: {text.strip()[:60]}")
    assert not flagged, flagged


def test_a_refused_write_is_one_line(capsys, base_args, tmp_path, monkeypatch):
    """A write the environment refuses (no permission, read-only file system, full disk) is exit 2, one line;
    (as root no real EACCES can be produced, so the audit's writer raises it)."""
    import errno

    import influent.defenses.audit

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "ranking.csv"))

    monkeypatch.setattr(influent.defenses.audit, "run_audit", refuse)
    code, _, err = run_cli(capsys, ["audit", "--out", str(tmp_path / "out"), *base_args])
    one_line_error(code, err, "cannot write")
    assert "Read-only file system" in err


def test_too_few_examples_for_a_split(capsys, tmp_path, tiny_encoder_dir):
    """One example per class leaves nothing to hold out: refused (was 'test accuracy nan on 0')."""
    path = tmp_path / "two.csv"
    path.write_text("text,label\ngood film,pos\nbad film,neg\n")
    code, _, err = run_cli(capsys, ["train", "--data", str(path), "--encoder", str(tiny_encoder_dir),
                                    "--cache-dir", str(tmp_path / "c"), "--quiet"])
    one_line_error(code, err, "too few for a held-out split")
    path.write_text("text,label\ngood film,pos\nbad film,neg\nfun film,pos\ndull film,neg\n")
    code, out, err = run_cli(capsys, ["train", "--data", str(path), "--encoder", str(tiny_encoder_dir),
                                      "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert code == 0 and "on 2;" in out, err  # two per class: one of each held out


def test_diverged_fine_tuning_is_a_numerical_error(capsys, base_args, tmp_path):
    """A learning rate that sends the loss to NaN: one line, exit 3, no checkpoint saved."""
    code, _, err = run_cli(capsys, ["train", "--model", "finetuned", "--lr", "1e8", "--epochs", "3", "--batch-size",
                                    "8", *base_args[:-2]])
    one_line_error(code, err, "fine-tuning diverged", status=3)
    assert not list((tmp_path / "cache").rglob("settings.json"))


def test_warnings_print_as_one_line():
    from influent.cli import one_line_warning

    text = one_line_warning(UserWarning("cache file damaged:\n  recomputed"), UserWarning, "x.py", 3, "src")
    assert text == "influent: warning: cache file damaged: recomputed\n"
