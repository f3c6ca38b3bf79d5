"""``explain --rank both``: the most relevant and the most faithful ranking side by side, asked for or by default
where a model kind's table has no passing ranking; the per-kind defaults against the committed tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli

from influent.evaluation.explanations import choose_default

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "explain-quality"
TEXT = "a great and witty film"


def _columns(text: str, section: str) -> tuple[list[str], list[str]]:
    """The left and right cells of a side-by-side section's rows (title row first)."""
    lines = text.split("\n")
    start = lines.index(section) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        left, _, right = line.partition(" | ")
        rows.append((left.strip(), right.strip()))
    return [r[0] for r in rows], [r[1] for r in rows]


def _values(rows: list[str], key: str) -> list[str]:
    return [next(w for w in r.split() if w.startswith(key + "=")) for r in rows[1:] if r]


def test_rank_both_shows_the_two_rankings_side_by_side(capsys, base_args):
    code, text, err = run_cli(capsys, ["explain", "--text", TEXT, "--top", "4", "--rank", "both", *base_args])
    assert code == 0, err
    assert "The most relevant ranking (relatif) and the most faithful (influence)" in text.replace("\n", " ")
    lists = {}
    for rank in ("relatif", "influence"):
        code, out, err = run_cli(capsys, ["explain", "--text", TEXT, "--top", "4", "--json", "--rank", rank,
                                          *base_args])
        assert code == 0, err
        lists[rank] = json.loads(out)
    for section, kind in (("Proponents (helped this prediction):", "proponents"),
                          ("Opponents (pushed against it):", "opponents")):
        left, right = _columns(text, section)
        assert left[0] == "relatif" and right[0] == "influence (raw influence)"
        assert _values(left, "relatif") == [f"relatif={r['rank_value']:+.3g}" for r in lists["relatif"][kind]]
        assert _values(right, "score") == [f"score={r['score']:+.3g}" for r in lists["influence"][kind]]
        ids = {r: [x["id"] for x in lists[r][kind]] for r in lists}
        marked = [row.split("[")[0].endswith("*") for row in left[1 : 1 + len(ids["relatif"])]]
        assert marked == [i in ids["influence"] for i in ids["relatif"]]  # '*': in both lists


def test_rank_both_json_holds_both_explanations(capsys, base_args):
    code, out, err = run_cli(capsys, ["explain", "--text", TEXT, "--top", "3", "--json", "--rank", "both",
                                      *base_args])
    assert code == 0, err
    got = json.loads(out)
    assert got["rankings"] == ["relatif", "influence"]
    assert {r: got["explanations"][r]["ranking"] for r in got["rankings"]} == {"relatif": "relatif",
                                                                                "influence": "influence"}


def test_without_a_passing_ranking_the_default_shows_both(capsys, base_args, monkeypatch):
    import influent.explain

    monkeypatch.setitem(influent.explain.DEFAULT_RANKINGS, "head", "both")
    code, text, err = run_cli(capsys, ["explain", "--text", TEXT, "--top", "3", *base_args])
    assert code == 0, err
    assert "No ranking passes the identical-class test on the head model's table" in text
    left, right = _columns(text, "Proponents (helped this prediction):")
    assert left[0] == "relatif" and right[0] == "influence (raw influence)"
    monkeypatch.setitem(influent.explain.DEFAULT_RANKINGS, "head", "relatif")
    code, text, err = run_cli(capsys, ["explain", "--text", TEXT, "--top", "3", *base_args])
    assert code == 0 and "No ranking passes" not in text and "Ranked by relatif" in text


@pytest.mark.parametrize("kind", ["head", "finetuned"])
def test_each_kinds_default_is_the_rules_choice_on_its_committed_table(kind):
    from influent.cli.explain import DEFAULT_RANKS
    from influent.explain import DEFAULT_RANKINGS, SIDE_BY_SIDE

    result = json.loads((RESULTS / kind / "explain_quality.json").read_text())
    choice = choose_default(result["summary"])
    assert choice["faithfulness_measured"]
    assert DEFAULT_RANKINGS[kind] == (choice["default"] or "both") == DEFAULT_RANKS[kind]
    assert SIDE_BY_SIDE[kind] == (choice["most_relevant"], choice["most_faithful"])


def test_the_default_depends_on_the_model_kind():
    from argparse import Namespace

    from influent.cli.explain import resolve_rank

    assert resolve_rank(Namespace(rank=None, model="head")) == ("relatif", None, "")
    assert resolve_rank(Namespace(rank=None, model="finetuned")) == ("influence", None, "")
    assert resolve_rank(Namespace(rank="cosine", model="finetuned")) == ("cosine", None, "")
    rank, pair, note = resolve_rank(Namespace(rank="both", model="finetuned"))
    assert (rank, pair) == ("relatif", ("relatif", "influence")) and "finetuned model's table" in note
