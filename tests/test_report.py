"""The HTML report: each kind built from real command output (tiny encoder), opened in headless Chromium.

The browser part needs Debian's ``chromium`` (``.ci/run`` installs it); without it those tests are skipped
with the reason, the HTML checks still run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from conftest import make_reviews
from lm_fixtures import FACTS, tiny_lm_folder

from influent.cli import main
from influent.report.audit import precision_recall
from influent.report.build import build_report, report_kind

FLIPPED = (3, 10, 17, 24, 41, 58)  # rows whose label the audit fixture flips (the truth of its report)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory, reviews_csv, tiny_encoder_dir):
    """One report of each kind from the CLI, written through ``--report`` or ``influent report``."""
    root = tmp_path_factory.mktemp("reports")
    data = ["--data", str(reviews_csv), "--text-column", "review", "--label-column", "sentiment",
            "--encoder", str(tiny_encoder_dir), "--cache-dir", str(root / "cache"), "--quiet"]
    out = {}
    assert main(["explain", "--test-index", "0", "--json", "--report", str(root / "explain.html"), *data]) == 0
    out["explain"] = root / "explain.html"
    assert main(["validate", "--examples", "5", "--subsets", "10", "--queries", "2", "--solver", "exact", "cg",
                 "--out", str(root / "validate"), "--report", str(root / "validate.html"), *data]) == 0
    out["validate"] = root / "validate.html"
    assert main(["attack", "label-flip", "--seeds", "0", "1", "--budgets", "0.05", "0.1", "--targets", "1",
                 "--out", str(root / "attack"), "--report", str(root / "attack.html"), *data]) == 0
    out["attack"] = root / "attack.html"
    # audit of a copy with six labels flipped; the report's truth flags come from that list
    rows = make_reviews(80)
    flipped_texts = {rows[i][0] for i in FLIPPED}
    noisy = root / "noisy.csv"
    with noisy.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "sentiment"])
        w.writerows((t, ("neg" if y == "pos" else "pos") if t in flipped_texts else y) for t, y in rows)
    noisy_data = [noisy if a == str(reviews_csv) else a for a in data]
    assert main(["audit", "--out", str(root / "audit"), "--report", str(root / "audit-plain.html"),
                 *map(str, noisy_data)]) == 0
    ranking = json.loads((root / "audit" / "ranking.json").read_text())
    for r in ranking["rows"]:
        r["mislabeled"] = r["text"] in flipped_texts
    (root / "audit-truth.json").write_text(json.dumps(ranking))
    assert main(["report", str(root / "audit-truth.json"), "--out", str(root / "audit.html")]) == 0
    out["audit"] = root / "audit.html"
    out["audit-plain"] = root / "audit-plain.html"
    out["ranking"] = ranking
    out["trace"], out["trace_json"] = trace_report(root)
    return out


def trace_report(root) -> tuple:
    """A tiny LLaMA (built in code) fine-tuned on ten facts; ``trace --tokens --json --report`` of a completion,
    and ``influent report`` of the saved JSON. Returns (the report from the saved JSON, the JSON)."""
    data = root / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    base = ["--data", str(data), "--base-model", str(tiny_lm_folder(root / "lm", "llama")), "--cache-dir",
            str(root / "lm-cache"), "--last-k", "-1", "--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["trace", *base, "--prompt", "the capital of italy", "--completion", "is rome", "--tokens",
                     "--top", "10", "--json", "--report", str(root / "trace-direct.html")]) == 0
    result = json.loads(stdout.getvalue())  # under --json stdout is the JSON alone (the report note: stderr)
    (root / "trace.json").write_text(json.dumps(result))
    assert main(["report", str(root / "trace.json"), "--out", str(root / "trace.html")]) == 0
    direct = (root / "trace-direct.html").read_text()
    assert direct.replace("trace report;", "trace report of trace.json;") == (root / "trace.html").read_text()
    return root / "trace.html", result


def test_precision_recall_hand_computed():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7])
    truth = np.array([True, False, False, True, False])
    share, prec, rec = precision_recall(scores, truth)  # order: 0(T) 2(F) 4(F) 3(T) 1(F)
    np.testing.assert_allclose(share, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(prec, [1, 1 / 2, 1 / 3, 2 / 4, 2 / 5])
    np.testing.assert_allclose(rec, [0.5, 0.5, 0.5, 1.0, 1.0])


def test_kind_detection_and_bad_input(tmp_path):
    from influent.errors import UserError

    assert report_kind({"query": {}, "proponents": []}) == "explain"
    assert report_kind({"rows": [], "rankers": []}) == "audit"
    with pytest.raises(UserError, match="not an influent JSON output"):
        report_kind({"something": 1})
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2


def test_token_highlighting_for_language_model_items():
    page = build_report({"query": {"text": "the cat", "tokens": ["the", "cat"], "token_scores": [0.5, -1.0]},
                         "proponents": [{"score": 2.0, "text": "a dog", "label": "x"}], "opponents": []})
    assert 'title="+0.5" style="background:rgba(31,119,180,0.50)">the</span>' in page
    assert 'title="-1" style="background:rgba(214,39,40,1.00)">cat</span>' in page


def test_trace_tokens_are_aligned_escaped_and_coloured_by_sign():
    from influent.report.trace import aligned_tokens

    assert aligned_tokens("the cat  sat", ["the", "cat", "sat"]) == [("", "the"), (" ", "cat"), ("  ", "sat")]
    assert aligned_tokens(" a b", [" a", "<eos>", " b"]) == [("", " a"), ("", "<eos>"), ("", " b")]
    assert aligned_tokens("x y", ["y", "x"]) == [("", "y"), ("", "x")]  # no skipping over text: "y" is not next
    data = {"query": {"prompt": "<b>p</b>", "completion": "c & d", "loss": 1.5},
            "results": [{"id": "a", "text": "<script>x</script> ok", "score": 2.0, "loss_change": 0.2,
                         "tokens": [{"token": "<script>x</script>", "score": -3.0}, {"token": "ok", "score": 1.5}]},
                        {"id": "b", "text": "plain", "score": -0.5, "loss_change": -0.05}],
            "candidates": {"method": "all", "kept": 2, "of": 2}}
    assert report_kind(data) == "trace"
    page = build_report(data)
    body = page.split('<script type="application/json"')[0]
    assert "<script>x" not in body and "&lt;script&gt;x&lt;/script&gt;" in body and "&lt;b&gt;p" in body
    assert 'title="-3" style="background:rgba(214,39,40,1.00);color:#fff;">&lt;script&gt;' in body  # largest |share|
    assert 'title="+1.5" style="background:rgba(31,119,180,0.50);">ok</span>' in body  # half of it, blue
    assert "Proponents (1)" in body and "Opponents (1)" in body and "token share:" in body


def test_reports_are_self_contained(reports):
    for kind in ("explain", "validate", "attack", "audit", "trace"):
        text = reports[kind].read_text()
        assert re.search(r"(src|href)=[\"']?(https?:)?//", text) is None, kind  # nothing fetched
        block = re.search(r'<script type="application/json" id="influent-data">(.*?)</script>', text, re.DOTALL)
        assert json.loads(block.group(1).replace("<\\/", "</")), kind
        assert "<svg" in text or kind in ("explain", "trace"), kind


def _browser(args: list[str], timeout: int = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                              check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_browser_check_sees_a_script_error(reports, tmp_path):
    """The error hook and the console check do catch a broken page (so a clean result means something)."""
    broken = tmp_path / "broken.html"
    broken.write_text(reports["explain"].read_text().replace("</main>", "<script>notAFunction();</script></main>"))
    done = _browser(["--enable-logging=stderr", "--v=0", "--dump-dom", broken.resolve().as_uri()])
    assert 'data-js-errors="' in done.stdout and "notAFunction" in done.stdout
    assert re.search(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror", done.stderr)


EXPECTED = {  # headings and numbers each report must show in the browser's DOM
    "explain": ["Explanation 1", "Proponents (helped this prediction)", "Opponents (pushed against it)"],
    "validate": ["Validate: influence against retraining", "Estimated against actual change", "cold LOO",
                 "Gap decomposition"],
    "attack": ["Attack: label-flip", "Success against budget (targeted)", "Success against budget (untargeted)",
               "Summary (mean ± sd over runs)"],
    "audit": ["Audit: training examples ranked by", "Score distributions", "Precision and recall (",
              "precision @5%"],
    "trace": ["Trace: the training sequences behind a completion", "is rome", "token share:", "Proponents (",
              "Opponents (", "strongest token"],
}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_report_in_a_real_browser(reports, kind, tmp_path):
    url = reports[kind].resolve().as_uri()
    done = _browser(["--enable-logging=stderr", "--v=0", "--dump-dom", url])
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-ready="1"' in dom  # the page's script ran and parsed its data block
    assert "data-js-errors=" not in dom  # the page's error hook saw no uncaught error
    assert not re.search(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror", done.stderr), done.stderr[-2000:]
    for text in EXPECTED[kind]:
        assert text in dom, text
    if kind == "audit":  # the count of flagged training rows and the first ranked row's score, as printed
        rows = reports["ranking"]["rows"]
        flagged = sum(r["mislabeled"] for r in rows)
        assert 0 < flagged <= len(FLIPPED)
        assert f"Precision and recall ({flagged} of {len(rows)} examples flagged)" in dom
        first = min(rows, key=lambda r: r["rank"])
        assert f"{first[reports['ranking']['primary']]:.4g}" in dom
    if kind == "trace":  # the loss, the top score, and its strongest token's share on that token's span
        result = reports["trace_json"]
        top = max(result["results"], key=lambda r: r["score"])
        best = max(top["tokens"], key=lambda t: abs(t["score"]))
        assert f"Completion loss <b>{result['query']['loss']:.4g}</b> nats" in dom
        assert f"{top['score']:+.4g}</span>" in dom
        assert re.search(rf'title="{re.escape(format(best["score"], "+.4g"))}" style="[^"]*">{best["token"]}</span>',
                         dom)
    for width, height in ((1280, 900), (390, 844)):
        shot = tmp_path / f"{kind}-{width}.png"
        done = _browser([f"--screenshot={shot}", f"--window-size={width},{height}", url])
        assert shot.exists() and shot.stat().st_size > 5000, done.stderr[-2000:]
