"""``influent audit --truth FILE|COLUMN``: the known-bad examples of a user's own audit.

Independent truth: the rows whose labels this test flipped itself, and precision / recall counted by hand from
the written ranking (checking its first ceil(share * n) rows).
"""

from __future__ import annotations

import csv
import re

import pytest
from cli_helpers import run_cli
from conftest import make_reviews

from influent.data.corpus import text_id

FLIPPED = (3, 10, 17, 24, 41, 58)  # rows whose label is flipped and marked


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """80 reviews, six with a flipped label and ``flag=yes`` (the others an empty cell), and an id file."""
    root = tmp_path_factory.mktemp("truth")
    rows = make_reviews(80)
    path = root / "noisy.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "sentiment", "flag"])
        for i, (text, label) in enumerate(rows):
            bad = i in FLIPPED
            w.writerow([text, ("neg" if label == "pos" else "pos") if bad else label, "yes" if bad else ""])
    ids = root / "bad_ids.txt"
    ids.write_text("# known bad\n" + "\n".join(text_id(rows[i][0]) for i in FLIPPED) + "\n\n")
    return path, ids, {rows[i][0] for i in FLIPPED}


def _args(noisy, tiny_encoder_dir, cache):
    return ["--data", str(noisy[0]), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(cache), "--quiet",
            "--rankers", "loo_loss", "self_influence", "loss", "--queries-from", "none"]  # three quick rankers


def _ranking(folder):
    with (folder / "ranking.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_precision_recall_against_share_checked_by_hand(noisy, tiny_encoder_dir, tmp_path, capsys):
    args = _args(noisy, tiny_encoder_dir, tmp_path / "cache")
    code, out, _ = run_cli(capsys, ["audit", "--out", str(tmp_path / "col"), "--truth", "flag",
                                    "--report", str(tmp_path / "col.html"), *args])
    assert code == 0
    rows = _ranking(tmp_path / "col")
    flags = [r["text"] in noisy[2] for r in rows]  # ranking order, most suspicious first
    assert [r["truth"] == "True" for r in rows] == flags
    n, in_training = len(rows), sum(flags)
    assert 0 < in_training < len(FLIPPED)  # some flipped rows fall in the held-out split
    assert (f"6 known bad, {in_training} of them among the {n} ranked training examples "
            f"({6 - in_training} held out)") in out
    page = (tmp_path / "col.html").read_text()
    by_hand = []
    for percent in (5, 10, 20):
        k = -(-percent * n // 100)
        found = sum(flags[:k])
        by_hand.append((found / k, found / in_training))
        assert (f"checking the top {percent}% ({k}) by loo_loss finds {found}: precision {found / k:.3f}, "
                f"recall {found / in_training:.3f}") in out
    cells = "".join(f'<td class="num">{v:.4g}</td>' for v in [p for p, _ in by_hand] + [r for _, r in by_hand])
    assert f"<td>loo_loss</td>{cells}" in page  # the report's table at 5 / 10 / 20 % checked
    assert f"Precision and recall ({in_training} of {n} examples flagged)" in page

    # the same truth as a file of ids: the same column, the same counts
    code, out_ids, _ = run_cli(capsys, ["audit", "--out", str(tmp_path / "ids"), "--truth", str(noisy[1]), *args])
    assert code == 0
    assert [r["truth"] for r in _ranking(tmp_path / "ids")] == [r["truth"] for r in rows]
    def lines(text):  # the sources and paths aside
        return [re.sub(r"truth \(.*?\)|written to .*", "", line) for line in text.splitlines()
                if not line.startswith("report:")]

    assert lines(out_ids) == lines(out)


def _one_line_exit_2(capsys, argv) -> str:
    code, _, err = run_cli(capsys, argv)
    assert code == 2
    err = err.strip()
    assert err.startswith("influent: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_truth_is_one_line_exit_2(noisy, tiny_encoder_dir, tmp_path, capsys):
    args = ["audit", "--out", str(tmp_path / "out"), *_args(noisy, tiny_encoder_dir, tmp_path / "cache")]
    unknown = tmp_path / "ids.txt"
    unknown.write_text(noisy[1].read_text() + "0123456789abcdef\n")
    assert "1 of its 7 ids are no example of the data" in _one_line_exit_2(capsys, [*args, "--truth", str(unknown)])
    err = _one_line_exit_2(capsys, [*args, "--truth", "is_poison"])
    assert "neither a file nor a column" in err and "review, sentiment, flag" in err
    assert "row 1: 'pos' is not a flag" in _one_line_exit_2(capsys, [*args, "--truth", "sentiment"])
    assert "drop top" in _one_line_exit_2(capsys, [*args, "--truth", "flag", "--top", "5"])
    assert not (tmp_path / "cache").exists()  # refused before any model work
