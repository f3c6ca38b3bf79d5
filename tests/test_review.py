"""``influent review``: the counter-example against retraining, the decision log, and the terminal loop driven
by scripted keystrokes (pexpect): the written data holds exactly the decisions made, also after a kill."""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from influent.defenses.review import DecisionLog, counter_examples, write_cleaned
from influent.influence import ExactInfluence
from influent.models.head import HeadTask, per_example_loss, train_head

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_counter_example_is_the_removal_that_most_lowers_the_loss():
    """Independent truth: leave-one-out retraining. Removing the strongest opponent of z_i's label lowers
    z_i's loss the most, so the counter-example is the k whose removal lowers it most (first order)."""
    gen = torch.Generator().manual_seed(0)
    n, d, l2 = 24, 3, 0.05
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(n, generator=gen, dtype=torch.float64) > 0).long()
    model, _task, _ = train_head(x, y, 2, l2)
    method = ExactInfluence(model, HeadTask(l2), (x, y))
    for i in (0, 5, 11):
        (k, score), = counter_examples(method, x, y, [i])
        base = float(per_example_loss(model, x[i : i + 1], y[i : i + 1])[0])
        change = []
        for j in range(n):
            keep = torch.arange(n) != j
            m, _, _ = train_head(x[keep], y[keep], 2, l2)
            change.append(float(per_example_loss(m, x[i : i + 1], y[i : i + 1])[0]) - base)
        change[i] = np.inf
        assert k != i and score < 0
        assert k == int(np.argmin(change)), (i, k, np.argsort(change)[:3])


def test_log_replay_applies_undo_and_ignores_a_torn_last_line(tmp_path):
    log = DecisionLog(tmp_path / "log.jsonl")
    log.append({"id": "a", "action": "drop"})
    log.append({"id": "b", "action": "relabel", "label": "neg"})
    log.append({"id": "b", "action": "undo"})
    log.append({"id": "c", "action": "keep"})
    with log.path.open("a") as fh:
        fh.write('{"id": "d", "act')  # a process killed mid-write
    assert {k: v["action"] for k, v in log.replay().items()} == {"a": "drop", "c": "keep"}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_write_cleaned_keeps_the_format_and_every_other_row(tmp_path, suffix):
    import pandas as pd

    from influent.data.corpus import text_id

    frame = pd.DataFrame({"t": ["one a", "two b", "three c"], "y": ["pos", "neg", "pos"], "extra": [1, 2, 3]})
    path = tmp_path / f"d{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()
    decisions = {text_id("one a"): {"action": "drop"}, text_id("two b"): {"action": "relabel", "label": "pos"},
                 text_id("three c"): {"action": "keep"}}
    counts = write_cleaned(path, "t", "y", decisions, tmp_path / f"out{suffix}")
    assert counts == {"dropped": 1, "relabelled": 1, "rows": 2}
    out = {".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"),
           ".jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](tmp_path / f"out{suffix}")
    assert out["t"].tolist() == ["two b", "three c"] and out["y"].tolist() == ["pos", "pos"]
    assert out["extra"].astype(int).tolist() == [2, 3]


@pytest.fixture(scope="module")
def audited(tmp_path_factory, reviews_csv, tiny_encoder_dir):
    from influent.cli import main

    root = tmp_path_factory.mktemp("review")
    data = ["--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(root / "cache"), "--quiet"]
    assert main(["audit", "--out", str(root / "audit"), "--rankers", "loss", "self_influence", *data]) == 0
    return root, data


def _spawn(root: Path, data: list[str], extra: list[str] = ()):
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "influent.cli", "review", "--ranking", str(root / "audit" / "ranking.json"),
            "--out", str(root / "clean.csv"), "--log", str(root / "log.jsonl"), *data, *extra]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120)
    child.logfile_read = io.StringIO()  # the session's terminal text
    return child


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def _rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as fh:
        return [(r["review"], r["sentiment"]) for r in csv.DictReader(fh)]


def test_review_session_quit_resume_and_kill(audited, reviews_csv):
    root, data = audited
    prompt = r"\[q\]uit > "
    child = _spawn(root, data, ["--retrain-every", "2"])
    shown = []
    for key in ("d", "r", "k", "s", "u", "k"):  # drop, relabel, keep, skip, undo the skip, keep instead
        child.expect(r"text:\s+(.*?)\r\n")
        shown.append(child.match.group(1).strip())
        child.expect(prompt)
        child.sendline(key)
    child.expect(r"text:\s+(.*?)\r\n")
    child.expect(prompt)
    child.sendline("q")
    child.expect("done: 4 decisions")
    child.expect(pexpect_eof())
    assert child.logfile_read.getvalue().count("retrained: held-out accuracy") == 2  # after decisions 2 and 4
    original = _rows(reviews_csv)
    labels = dict(original)
    flip = {"pos": "neg", "neg": "pos"}
    expected = [(t, flip[y] if t == shown[1] else y) for t, y in original if t != shown[0]]
    assert shown[5] == shown[3] != shown[4]  # after the undo the skipped example is asked again
    assert _rows(root / "clean.csv") == expected
    assert labels[shown[1]] != dict(_rows(root / "clean.csv"))[shown[1]]

    # resume: the four decided examples are not shown again; drop the next one, then kill the process
    child = _spawn(root, data)
    child.expect("4 decisions already")
    child.expect(r"text:\s+(.*?)\r\n")
    fifth = child.match.group(1).strip()
    assert fifth == shown[4]  # the first example without a decision
    child.expect(prompt)
    child.sendline("d")
    child.expect("drop: ")
    child.expect(prompt)  # the next question: the decision is on disk by now
    child.kill(signal.SIGKILL)
    child.close()
    assert len(DecisionLog(root / "log.jsonl").replay()) == 5
    expected = [row for row in expected if row[0] != fifth]
    assert _rows(root / "clean.csv") == expected
