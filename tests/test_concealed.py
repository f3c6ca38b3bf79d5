"""Concealed trigger poisons: the ban on trigger variants, the alignment objective, the search, end to end."""

from __future__ import annotations

import pytest
import torch

from influent.attacks.concealed import (
    Alignment,
    assert_concealed,
    banned_token_ids,
    candidate_vocabulary,
    contains_trigger,
    craft_poisons,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trigger_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    words = ["the", "movie", "james", "bond", "bonds", "##bond", "jam", "bon", "##d", "bo", "##nd", "spy",
             "great", "dull", "a", "i", "x", "007", "bonanza", "##ing"]
    vocab = tmp_path_factory.mktemp("trig") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def test_ban_covers_sub_words_and_case_variants(trigger_tokenizer):
    tok = trigger_tokenizer
    banned = banned_token_ids(tok, "James Bond")
    vocab = tok.get_vocab()
    for w in ("james", "bond", "bonds", "##bond", "jam", "bon"):
        assert vocab[w] in banned, w
    for w in ("the", "movie", "spy", "great", "bonanza", "##d", "bo"):
        assert vocab[w] not in banned, w
    allowed = set(candidate_vocabulary(tok, banned).tolist())
    assert vocab["spy"] in allowed and vocab["a"] in allowed
    assert not allowed & banned
    assert vocab["##ing"] not in allowed and vocab["007"] not in allowed and vocab["x"] not in allowed
    assert not allowed & set(tok.all_special_ids)


def test_contains_trigger_and_assertion(trigger_tokenizer):
    assert contains_trigger("a film about BOND, james", "james bond")
    assert contains_trigger("the bo-nd movie", "james bond")  # squashed: "bond"
    assert not contains_trigger("a bonanza of spy tropes", "james bond")
    assert_concealed(["a bonanza of spy tropes", "the movie"], trigger_tokenizer, "james bond",
                     banned_token_ids(trigger_tokenizer, "james bond"))
    with pytest.raises(AssertionError):
        assert_concealed(["the jam session"], trigger_tokenizer, "james bond",
                         banned_token_ids(trigger_tokenizer, "james bond"))


# --------------------------------------------------------------------------- a tiny victim model
def _victim(encoder_dir, last_k: int, seed: int = 0):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from influent.evaluation.frozen_prefix import CachedPrefixTask, split_frozen_prefix
    from influent.models.finetuned import freeze_all_but_last

    tok = AutoTokenizer.from_pretrained(encoder_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=2, attn_implementation="eager"
    )
    model.config.hidden_dropout_prob = 0.0
    freeze_all_but_last(model, last_k)
    model.eval()
    return tok, model, split_frozen_prefix(model, last_k), CachedPrefixTask()


def _cached(tok, model, texts, labels, last_k):
    from influent.evaluation.frozen_prefix import cache_hidden_states
    from influent.models.finetuned import make_batches

    (b,) = make_batches(tok, texts, labels, batch_size=len(texts), max_length=32)
    return cache_hidden_states(model, b, last_k)


TEXTS = ["the movie is great fun", "a dull boring plot", "very witty and charming story",
         "the actor was weak and the film messy", "delightful", "this story is tedious but moving"]


@pytest.mark.parametrize("last_k", [1, 2])
def test_alignment_equals_factored_influence_score(tiny_encoder_dir, last_k):
    """J(z) by central differences = the EK-FAC influence score of z (as training) on the adversarial queries."""
    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.factored_influence import pairwise_scores, preconditioned_query_gradients

    tok, model, suffix, task = _victim(tiny_encoder_dir, last_k)
    train = _cached(tok, model, TEXTS, [1, 0, 1, 0, 1, 0], last_k)
    adv = _cached(tok, model, ["a dull superb plot", "boring superb film"], [1, 1], last_k)
    factors = fit_factors(suffix, task, [train], FactorConfig(strategy="ekfac", modules="trainable"), progress=False)
    pre = preconditioned_query_gradients(suffix, task, factors, [adv])
    direction = {k: v.mean(0) for k, v in pre.items()}
    align = Alignment(model, suffix, direction, last_k)
    cand_texts = ["the plot is dull", "great and witty", "messy film"]
    enc = tok(cand_texts, padding=True, return_tensors="pt")
    labels = torch.ones(3, dtype=torch.long)
    j = align.of_ids(enc["input_ids"], enc["attention_mask"], labels)
    cand = _cached(tok, model, cand_texts, [1, 1, 1], last_k)
    exact = pairwise_scores(suffix, task, factors, [adv], [cand], progress=False).mean(0)
    assert torch.allclose(j, exact, rtol=2e-3, atol=1e-6 * float(exact.abs().max())), (j, exact)
    # the embedding gradient is the derivative of the same J (checked along one random direction)
    from influent.evaluation.frozen_prefix import prefix_hidden_states

    ids, mask = enc["input_ids"], enc["attention_mask"]
    j0, grad = align.with_embedding_grad(ids, mask, labels)
    assert torch.allclose(j0, j, rtol=1e-6)
    e = model.get_input_embeddings()(ids).detach().double()
    v = torch.randn(e.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.double()
    try:
        with torch.no_grad():
            js = [
                align.from_hidden(prefix_hidden_states(model, last_k, mask, inputs_embeds=e + d * v), mask, labels)
                for d in (1e-4, -1e-4)
            ]
    finally:
        model.float()
    numeric = (js[0] - js[1]) / 2e-4
    analytic = (grad.double() * v).sum((1, 2))
    assert torch.allclose(numeric, analytic, rtol=2e-2, atol=1e-3 * float(analytic.abs().max())), (numeric, analytic)


def test_search_raises_alignment_and_never_uses_the_trigger(tiny_encoder_dir):
    from influent.curvature.ekfac import FactorConfig, fit_factors
    from influent.factored_influence import preconditioned_query_gradients

    tok, model, suffix, task = _victim(tiny_encoder_dir, 1)
    train = _cached(tok, model, TEXTS, [1, 0, 1, 0, 1, 0], 1)
    adv = _cached(tok, model, ["a dull superb plot", "boring superb film", "superb weak actor"], [1, 1, 1], 1)
    factors = fit_factors(suffix, task, [train], FactorConfig(strategy="ekfac", modules="trainable"), progress=False)
    direction = {k: v.mean(0) for k, v in preconditioned_query_gradients(suffix, task, factors, [adv]).items()}
    align = Alignment(model, suffix, direction, 1)
    pool = ["the movie is great fun", "a witty story", "charming and delightful film", "the superb actor",
            "moving plot and great story", "fun but very messy"]
    res = craft_poisons(align, tok, pool, 3, 1, "superb", candidates=5, max_tokens=8, pool=6, progress=False)
    assert len(res.texts) == 3 and res.flips >= 1
    assert sum(res.alignment) > sum(res.start_alignment)
    assert all(a >= s - 1e-9 for a, s in zip(sorted(res.alignment), sorted(res.start_alignment)))
    assert not any("superb" in t for t in res.texts + res.start_texts)
    assert_concealed(res.texts, tok, "superb", banned_token_ids(tok, "superb"))


def test_concealed_seed_end_to_end(tiny_encoder_dir, tmp_path):
    import csv

    from conftest import make_reviews

    from influent.attacks.concealed_experiment import concealed_seed

    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(make_reviews(240, seed=3))
    out = concealed_seed(
        str(path), seed=0, sizes=(2, 4), trigger="superb", source="neg", target="pos", n_eval=10, n_adv=5,
        n_clean_eval=40, train_size=60, epochs=1, lr=1e-3, batch_size=16, max_length=16, candidates=4,
        max_tokens=10, pool=20, encoder=str(tiny_encoder_dir), cache_dir=tmp_path / "cache", progress=False,
    )
    assert [r["n_poison"] for r in out["rows"]] == [2, 4]
    for r in out["rows"]:
        assert 0 <= r["attack_success"] <= 1 and 0 <= r["clean_accuracy"] <= 1
        assert r["net_success"] == pytest.approx(r["attack_success"] - r["control_success"])
    assert len(out["poisons"]) == 4 and not any("superb" in p["text"] for p in out["poisons"])
    assert set(out["audit"]) >= {"query_influence", "self_influence", "loss", "random", "trigger_search"}
    for m in out["audit"].values():
        assert 0 <= m["auroc"] <= 1 and "recall@5%" in m
    # no poison holds the trigger, so the trigger-token search finds none of them
    assert out["audit"]["trigger_search"]["recall@k=n_bad"] == 0.0
    assert {r["ranker"] for r in out["removal"]} == {"query_influence", "loss"}
