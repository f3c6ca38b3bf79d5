"""The explanation-quality evaluation: its retraining against from-scratch fits, relevance against hand counts,
the default's rule on hand-built summaries, and the head driver end to end on a tiny head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_explain import _head_setup

from influent.evaluation.explanation_runs import head_explanation_quality
from influent.evaluation.explanations import (
    HeadRemoval,
    RankingPanel,
    choose_default,
    influence_panel,
    interval,
    markdown_table,
    relevance,
    removal_experiment,
)
from influent.models.head import HeadTask, train_head


def test_head_removal_matches_a_from_scratch_fit(tmp_path):
    setup = _head_setup(tmp_path, n=70, d=4, seed=2)
    xq = setup.test_x[:3]
    pred = setup.model.probabilities(xq).detach().argmax(1)
    removal = HeadRemoval(setup.model, setup.train_x, setup.train_y, setup.task.l2, xq, pred)
    removed = np.array([3, 10, 11, 40, 65])
    keep = torch.as_tensor(np.setdiff1d(np.arange(70), removed))
    # from scratch: zeros, generic Newton with the autograd Hessian (models.head.train_head)
    scratch, _, _ = train_head(setup.train_x[keep], setup.train_y[keep], 2, setup.task.l2)
    warm = removal.refit(removed)
    assert warm.linear.weight.detach() == pytest.approx(scratch.linear.weight.detach(), abs=1e-8)
    assert warm.linear.bias.detach() == pytest.approx(scratch.linear.bias.detach(), abs=1e-8)
    task = HeadTask(0.0)
    for q in range(3):
        loss, p = removal.without(q, removed)
        batch = (xq[q : q + 1], pred[q : q + 1])
        assert loss == pytest.approx(float(task.per_example_loss(scratch, batch).detach()[0]), rel=1e-7)
        assert p == int(scratch.probabilities(xq[q : q + 1]).argmax())
        base, p0 = removal.base(q)
        assert base == pytest.approx(float(task.per_example_loss(setup.model, batch).detach()[0]), rel=1e-8)
        assert p0 == int(pred[q])


def test_removal_experiment_loss_change_is_retrained_minus_original(tmp_path):
    setup = _head_setup(tmp_path, n=60, d=3, seed=4)
    xq = setup.test_x[:4]
    pred = setup.model.probabilities(xq).detach().argmax(1)
    panel = influence_panel(setup.influence(), (xq, pred), pred.numpy(), setup.train_y.numpy(), {})
    removal = HeadRemoval(setup.model, setup.train_x, setup.train_y, setup.task.l2, xq, pred)
    records = list(removal_experiment(panel, removal, [0, 2], ks=(1, 5), seed=0))
    assert [r.query for r in records] == [0, 2]
    task = HeadTask(0.0)
    for rec in records:
        q = rec.query
        top5 = torch.argsort(panel.values["influence"][q], descending=True)[:5]
        top5 = top5[panel.values["influence"][q][top5] > 0]
        keep = torch.as_tensor(np.setdiff1d(np.arange(60), top5.numpy()))
        scratch, _, _ = train_head(setup.train_x[keep], setup.train_y[keep], 2, setup.task.l2)
        batch = (xq[q : q + 1], pred[q : q + 1])
        want = float((task.per_example_loss(scratch, batch) - task.per_example_loss(setup.model, batch)).detach()[0])
        change, _flipped, count = rec.results["influence"][5]
        assert change == pytest.approx(want, rel=1e-6, abs=1e-10) and count == len(top5)
        assert change > 0  # removing the top proponents raises the query loss
        # relatif and cosine order a query's examples identically: same removal, same number
        assert rec.results["relatif"] == rec.results["cosine"]
        assert set(rec.results) == {"influence", "relatif", "cosine", "random"}


def test_relevance_counts_by_hand():
    values = torch.tensor([[3.0, 2.0, 1.0, -1.0], [0.5, -2.0, 4.0, 1.0], [-1.0, -2.0, -3.0, -4.0]])
    panel = RankingPanel({"r": values}, {"r": True}, {"r": 0.0}, np.array([1, 0, 1]), np.array([1, 0, 0, 1]))
    got = relevance(panel, top=2)["r"]
    # query 0: top-2 = [0 (label 1), 1 (label 0)], predicted 1; query 1: [2 (0), 3 (1)], predicted 0; query 2: none
    assert got["top1_same_class"][:2].tolist() == [1.0, 1.0] and np.isnan(got["top1_same_class"][2])
    assert got["top10_same_class"][:2].tolist() == [0.5, 0.5]
    assert got["distinct_top10"] == 4
    assert interval(got["top1_same_class"])["m"] == 2


def test_choose_default_follows_the_rule():
    def row(share, change):
        return {"top10_same_class": {"mean": share}, "loss_change@10": {"mean": change}}

    summary = {"influence": row(0.77, 0.9), "relatif": row(0.99, 0.2), "cosine": row(0.96, 0.3),
               "embedding_nn": row(0.99, 0.5)}
    got = choose_default(summary)
    assert got["default"] == "cosine" and got["passing"] == ["relatif", "cosine"]
    assert got["most_relevant"] == "relatif" and got["most_faithful"] == "influence"
    summary["relatif"] = row(0.90, 0.2)
    summary["cosine"] = row(0.91, 0.3)
    assert choose_default(summary)["default"] is None


def test_head_driver_end_to_end(tmp_path):
    setup = _head_setup(tmp_path, n=60, d=3, seed=0)
    setup.test_x = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    setup.test_idx = np.arange(60, 70).tolist() + [60, 61]  # positions into the corpus texts
    result = head_explanation_quality(setup, n_queries=8, ks=(1, 3), removal_queries=4, seed=0,
                                      records_path=tmp_path / "records.jsonl", progress=False)
    assert result["n_queries"] == 8 and result["n_queries_removal"] == 4
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 4
    s = result["summary"]
    assert set(s) == {"influence", "relatif", "cosine", "embedding_nn", "tfidf_nn", "random"}
    assert s["relatif"]["top10_same_class"] == s["cosine"]["top10_same_class"]
    assert s["random"]["loss_change@3"]["m"] == 4 and "top1_same_class" not in s["random"]
    assert result["choice"]["most_relevant"] in ("influence", "relatif", "cosine")
    table = markdown_table(s, (1, 3))
    assert "| tfidf_nn |" in table and "loss change k=3" in table


def test_comparators_can_be_measured_at_fewer_k(tmp_path):
    setup = _head_setup(tmp_path, n=60, d=3, seed=0)
    setup.test_x = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    setup.test_idx = np.arange(60, 70).tolist() + [60, 61]
    result = head_explanation_quality(setup, n_queries=6, ks=(1, 3), reference_ks=(3,), removal_queries=2,
                                      seed=0, progress=False)
    s = result["summary"]
    for name in ("influence", "relatif"):
        assert s[name]["loss_change@1"]["m"] == 2 and s[name]["loss_change@3"]["m"] == 2
    for name in ("embedding_nn", "tfidf_nn", "random"):
        assert "loss_change@1" not in s[name] and s[name]["loss_change@3"]["m"] == 2
    # per query at most 2 + 2 (influence, relatif = cosine) + 3 (references, random) distinct removals
    assert 0 < result["retrains"] <= 2 * 7 and result["retrain_seconds_per_replay"] > 0
    assert result["full_panel_retrains"] == 6 * 5 * 2  # queries x (influence, relatif, 2 references, random) x k
    table = markdown_table(s, (1, 3))
    assert "| random | - | - | " in table
    assert choose_default(s, k=3)["faithfulness_measured"]


def test_validate_explain_writes_the_table(capsys, tmp_path, tiny_encoder_dir, reviews_csv):
    import json

    from cli_helpers import run_cli

    out = tmp_path / "out"
    args = ["validate", "--explain", "--queries", "4", "--out", str(out), "--data", str(reviews_csv),
            "--text-column", "review", "--label-column", "sentiment", "--encoder", str(tiny_encoder_dir),
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--l2", "0.01"]
    code, text, err = run_cli(capsys, args)
    assert code == 0, err
    result = json.loads((out / "explain_quality.json").read_text())
    assert result["n_queries"] == 4 and result["n_queries_removal"] == 4 and result["ks"] == [1, 10, 50]
    assert result["summary"]["random"]["loss_change@50"]["m"] == 4
    assert "| relatif |" in text and "Default by the rule" in text
    assert (out / "explain_quality.md").read_text().startswith("| ranking |")


def test_choose_default_without_removals_names_no_default():
    summary = {"influence": {"top10_same_class": {"mean": 0.99}}, "relatif": {"top10_same_class": {"mean": 0.98}}}
    got = choose_default(summary)
    assert got["default"] is None and not got["faithfulness_measured"] and got["passing"] == ["influence", "relatif"]


def _dropout_free_encoder(folder):
    """A tiny 2-layer BERT without dropout (so a seeded replay is a deterministic function of its data)."""
    from test_finetuned import WORDS
    from transformers import BertConfig, BertModel, BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _fine_tune_from_scratch(encoder, texts, labels, removed, *, seed, epochs, lr, batch_size, max_length):
    """Independent of the package's trainer: the full Hugging Face classifier (every layer run, texts tokenized
    per minibatch), last layer + pooler + head trained by a hand-written AdamW loop on the kept texts only, in
    the replay's order (the seeded permutation of all rows with the removed ones left out)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2, attn_implementation="eager")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    gone = {int(i) for i in removed}
    model.train()
    for _ in range(epochs):
        order = [int(i) for i in torch.randperm(len(texts), generator=gen) if int(i) not in gone]
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(out, torch.tensor([labels[i] for i in rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, tok


def test_suffix_removal_matches_a_from_scratch_fine_tune_on_the_reduced_set(tmp_path):
    from test_finetuned import toy_data

    from influent.evaluation.explanations import SuffixRemoval
    from influent.models.suffix_classifier import SuffixClassifier

    enc = _dropout_free_encoder(tmp_path / "enc")
    texts, labels = toy_data(40, 0)
    q_texts, _ = toy_data(3, 1)
    opts = {"seed": 0, "epochs": 2, "lr": 3e-3, "batch_size": 8, "max_length": 16}
    clf = SuffixClassifier(enc, 2, last_k=1, **opts)
    batch = clf.cache(texts, labels)
    theta, _ = clf.fit(batch)
    q_batch = clf.cache(q_texts, [0, 0, 0])
    q_batch = dict(q_batch, labels=clf.predict(theta, q_batch))
    removal = SuffixRemoval(clf, batch, q_batch, theta)
    removed = np.array([1, 7, 8, 20, 33])
    for gone in (np.zeros(0, dtype=np.int64), removed):
        model, tok = _fine_tune_from_scratch(enc, texts, labels, gone, **opts)
        with torch.no_grad():
            logits = model(**tok(q_texts, padding=True, return_tensors="pt")).logits.double()
        for q in range(3):
            label = int(q_batch["labels"][q])
            want = float(-logits.log_softmax(-1)[q, label])
            loss, pred = removal.without(q, gone) if len(gone) else removal.base(q)
            assert loss == pytest.approx(want, abs=1e-6) and pred == int(logits[q].argmax())
    # the removal moved the replay: the check above compares two different trainings, not one twice
    assert abs(removal.without(0, removed)[0] - removal.base(0)[0]) > 1e-4


def test_paired_difference_and_records_round_trip(tmp_path):
    from influent.evaluation.explanation_runs import collect, paired_block, read_records
    from influent.evaluation.explanations import RemovalRecord, paired_difference

    recs = [RemovalRecord(q, {"influence": {10: (a, 0.0, 10)}, "relatif": {10: (b, 1.0, 10)}}, 2.0, 3)
            for q, (a, b) in enumerate([(0.5, 0.2), (0.1, 0.3), (0.4, 0.4)])]
    got = paired_difference(recs, "influence", "relatif", 10)
    assert got["mean"] == pytest.approx((0.3 - 0.2 + 0.0) / 3) and got["m"] == 3
    assert got["low"] <= got["mean"] <= got["high"]
    path = tmp_path / "records.jsonl"
    back = read_records(path) if collect(iter(recs), path, None, False, 3) else None
    assert [(r.query, r.results, r.seconds, r.retrains) for r in back] == [
        (r.query, r.results, r.seconds, r.retrains) for r in recs]
    assert paired_block(back, (1, 10), 0) == {"influence - relatif@10": got}


def test_a_resumed_removal_run_equals_an_uninterrupted_one(tmp_path):
    setup = _head_setup(tmp_path, n=60, d=3, seed=0)
    setup.test_x = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    setup.test_idx = np.arange(60, 70).tolist() + [60, 61]
    opts = {"n_queries": 6, "ks": (1, 3), "seed": 0, "progress": False}
    whole = head_explanation_quality(setup, removal_queries=4, records_path=tmp_path / "a.jsonl", **opts)
    head_explanation_quality(setup, removal_queries=2, records_path=tmp_path / "b.jsonl", **opts)
    resumed = head_explanation_quality(setup, removal_queries=4, records_path=tmp_path / "b.jsonl", resume=True,
                                       **opts)
    assert resumed["n_queries_removal"] == 4
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    for name in ("influence", "relatif", "random"):
        for k in (1, 3):
            assert resumed["summary"][name][f"loss_change@{k}"] == whole["summary"][name][f"loss_change@{k}"]
