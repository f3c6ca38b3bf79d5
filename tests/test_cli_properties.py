"""Property-based attacks on the CLI (issue #10 part 4): generated data files and option values.

Whatever the input, a run ends with exit 0 (stderr only warnings), or exit 2 (a user mistake) / 3 (a numerical
failure) with exactly one line ``influent: error: ...`` on stderr; never a traceback (an exception escaping
``main`` fails the test). The tiny encoder of conftest keeps each run well under a second.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from influent.cli import main

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WORDS = ["good", "great", "fun", "bad", "awful", "dull", "the", "movie", "plot", "and", "but", "it"]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_clean_end(code: int, err: str) -> None:
    event(f"exit {code}")
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    if code == 0:
        assert all(line.startswith("influent: warning:") for line in lines), err
    else:
        assert code in (2, 3), (code, err)
        assert len(lines) == 1 and lines[0].startswith("influent: error:"), err


# --- generated data files -------------------------------------------------------------------------------
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
texts = st.one_of(words, words, words, st.text(max_size=20))  # any Unicode: quotes, newlines, emoji, nothing
classes = st.sampled_from(["pos", "neg"])
labels = st.one_of(
    classes, classes, classes, classes,
    st.sampled_from(["NaN", "NA", "", " n/a", "null", "None", "0", "1"]),
    st.none(), st.integers(-2, 3), st.floats(allow_nan=True, allow_infinity=True),
)
rows = st.lists(st.tuples(texts, labels), min_size=0, max_size=24)


def write_data(folder: Path, fmt: str, header: tuple[str, str], data: list, extra_column: bool) -> Path:
    path = folder / f"data.{fmt}"
    names = [*header, "extra"] if extra_column else list(header)
    if fmt == "jsonl":
        with path.open("w") as fh:
            for text, label in data:
                record = {header[0]: text, "extra": 1} if extra_column else {header[0]: text}
                if label is not None:
                    record[header[1]] = label
                fh.write(json.dumps(record) + "\n")
        return path
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(names)
        for text, label in data:
            writer.writerow([text, "" if label is None else label, *(["x"] if extra_column else [])])
    return path


@FAST
@given(fmt=st.sampled_from(["csv", "tsv", "jsonl"]), data=rows, extra_column=st.booleans(),
       header=st.sampled_from([("text", "label"), ("review", "sentiment"), ("text", "y")]),
       wrong_column=st.sampled_from([False, False, False, True]),
       test_fraction=st.sampled_from(["0.2", "0.5"]))
def test_any_data_file_trains_or_fails_in_one_line(tiny_encoder_dir, fmt, data, extra_column, header, wrong_column,
                                                  test_fraction):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_data(folder, fmt, header, data, extra_column)
        code, out, err = run(["train", "--data", str(path), "--text-column", header[0], "--label-column",
                              "label" if wrong_column else header[1],
                              "--encoder", str(tiny_encoder_dir), "--cache-dir", str(folder / "cache"), "--quiet",
                              "--test-fraction", test_fraction])
        assert_clean_end(code, err)
        if code == 0:
            assert "test accuracy" in out


# --- generated option values ----------------------------------------------------------------------------
def numbers(ints: bool = False, valid=None):
    """Option values as typed: mostly ``valid`` (when given), else anything: negative, huge, nan, inf, junk."""
    base = [st.integers(-3, 10), st.sampled_from([0, 1, 2, -1, 10**9, 2**63])]
    if not ints:
        base += [st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e300, -0.0, 0.5])]
    anything = st.one_of(*base).map(str) | st.sampled_from(["x", "", "1e", "0x10"])
    return anything if valid is None else st.one_of(valid.map(str), valid.map(str), anything)


def opt(flag: str, values, absent: int = 1):
    """No flag (``absent`` times in ``absent + 1``) or ``--flag=value``."""
    return st.one_of(*[st.just([])] * absent, values.map(lambda v: [f"{flag}={v}"]))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("property-cache")


@FAST
@given(l2=opt("--l2", numbers(valid=st.sampled_from([1e-3, 0.01, 1.0, 1e3]))),
       seed=opt("--seed", numbers(ints=True, valid=st.integers(0, 3)), absent=2),
       damping=opt("--damping", numbers(valid=st.sampled_from([0.0, 1e-3, 0.1, 10.0])), absent=2),
       top=opt("--top", numbers(ints=True, valid=st.integers(1, 100)), absent=2),
       test_fraction=opt("--test-fraction", numbers(valid=st.sampled_from([0.2, 0.3, 0.5])), absent=2),
       max_length=opt("--max-length", st.integers(-3, 64).map(str), absent=2),
       solver=opt("--solver", st.sampled_from(["exact", "cg", "lissa", "nope"]), absent=2),
       query=st.sampled_from([["--text", "a good fun movie"], ["--text", "a good fun movie"], ["--test-index", "0"],
                              ["--test-index", "3"], ["--text", "  "], ["--test-index", "-1"],
                              ["--test-index", "99999"], []]))
def test_explain_option_values(tiny_encoder_dir, reviews_csv, shared_cache, l2, seed, damping, top, test_fraction,
                               max_length, solver, query):
    argv = ["explain", *query, "--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(shared_cache), "--quiet", "--json",
            *l2, *seed, *damping, *top, *test_fraction, *max_length, *solver]
    code, out, err = run(argv)
    assert_clean_end(code, err)
    if code == 0:
        result = json.loads(out)
        assert all(r["score"] == r["score"] for r in result["proponents"] + result["opponents"])  # no NaN


@FAST
@given(kind=st.sampled_from(["label-flip", "perturb", "trigger", "concealed", "bogus"]),
       budgets=st.one_of(st.just([]), st.lists(numbers(), max_size=3).map(lambda v: ["--budgets", *v])),
       sizes=st.one_of(st.just([]), st.lists(numbers(ints=True), max_size=3).map(lambda v: ["--sizes", *v])),
       eps=opt("--eps", numbers()), damping=opt("--damping", numbers()), targets=opt("--targets", numbers(True)),
       seeds=st.one_of(st.just([]), st.lists(numbers(ints=True), max_size=3).map(lambda v: ["--seeds", *v])),
       epochs=opt("--epochs", numbers(ints=True)), trigger=opt("--trigger", st.sampled_from(["james bond", " "])))
def test_attack_option_values_are_checked_before_any_work(tmp_path, kind, budgets, sizes, eps, damping, targets,
                                                         seeds, epochs, trigger):
    """Every combination ends in one line before the data is read (the data file does not exist)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        code, stdout, err = run(["attack", kind, *budgets, *sizes, *eps, *damping, *targets, *seeds, *epochs,
                                 *trigger, "--out", str(out), "--data", str(Path(tmp) / "never.csv"),
                                 "--cache-dir", str(Path(tmp) / "cache")])
        assert code == 2
        assert_clean_end(code, err)
        assert not out.exists() and stdout == ""


@FAST
@given(examples=opt("--examples", numbers(True)), subsets=opt("--subsets", numbers(True)),
       queries=opt("--queries", numbers(True)), damping=opt("--damping", numbers()),
       train_size=opt("--train-size", numbers(True)), seed=opt("--seed", numbers(True)),
       model=st.sampled_from(["head", "finetuned"]),
       solver=st.one_of(st.just([]), st.lists(st.sampled_from(["exact", "cg", "lissa", "nope"]), min_size=1,
                                             max_size=3).map(lambda v: ["--solver", *v])))
def test_validate_option_values_are_checked_before_any_work(tmp_path, examples, subsets, queries, damping,
                                                           train_size, seed, model, solver):
    with tempfile.TemporaryDirectory() as tmp:
        code, _, err = run(["validate", "--model", model, *examples, *subsets, *queries, *damping, *train_size,
                            *seed, *solver, "--out", str(Path(tmp) / "out"), "--data", str(Path(tmp) / "never.csv"),
                            "--cache-dir", str(Path(tmp) / "cache"), "--quiet"])
        assert code == 2
        assert_clean_end(code, err)


@settings(FAST, max_examples=12)
@given(folds=opt("--folds", numbers(True, valid=st.integers(2, 5))), top=opt("--top", numbers(True)),
       damping=opt("--damping", numbers(valid=st.sampled_from([0.0, 0.01, 1.0]))),
       primary=opt("--primary", st.sampled_from(["loss", "loo_loss", "self_influence", "query_influence", "nope"])),
       queries_from=opt("--queries-from", st.sampled_from(["validation", "misclassified", "none", "all"])))
def test_audit_option_values(tiny_encoder_dir, reviews_csv, shared_cache, folds, top, damping, primary,
                             queries_from):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit"
        code, _, err = run(["audit", *folds, *top, *damping, *primary, *queries_from, "--out", str(out),
                                 "--data", str(reviews_csv), "--text-column", "review", "--label-column",
                                 "sentiment", "--encoder", str(tiny_encoder_dir), "--cache-dir", str(shared_cache),
                                 "--quiet", "--rankers", "loss", "loo_loss", "self_influence"])
        assert_clean_end(code, err)
        assert (code == 0) == (out / "ranking.csv").exists()
