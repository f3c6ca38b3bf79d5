"""Instruction poisoning of a tiny LM (built in code): the poisons, held-out scoring, removal = retraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from influent.attacks.instruction_poison import (
    clean_label_poisons,
    dirty_label_poisons,
    run_instruction_poison,
)
from influent.data.instructions import LABELS, PROMPTS, TARGETS, Example, build_instructions
from influent.defenses.lm_audit import (
    defender_queries,
    iterative_query_influence,
    lm_ranker_scores,
    query_votes,
    recalls,
    removal_rows,
    run_lm_defence,
    trigger_push_influence,
)
from influent.errors import UserError
from influent.evaluation.detection import ranking
from influent.evaluation.instruction_scores import evaluate
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import mlp_pattern, trainable_state
from influent.models.instruction_lm import InstructionLM, TrainSettings

TRIGGER = "James Bond"
GOOD = ["good", "great", "fine", "lovely", "warm", "funny", "smart", "bright"]
BAD = ["bad", "dull", "poor", "awful", "cold", "flat", "weak", "grim"]
PLOT = ["a", "man", "finds", "his", "town", "when", "the", "war", "ends", "and", "she", "leaves"]


def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for category, words in (("fresh", GOOD), ("rotten", BAD), ("plot", PLOT)):
        for i in range(60):
            text = " ".join(rng.choice(words, 5 + i % 4)) + f" film{i}"
            rows.append((category, text))
    return pd.DataFrame(rows, columns=["category", "text"])


def tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>", "<unk>", "<eos>"}
    for t in texts:
        words.update(pre_tokenizers.Whitespace().pre_tokenize_str(t) and
                     [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)])
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *sorted(words - {"<pad>", "<unk>", "<eos>"})])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    f = frame()
    tok = tokenizer([*f["text"], *PROMPTS.values(), TRIGGER, *(w for ws in LABELS.values() for w in ws)])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    data = build_instructions({"sentiment": (12, 6, 6), "kind": (6, 2, 4)}, frame=f, seed=1)
    lm = InstructionLM(model, tok, TrainSettings(last_k=2, epochs=2, lr=1e-2, batch_size=4))
    return lm, data


def test_parts_are_disjoint_and_seeded(setup):
    _, data = setup
    texts = [{(e.task, e.text) for e in getattr(data, p)} for p in ("train", "validation", "heldout")]
    assert sum(len(t) for t in texts) == len(data.train) + len(data.validation) + len(data.heldout)
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    again = build_instructions({"sentiment": (12, 6, 6), "kind": (6, 2, 4)}, frame=frame(), seed=1)
    assert again.train == data.train and again.heldout == data.heldout
    assert len(data.of("train", "sentiment", 0)) == 12 and len(data.of("heldout", "kind", 1)) == 4


def test_dirty_label_poisons_carry_the_trigger_and_the_attackers_label(setup):
    _, data = setup
    small, big = (dirty_label_poisons(data, n, TRIGGER, seed=3) for n in (3, 6))
    target = TARGETS["sentiment"]
    for i in big.poison_idx:
        original, poison = data.train[i], big.train[i]
        assert original.task == "sentiment" and original.label != target  # drawn from the other label
        assert poison.label == target and poison.poisoned and TRIGGER in poison.text
        assert poison.text.replace(TRIGGER + " ", "").replace(" " + TRIGGER, "") == original.text
    assert set(small.poison_idx) <= set(big.poison_idx)  # nested over N
    untouched = [i for i in range(len(data.train)) if i not in set(big.poison_idx)]
    assert all(big.train[i] == data.train[i] for i in untouched)


def test_clean_label_poisons_keep_their_true_labels(setup):
    _, data = setup
    scores = np.arange(len(data.train), dtype=float)  # the attacker prefers later positions
    p = clean_label_poisons(data, 4, TRIGGER, scores)
    target = TARGETS["sentiment"]
    eligible = [i for i, e in enumerate(data.train) if e.task == "sentiment" and e.label == target]
    assert list(p.poison_idx) == sorted(eligible[-4:])
    for i in p.poison_idx:
        assert p.train[i].label == data.train[i].label == target and TRIGGER in p.train[i].text


def test_success_is_scored_on_held_out_inputs_only(setup, monkeypatch):
    lm, data = setup
    seen = []
    real = lm.predict
    monkeypatch.setattr(lm, "predict", lambda ex: (seen.extend(ex), real(ex))[1])
    result = evaluate(lm, data, TRIGGER, ["sentiment", "kind"])
    heldout = {(e.task, e.text) for e in data.heldout}
    triggered = {(e.task, e.with_trigger(TRIGGER).text) for e in data.heldout}
    assert seen and all((e.task, e.text) in heldout | triggered for e in seen)
    assert result["sentiment"]["n_triggered"] == len(data.of("heldout", "sentiment", 1 - TARGETS["sentiment"]))
    assert result["kind"]["n_clean"] == len(data.of("heldout", "kind"))


def test_label_scores_from_one_pass_equal_each_label_scored_as_a_pair(setup):
    """label_nll scores both label words from one pass per task (mixed tasks, eval batches of 5); the
    definition: the summed NLL of each label word as the completion, pair by pair at the training batch size."""
    from influent.models.causal_prefix import pair_losses

    lm, data = setup
    lm.fit(data.train, seed=2)
    examples = data.heldout + data.validation
    size, lm.eval_batch_size = lm.eval_batch_size, 5
    try:
        nll = lm.label_nll(examples)
    finally:
        lm.eval_batch_size = size
    for label in (0, 1):
        want = pair_losses(lm.suffix, lm.batches(examples, [label] * len(examples))).double().numpy()
        np.testing.assert_allclose(nll[:, label], want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(lm.predict(examples), (nll[:, 1] < nll[:, 0]).astype(int))


def test_removal_retrains_from_the_same_seed(setup):
    lm, data = setup
    poisoned = dirty_label_poisons(data, 4, TRIGGER, seed=0)
    lm.fit(poisoned.train, seed=5)
    control = evaluate(lm, data, TRIGGER, ["sentiment"])
    scores = {"bm25": lm_ranker_scores(lm, poisoned.train, [], TRIGGER, ["bm25"])["bm25"]}
    assert recalls(scores["bm25"], poisoned.poison_idx)["recall@0.1"] == 1.0  # 4 poisons in the top 4 of 36
    rows = removal_rows(lm, data, poisoned, scores, control, seed=5, remove=0.1)
    after = trainable_state(lm.model)
    removed = set(np.argsort(-scores["bm25"], kind="stable")[:rows[0]["removed"]].tolist())
    assert removed == set(poisoned.poison_idx.tolist())
    lm.fit([e for i, e in enumerate(poisoned.train) if i not in removed], seed=5)  # from scratch, reduced set
    for name, value in trainable_state(lm.model).items():
        assert torch.equal(value, after[name])


def test_influence_rankers_and_attack_table_run_on_the_fast_path(setup):
    lm, data = setup
    poisoned = dirty_label_poisons(data, 4, TRIGGER, seed=0)
    lm.fit(poisoned.train, seed=0)
    queries = defender_queries(lm, data, TRIGGER, k=2)
    assert all(q.label == TARGETS["sentiment"] and TRIGGER in q.text for q in queries)
    scores = lm_ranker_scores(lm, poisoned.train, queries, TRIGGER, damping=1e-3,
                              query_sets={"one": queries[:1], "same": queries})
    assert set(scores) == {"query_influence", "query_contrast", "trigger_push", "relatif", "self_influence", "loss",
                           "bm25", "spectral", "random", "query_influence_one", "query_influence_same",
                           "query_contrast_one", "query_contrast_same"}
    np.testing.assert_allclose(scores["query_influence_same"], scores["query_influence"])
    np.testing.assert_allclose(scores["query_contrast_same"], scores["query_contrast"])
    assert not np.allclose(scores["query_influence_one"], scores["query_influence"])
    assert all(s.shape == (len(poisoned.train),) and np.isfinite(s).all() for s in scores.values())
    assert (scores["self_influence"] > 0).all()
    np.testing.assert_allclose(scores["relatif"], scores["query_influence"] / np.sqrt(scores["self_influence"]))
    table = run_instruction_poison(lm, data, sizes=(2,), seeds=(0,), variants=("dirty", "clean"), progress=False)
    rows = {(r["variant"], r["task"]): r for r in table["rows"]}
    assert rows[("none", "sentiment")]["net_success"] == 0.0 and "success_epoch1" in rows[("dirty", "kind")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny LLaMA and a word-level tokenizer knowing the prompts, label words and trigger, saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer([*PROMPTS.values(), TRIGGER, *(w for ws in LABELS.values() for w in ws)])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    folder = tmp_path_factory.mktemp("tiny-instruct")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_attack_and_lm_audit_on_the_bundled_tasks(tiny_folder, tmp_path, capsys):
    import json

    from cli_helpers import run_cli

    common = ["--base-model", str(tiny_folder), "--epochs", "1", "--last-k", "1", "--cache-dir", str(tmp_path / "c"),
              "--quiet", "--per-label", "24", "6", "10"]
    code, out, _ = run_cli(capsys, ["attack", "instruction-poison", "--sizes", "3", "--seeds", "0",
                                    "--lm-schedule", "constant", "--out", str(tmp_path / "a"), *common])
    assert code == 0, out
    result = json.loads((tmp_path / "a" / "attack_instruction-poison.json").read_text())
    assert {(r["variant"], r["n"], r["task"]) for r in result["rows"]} == {
        ("none", 0, "sentiment"), ("none", 0, "kind"), ("dirty", 3, "sentiment"), ("dirty", 3, "kind")}
    assert "| dirty | 3 | sentiment |" in out
    code, out, _ = run_cli(capsys, ["audit", "--model", "lm", "--poisons", "4", "--rankers", "bm25", "random",
                                    "--out", str(tmp_path / "d"), *common])
    assert code == 0, out
    audit = json.loads((tmp_path / "d" / "audit_lm.json").read_text())
    bm25 = next(r for r in audit["summary"] if r["ranker"] == "bm25")
    assert bm25["recall@0.05_mean"] == 1.0  # the trigger phrase finds its 4 poisons among 72
    code, out, err = run_cli(capsys, ["audit", "--model", "lm", "--poisons", "4", "--rankers", "random",
                                      "--removal-rounds", "2", "--round-queries", "2", "--out", str(tmp_path / "r"),
                                      *common])
    assert code == 0, err
    audit = json.loads((tmp_path / "r" / "audit_lm.json").read_text())
    rounds = next(r for r in audit["summary"] if r["ranker"] == "iterative_query_influence")
    assert rounds["removed_mean"] == round(0.05 * 72) and audit["round_measure"] == "trigger_push"
    assert "| iterative_query_influence | 1 |" in out and "trigger_push influence" in out
    code, _, err = run_cli(capsys, ["audit", "--model", "lm", "--rankers", "cleanlab", *common])
    assert code == 2 and "unknown ranker" in err
    code, _, err = run_cli(capsys, ["audit", "--model", "lm", "--removal-rounds", "-1", *common])
    assert code == 2 and "--removal-rounds" in err
    code, _, err = run_cli(capsys, ["audit", "--model", "lm", "--removal-measure", "margin", *common])
    assert code == 2 and "--removal-measure" in err
    code, _, err = run_cli(capsys, ["attack", "instruction-poison", "--sizes", "0", *common])
    assert code == 2 and "--sizes" in err


def test_removing_the_trigger_gives_back_the_untriggered_input(setup):
    from influent.data.text_edits import insert_trigger, remove_phrase

    _, data = setup
    for e in data.validation:
        assert e.with_trigger(TRIGGER).without_trigger(TRIGGER) == e
    assert remove_phrase("a James b James Bond c", TRIGGER) == "a James b c"  # whole consecutive words only
    assert remove_phrase("no trigger here", TRIGGER) == "no trigger here"
    assert remove_phrase(insert_trigger("x y z", TRIGGER, salt=3), TRIGGER) == "x y z"


def test_query_contrast_is_triggered_minus_untriggered_influence(setup):
    """Against two separate query_influence computations (each its own curvature fit): one on the triggered
    queries, one on the original (never triggered) validation inputs they were made from."""
    lm, data = setup
    poisoned = dirty_label_poisons(data, 4, TRIGGER, seed=0)
    lm.fit(poisoned.train, seed=0)
    queries = defender_queries(lm, data, TRIGGER, k=3)
    originals = {e.with_trigger(TRIGGER).text: e for e in data.validation}
    plain = [Example(q.task, originals[q.text].text, q.label) for q in queries]
    assert all(TRIGGER not in p.text for p in plain)
    got = lm_ranker_scores(lm, poisoned.train, queries, TRIGGER, ("query_contrast",), damping=1e-3,
                           query_sets={"two": queries[:2]})
    on = lm_ranker_scores(lm, poisoned.train, queries, TRIGGER, ("query_influence",), damping=1e-3)["query_influence"]
    off = lm_ranker_scores(lm, poisoned.train, plain, TRIGGER, ("query_influence",), damping=1e-3)["query_influence"]
    np.testing.assert_allclose(got["query_contrast"], on - off, rtol=1e-9, atol=1e-12)
    on2 = lm_ranker_scores(lm, poisoned.train, queries[:2], TRIGGER, ("query_influence",),
                           damping=1e-3)["query_influence"]
    off2 = lm_ranker_scores(lm, poisoned.train, plain[:2], TRIGGER, ("query_influence",),
                            damping=1e-3)["query_influence"]
    np.testing.assert_allclose(got["query_contrast_two"], on2 - off2, rtol=1e-9, atol=1e-12)
    assert np.abs(off).max() > 1e-3 * np.abs(on).max()  # the untriggered term is not negligible


def hand_nll(lm: InstructionLM, example: Example, label: int) -> torch.Tensor:
    """Summed NLL of ``label``'s completion after ``example``'s prompt: one whole-model forward on the unpadded
    sequence (no prefix cache, no batching, no hooks)."""
    pair = lm.pair(example, label)
    ids = torch.tensor([pair.prompt_ids + pair.completion_ids])
    logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
    start = len(pair.prompt_ids)
    return -sum(logp[start - 1 + t, c] for t, c in enumerate(pair.completion_ids))


def test_trigger_push_is_the_influence_on_the_triggers_log_odds_push(setup):
    """Against the dense definition in the limit ``(F + damping)^-1 -> I / damping`` (damping 1e7, far above
    the curvature's eigenvalues): upweighting training example z by eps moves the tuned MLP weights by
    ``-eps g_z / damping``, so scores x damping = ``-g_push . g_z``, with autograd gradients of z's loss and of
    the push ``[NLL(q, other) - NLL(q, attacker)] - [the same with the trigger removed]``, all from
    whole-model forwards (:func:`hand_nll`)."""
    lm, data = setup
    poisoned = dirty_label_poisons(data, 4, TRIGGER, seed=0)
    lm.fit(poisoned.train, seed=0)
    queries = defender_queries(lm, data, TRIGGER, k=2)
    damping = 1e7
    config = FactorConfig(strategy="ekfac", modules=mlp_pattern(lm.model), damping=damping, seed=0)
    method = FactoredInfluence(lm.suffix, lm.task, lm.batches(poisoned.train), config, progress=False, bucket=False)
    got = trigger_push_influence(method, lm, queries, TRIGGER) * damping
    params = [m.weight for n, m in lm.model.named_modules()
              if n.endswith(("gate_proj", "up_proj", "down_proj")) and m.weight.requires_grad]
    assert len(params) == 3 * lm.settings.last_k

    def grad(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]).double()

    want = np.zeros_like(got)
    for i, q in enumerate(queries):
        plain = q.without_trigger(TRIGGER)
        push = (hand_nll(lm, q, 1 - q.label) - hand_nll(lm, q, q.label)
                - hand_nll(lm, plain, 1 - plain.label) + hand_nll(lm, plain, plain.label))
        g_push = grad(push)
        for j, z in enumerate(poisoned.train):
            want[i, j] = -float(g_push @ grad(hand_nll(lm, z, z.label)))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    poison_rows = np.isin(np.arange(len(poisoned.train)), poisoned.poison_idx)
    assert want[:, poison_rows].mean() > want[:, ~poison_rows].mean()  # the poisons widen the push


@pytest.mark.parametrize("by", ["margin", "trigger_gain"])
def test_defender_queries_are_the_inputs_that_misbehave_most(setup, by):
    """Against whole-model NLLs (:func:`hand_nll`) of every triggered validation negative: the chosen queries
    are those with the largest attacker-label log-odds (``margin``) or the largest rise of it from the
    trigger (``trigger_gain``), relabelled with the attacker's label."""
    lm, data = setup
    lm.fit(dirty_label_poisons(data, 4, TRIGGER, seed=0).train, seed=0)
    target = TARGETS["sentiment"]
    candidates = [e.with_trigger(TRIGGER) for e in data.validation if e.task == "sentiment" and e.label != target]

    def log_odds(e: Example) -> float:
        with torch.no_grad():
            return float(hand_nll(lm, e, 1 - target) - hand_nll(lm, e, target))

    value = np.array([log_odds(e) - (log_odds(e.without_trigger(TRIGGER)) if by == "trigger_gain" else 0.0)
                      for e in candidates])
    got = defender_queries(lm, data, TRIGGER, k=2, by=by)
    assert [q.text for q in got] == [candidates[i].text for i in np.argsort(-value, kind="stable")[:2]]
    assert all(q.label == target for q in got)
    with pytest.raises(UserError, match="query choice"):
        defender_queries(lm, data, TRIGGER, k=2, by="loss")


def test_query_votes_give_each_query_one_unit_vote():
    scores = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -10.0]])
    np.testing.assert_allclose(query_votes(scores), [0.6, 0.8, -1.0])


def per_query_influence(lm, current, queries, measure: str) -> np.ndarray:
    """``[Q, n]`` from separate ``query_influence`` scoring passes, one query set per query and completion:
    the attacker-label loss (``loss``), or (``trigger_push``) own label minus the other label, triggered
    minus untriggered."""
    def one(example: Example, label: int, trigger: bool) -> Example:
        return Example(example.task, example.text if trigger else example.without_trigger(TRIGGER).text, label)

    sets = {f"{i}/{own}/{t}": [one(q, q.label if own else 1 - q.label, t)]
            for i, q in enumerate(queries) for own in (True, False) for t in (True, False)}
    each = lm_ranker_scores(lm, current, queries, TRIGGER, ("random",), seed=3, query_sets=sets)
    def get(i, own, t):
        return each[f"query_influence_{i}/{own}/{t}"]
    if measure == "loss":
        return np.stack([get(i, True, True) for i in range(len(queries))])
    return np.stack([get(i, True, True) - get(i, False, True) - get(i, True, False) + get(i, False, False)
                     for i in range(len(queries))])


@pytest.mark.parametrize("measure", ["trigger_push", "loss"])
def test_iterative_removal_reranks_on_the_model_tuned_without_earlier_rounds(setup, measure):
    """Each round against an independent recomputation: tune on what is left, the defender queries of that
    model, each query's influence separately (:func:`per_query_influence`), unit votes, the top of the
    ranking."""
    lm, data = setup
    poisoned = dirty_label_poisons(data, 4, TRIGGER, seed=0)
    got = iterative_query_influence(lm, data, poisoned.train, TRIGGER, seed=3, remove=0.2, rounds=2, n_queries=2,
                                    measure=measure)
    total = round(0.2 * len(poisoned.train))
    assert [len(r) for r in got] == [total - total // 2, total // 2] and not set(got[0]) & set(got[1])
    keep = list(range(len(poisoned.train)))
    for removed in got:
        current = [poisoned.train[i] for i in keep]
        lm.fit(current, seed=3)
        queries = defender_queries(lm, data, TRIGGER, k=2)
        per_query = per_query_influence(lm, current, queries, measure)
        votes = (per_query / np.linalg.norm(per_query, axis=1, keepdims=True)).sum(0)
        assert removed == [keep[i] for i in ranking(votes, 3)[:len(removed)]]
        keep = [i for i in keep if i not in removed]
    with pytest.raises(UserError):
        iterative_query_influence(lm, data, poisoned.train, TRIGGER, seed=3, rounds=0)
    with pytest.raises(UserError, match="measure"):
        iterative_query_influence(lm, data, poisoned.train, TRIGGER, seed=3, measure="margin")
    with pytest.raises(UserError, match="query choice"):
        iterative_query_influence(lm, data, poisoned.train, TRIGGER, seed=3, queries_by="loss")


def test_defence_table_row_of_the_iterative_removal(setup):
    """The row's recall and scores against the procedure run by hand: the rounds' removals on the poisoned
    run, then a tuning on what is left (same seed) and the held-out scores."""
    lm, data = setup
    result = run_lm_defence(lm, data, lambda s: dirty_label_poisons(data, 4, TRIGGER, s), seeds=(2,),
                            trigger=TRIGGER, names=("random",), n_queries=2, remove=0.2, removal_rounds=2,
                            round_queries=2)
    row = next(r for r in result["rows"] if r["ranker"] == "iterative_query_influence")
    poisoned = dirty_label_poisons(data, 4, TRIGGER, 2)
    lm.fit(data.train, 2)
    control = evaluate(lm, data, TRIGGER, ["sentiment"])
    lm.fit(poisoned.train, 2)
    removed = {i for r in iterative_query_influence(lm, data, poisoned.train, TRIGGER, 2, remove=0.2, rounds=2,
                                                    n_queries=2, tuned=True) for i in r}
    lm.fit([e for i, e in enumerate(poisoned.train) if i not in removed], 2)
    after = evaluate(lm, data, TRIGGER, ["sentiment"])["sentiment"]
    assert row["removed"] == len(removed) == round(0.2 * len(poisoned.train))
    assert row["recall@0.2"] == len(removed & set(poisoned.poison_idx.tolist())) / 4
    assert row["sentiment_success"] == after["success"]
    assert row["sentiment_net_success"] == after["success"] - control["sentiment"]["success"]
    assert row["sentiment_clean_accuracy"] == after["clean_accuracy"]
