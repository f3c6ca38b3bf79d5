"""Progress display: a bar on a terminal, at most one line per tenth of the work elsewhere, nothing when quiet."""

from __future__ import annotations

import io

import pytest

from influent import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    """Each test starts with progress on, whatever ran before."""
    monkeypatch.setattr(progress, "_QUIET", False)


def run_loop(total: int, step: int = 1) -> None:
    bar = progress.progress_bar(total, "embedding", unit="text")
    for _ in range(0, total, step):
        bar.update(step)
    bar.close()


def test_not_a_terminal_writes_one_line_per_tenth(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    run_loop(1000)
    lines = err.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 100%: never one per update
    assert lines[0] == "influent: embedding 10% (100/1000 text)"
    assert lines[-1] == "influent: embedding 100% (1000/1000 text)"
    assert "\r" not in err.getvalue()


def test_not_a_terminal_with_few_large_steps(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    run_loop(600, step=64)  # 10 updates, the last one crossing 100%
    lines = err.getvalue().splitlines()
    assert 1 <= len(lines) <= 11
    assert all(line.startswith("influent: embedding ") for line in lines)


def test_terminal_gets_a_redrawn_bar(monkeypatch):
    err = FakeTerminal()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress.progress_bar(50, "fit", unit="batch")
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert "\r" in err.getvalue() and "fit" in err.getvalue()


@pytest.mark.parametrize("quiet, enabled", [(True, True), (False, False)])
def test_quiet_and_disabled_write_nothing(monkeypatch, quiet, enabled):
    err = FakeTerminal()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(progress, "_QUIET", quiet)
    assert list(progress.progress_iter(range(20), "retrain", enabled=enabled)) == list(range(20))
    bar = progress.progress_bar(20, "fit", enabled=enabled)
    bar.update(20)
    bar.close()
    assert err.getvalue() == ""


def test_progress_iter_yields_everything_and_reports(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert list(progress.progress_iter(["a", "b", "c", "d"], "loo")) == ["a", "b", "c", "d"]
    assert err.getvalue().splitlines()[-1] == "influent: loo 100% (4/4 it)"


def test_cli_quiet_flag_silences_progress(reviews_csv, tiny_encoder_dir, tmp_path, monkeypatch):
    from influent.cli import main

    monkeypatch.setattr(progress, "_QUIET", False)  # main sets it; monkeypatch restores it
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: a line per tenth unless quiet
    base = ["train", "--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir)]
    assert main([*base, "--cache-dir", str(tmp_path / "loud")]) == 0
    import sys

    assert "influent: embedding 100%" in sys.stderr.getvalue()
    sys.stderr.truncate(0)
    code = main(["train", "--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
                 "--encoder", str(tiny_encoder_dir), "--cache-dir", str(tmp_path / "quiet"), "--quiet"])
    assert code == 0
    assert "embedding" not in sys.stderr.getvalue()
