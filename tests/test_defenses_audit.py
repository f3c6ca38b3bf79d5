"""run_audit end to end on a tiny CSV with the packaged MiniLM (slow-ish: loads the encoder)."""

import pytest

from influent.errors import UserError


@pytest.mark.slow
def test_run_audit_writes_ranked_csv_and_json(tmp_path):
    import csv
    import json

    from influent.defenses import run_audit

    good = [
        "a wonderful film",
        "great acting and a moving story",
        "delightful and funny",
        "a triumph",
        "loved it",
    ]
    bad = ["a dull mess", "boring and far too long", "awful script", "a tedious failure", "hated it"]
    rows = [(f"{t} number {i}", "pos") for i in range(4) for t in good]
    rows += [(f"{t} number {i}", "neg") for i in range(4) for t in bad]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    res = run_audit(
        str(data),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        folds=2,
        rankers=["loo_loss", "self_influence", "loss", "query_influence", "random"],
        trigger="zzz",
    )
    assert res["primary"] == "query_influence"
    with open(res["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == res["n"] and table[0]["rank"] == "1"
    primary = [float(r["query_influence"]) for r in table]
    assert primary == sorted(primary, reverse=True)
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["sign"] == "higher = more suspicious" and len(saved["rows"]) == res["n"]
    with pytest.raises(UserError, match="unknown ranker"):
        run_audit(
            str(data), out=tmp_path / "o2", cache_dir=tmp_path / "cache", progress=False, rankers=["nope"]
        )
