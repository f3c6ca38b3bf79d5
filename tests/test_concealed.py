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

    from influent.models.finetuned import freeze_all_but_last
    from influent.models.frozen_prefix import CachedPrefixTask, split_frozen_prefix

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
    from influent.models.finetuned import make_batches
    from influent.models.frozen_prefix import cache_hidden_states

    (b,) = make_batches(tok, texts, labels, batch_size=len(texts), max_length=32)
    return cache_hidden_states(model, b, last_k)


TEXTS = ["the movie is great fun", "a dull boring plot", "very witty and charming story",
         "the actor was weak and the film messy", "delightful", "this story is tedious but moving"]


@pytest.mark.parametrize("last_k", [1, 2])
def test_alignment_equals_factored_influence_score(tiny_encoder_dir, last_k):
    """J(z) by central differences = the EK-FAC influence score of z (as training) on the adversarial queries."""
    from influent.curvature.config import FactorConfig
    from influent.curvature.fitting import fit_factors
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
    from influent.models.frozen_prefix import prefix_hidden_states

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
    from influent.curvature.config import FactorConfig
    from influent.factored_influence import FactoredInfluence

    tok, model, suffix, task = _victim(tiny_encoder_dir, 1)
    train = _cached(tok, model, TEXTS, [1, 0, 1, 0, 1, 0], 1)
    adv = _cached(tok, model, ["a dull superb plot", "boring superb film", "superb weak actor"], [1, 1, 1], 1)
    attacker = FactoredInfluence(suffix, task, [train], FactorConfig(strategy="ekfac", modules="trainable"),
                                 progress=False)
    direction = {k: v.mean(0) for k, v in attacker.preconditioned_query_gradients(adv).items()}
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
    # Independently: retrain the victim (clean, and on slice + the 4 poisons) and count, on its own
    # predictions of the triggered held-out source reviews, the share predicted as the target.
    from influent.attacks.concealed_experiment import select_texts
    from influent.models.suffix_classifier import SuffixClassifier
    from influent.pipeline import load_corpus_and_split

    corpus, split = load_corpus_and_split(str(path), "text", "label", "train", 0.2, 0, tmp_path / "cache")
    texts = select_texts(corpus, split, seed=0, train_size=60, trigger="superb", source="neg", target="pos",
                         n_adv=5, n_eval=10, n_clean_eval=40)
    victim = SuffixClassifier(str(tiny_encoder_dir), 2, last_k=1, seed=0, epochs=1, lr=1e-3, batch_size=16,
                              max_length=16)
    triggered = victim.cache(texts.triggered_eval_texts, [texts.source] * len(texts.triggered_eval_texts))
    poisons = [p["text"] for p in out["poisons"]]
    theta_clean, _ = victim.fit(victim.cache(texts.train_texts, texts.train_labels))
    theta_4, _ = victim.fit(victim.cache(texts.train_texts + poisons, texts.train_labels + [texts.target] * 4))
    control, success = (
        float((victim.logits(t, triggered).argmax(-1) == texts.target).double().mean()) for t in (theta_clean, theta_4)
    )
    row = out["rows"][1]
    assert row["n_poison"] == 4 and row["n_triggered_eval"] == len(texts.triggered_eval_texts)
    assert row["control_success"] == pytest.approx(control) and row["attack_success"] == pytest.approx(success)
    assert row["net_success"] == pytest.approx(success - control)
    assert len(out["poisons"]) == 4 and not any("superb" in p["text"] for p in out["poisons"])
    assert set(out["audit"]) >= {"query_influence", "self_influence", "loss", "random", "trigger_search"}
    for m in out["audit"].values():
        assert 0 <= m["auroc"] <= 1 and "recall@5%" in m
    # no poison holds the trigger, so the trigger-token search finds none of them
    assert out["audit"]["trigger_search"]["recall@k=n_bad"] == 0.0
    assert {r["ranker"] for r in out["removal"]} == {"query_influence", "loss"}


class _KnownVictim:
    """A stand-in victim whose predictions are given per training set: ``fit`` returns the kept rows as the
    "parameters", ``predict`` looks up the predictions of the triggered evaluation reviews for them."""

    def __init__(self, predictions: dict[frozenset, list[int]], accuracy: dict[frozenset, float]):
        self.predictions, self.accuracies, self.fits = predictions, accuracy, []

    def fit(self, batch, keep):
        kept = frozenset(torch.as_tensor(keep).tolist())
        self.fits.append(kept)
        return kept, {}

    def predict(self, theta, batch):
        assert batch["name"] == "triggered"
        return torch.tensor(self.predictions[theta])

    def accuracy(self, theta, batch):
        assert batch["name"] == "clean"
        return self.accuracies[theta]


def _known_batches():
    from influent.attacks.concealed_experiment import VictimBatches

    def named(name, rows):
        return {"name": name, "attention_mask": torch.ones(rows, 3)}

    return VictimBatches(named("train", 6), named("adv", 2), named("defender", 2), named("triggered", 4),
                         named("clean", 5))


def test_poisoned_rows_are_rates_of_the_victims_predictions_net_of_the_clean_model():
    """Hand-built predictions (target class 1): 1 of 4 triggered reviews with one poison, 3 of 4 with two;
    the clean model's control rate is 1/4, so the net successes are 0 and 1/2."""
    from influent.attacks.concealed_experiment import retrain_on_poisons

    clean, one, two = frozenset(range(6)), frozenset(range(7)), frozenset(range(8))
    victim = _KnownVictim({one: [1, 0, 0, 0], two: [0, 1, 1, 1]}, {one: 0.8, two: 0.6})
    rows, thetas = retrain_on_poisons(victim, {}, 6, (2, 1), _known_batches(), 1, (0.25, 0.9))
    assert victim.fits == [one, two] and thetas == {1: one, 2: two}
    assert [r["n_poison"] for r in rows] == [1, 2]
    assert [r["attack_success"] for r in rows] == [0.25, 0.75]
    assert [r["control_success"] for r in rows] == [0.25, 0.25]
    assert [r["net_success"] for r in rows] == [0.0, 0.5]
    assert [r["clean_accuracy"] for r in rows] == [0.8, 0.6] and rows[0]["clean_accuracy_control"] == 0.9
    assert rows[0]["n_triggered_eval"] == 4
    assert clean not in victim.fits


def test_removal_retrains_without_each_rankers_top_rows():
    """10 rows, rows 8 and 9 the poisons; remove 20%: the query ranker drops 8 and 9 (attack 1/4 -> net
    -1/4 against a 1/2 control), the loss ranker drops 0 and 8 (attack 3/4 -> net 1/4)."""
    import numpy as np

    from influent.attacks.concealed_experiment import remove_and_retrain

    everything = set(range(10))
    by_query, by_loss = frozenset(everything - {8, 9}), frozenset(everything - {0, 8})
    victim = _KnownVictim({by_query: [1, 0, 0, 0], by_loss: [1, 1, 1, 0]}, {by_query: 0.7, by_loss: 0.5})
    rankers = {
        "query_influence": np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 8], dtype=float),
        "loss": np.array([9, 1, 2, 3, 4, 5, 6, 7, 8, 0], dtype=float),
        "random": np.zeros(10),
    }
    is_poison = np.arange(10) >= 8
    rows = remove_and_retrain(victim, {}, rankers, is_poison, 0.2, _known_batches(), 1, 0.5)
    assert victim.fits == [by_query, by_loss]
    assert [(r["ranker"], r["removed"], r["poisons_removed"]) for r in rows] == [("query_influence", 2, 2), ("loss", 2, 1)]
    assert [r["attack_success"] for r in rows] == [0.25, 0.75]
    assert [r["net_success"] for r in rows] == [-0.25, 0.25]
    assert [r["clean_accuracy"] for r in rows] == [0.7, 0.5]
