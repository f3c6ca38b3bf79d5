"""Attacks on the head, on synthetic features and a toy bag-of-words 'encoder' (fast, no MiniLM)."""

import numpy as np
import pytest
import torch

from influent.attacks.experiment import HeadExperiment, synthetic_experiment
from influent.attacks.label_flip import (
    baseline_flips,
    flip_gains,
    flip_labels,
    greedy_flips,
    targeted_attack,
    untargeted_attack,
)
from influent.attacks.perturb import perturb_target
from influent.attacks.summary import summarise
from influent.attacks.trigger import insert_trigger, make_trigger_poison, trigger_attack
from influent.models.head import accuracy, per_example_loss, train_head
from influent.models.refit import fit_head


@pytest.mark.parametrize("classes", [2, 3])
def test_fast_refit_reaches_the_same_optimum_as_train_head(classes):
    exp = synthetic_experiment(n=200, d=5, num_classes=classes)
    fast, _ = fit_head(exp.train_x, exp.train_y, classes, 1e-2)
    ref, _, _ = train_head(exp.train_x, exp.train_y, classes, 1e-2)
    assert torch.allclose(fast.linear.weight, ref.linear.weight, atol=1e-8)
    assert torch.allclose(fast.linear.bias, ref.linear.bias, atol=1e-8)
    w = torch.ones(200, dtype=torch.float64)
    w[:10] = 0
    weighted, _ = fit_head(exp.train_x, exp.train_y, classes, 1e-2, weights=w)
    # zero weight == removal, with the mean still over n: objective differs only by a constant factor
    dropped, _ = fit_head(exp.train_x[10:], exp.train_y[10:], classes, 1e-2 * 200 / 190)
    assert torch.allclose(weighted.linear.weight, dropped.linear.weight, atol=1e-7)


def test_flip_gain_predicts_the_retrained_change_of_the_objective():
    exp = synthetic_experiment(n=300, d=5, noise=1.0)
    model = exp.fit()
    gains = flip_gains(model, exp.l2, exp.train_x, exp.train_y, 2, exp.val_x, exp.val_y)
    base = float(per_example_loss(model, exp.val_x, exp.val_y).mean())
    idx = np.argsort(-gains.gain)[:5].tolist() + np.argsort(gains.gain)[:5].tolist() + list(range(5))
    actual = []
    for i in idx:
        y = flip_labels(exp.train_y, np.array([i]), 2)
        m = exp.fit(exp.train_x, y, init=model)
        actual.append(float(per_example_loss(m, exp.val_x, exp.val_y).mean()) - base)
    pred = gains.gain[idx]
    assert np.corrcoef(pred, actual)[0, 1] > 0.95
    assert np.all(np.sign(pred[:5]) == np.sign(np.array(actual[:5])))


def test_greedy_budgets_are_nested_and_exact():
    exp = synthetic_experiment(n=300, d=5)
    out = greedy_flips(exp, [3, 9], exp.val_x, exp.val_y, rounds_per_budget=2)
    assert sorted(out) == [3, 9]
    assert len(out[3][0]) == 3 and len(out[9][0]) == 9
    assert set(out[3][0]) <= set(out[9][0])
    assert int((out[9][1] != exp.train_y).sum()) == 9


def test_influence_flips_beat_random_and_max_loss_on_clean_heldout_data():
    exp = synthetic_experiment(n=600, d=8, noise=0.7, seed=1)
    # objective = validation loss: the clean held-out loss rises more than under either baseline
    rows = untargeted_attack(exp, budgets=(0.02, 0.05), objective="loss")
    by = {(r["strategy"], r["budget"]): r for r in rows}
    for b in (0.02, 0.05):
        assert by[("influence", b)]["clean_loss"] > by[("random", b)]["clean_loss"]
        assert by[("influence", b)]["clean_loss"] > by[("max_loss", b)]["clean_loss"]
    # objective = loss of correctly classified validation reviews: aimed at accuracy
    rows = untargeted_attack(exp, budgets=(0.05,), objective="correct")
    by = {(r["strategy"], r["budget"]): r for r in rows}
    assert by[("influence", 0.05)]["clean_accuracy"] <= by[("random", 0.05)]["clean_accuracy"]
    assert by[("influence", 0.05)]["clean_loss"] > by[("random", 0.05)]["clean_loss"]
    with pytest.raises(ValueError):
        untargeted_attack(exp, budgets=(0.01,), objective="nope")
    summary = summarise(rows, ["strategy", "budget"], ["clean_accuracy"])
    assert all(r["runs"] == 1 for r in summary)


def test_targeted_flips_move_the_target_more_than_baselines():
    exp = synthetic_experiment(n=500, d=6, noise=0.8, seed=2)
    rows = targeted_attack(exp, n_targets=3, budgets=(0.02,))
    p = {
        s: np.mean([r["target_prob_true"] for r in rows if r["strategy"] == s])
        for s in ("influence", "random", "max_loss", "nearest")
    }
    assert p["influence"] < min(p["random"], p["max_loss"], p["nearest"])
    assert np.mean([r["flipped"] for r in rows if r["strategy"] == "influence"]) >= np.mean(
        [r["flipped"] for r in rows if r["strategy"] == "random"]
    )


def test_baseline_flips():
    exp = synthetic_experiment(n=200, d=4)
    model = exp.fit()
    assert len(set(baseline_flips(exp, "random", 10, 0))) == 10
    ml = baseline_flips(exp, "max_loss", 10, 0, model=model)
    alt_loss = per_example_loss(model, exp.train_x, (exp.train_y + 1) % 2)
    assert float(alt_loss[ml].min()) >= float(alt_loss.sort(descending=True).values[9]) - 1e-12
    near = baseline_flips(exp, "nearest", 5, 0, exp.eval_x[0], exp.eval_y[0])
    assert (exp.train_y[near] == exp.eval_y[0]).all()
    with pytest.raises(ValueError):
        baseline_flips(exp, "nope", 1, 0)


def test_perturbation_raises_the_target_loss_within_budget():
    exp = synthetic_experiment(n=200, d=5, noise=1.0, seed=3)
    clean = exp.fit()
    probs = clean.probabilities(exp.eval_x).detach()
    conf = probs[torch.arange(len(exp.eval_y)), exp.eval_y]
    t = int(torch.argmin(torch.where(conf > 0.5, conf, torch.ones_like(conf))))  # least confident correct one
    before = float(conf[t])
    r1 = perturb_target(exp, t, k=1, eps=1.0, steps=2, clean=clean)
    r5 = perturb_target(exp, t, k=5, eps=1.0, steps=2, clean=clean)
    assert r1["target_prob_true"] < before
    assert r5["target_prob_true"] < r1["target_prob_true"]
    assert len(r5["poisons"]) == 5


# --- toy text world ---------------------------------------------------------------------------------------
POS = [f"good{i}" for i in range(20)]
NEG = [f"bad{i}" for i in range(20)]
NEUTRAL = [f"w{i}" for i in range(60)]


def toy_text_experiment(n=800, seed=0, d=24):
    rng = np.random.default_rng(seed)
    vocab = POS + NEG + NEUTRAL + ["zq", "xv"]
    vec = {w: torch.as_tensor(rng.normal(size=d)) for w in vocab}

    def embed(texts):
        return torch.stack(
            [torch.stack([vec.get(w, torch.zeros(d)) for w in t.split()]).mean(0) for t in texts]
        ).double()

    def review(label):
        words = (
            list(rng.choice(POS if label else NEG, 3))
            + list(rng.choice(POS + NEG, 1))
            + list(rng.choice(NEUTRAL, 4))
        )
        rng.shuffle(words)
        return " ".join(words)

    total = n + 600
    labels = rng.integers(0, 2, total)
    texts = [review(int(y)) for y in labels]
    x = embed(texts)
    y = torch.as_tensor(labels)
    return HeadExperiment(
        x[:n],
        y[:n],
        x[n : n + 300],
        y[n : n + 300],
        x[n + 300 :],
        y[n + 300 :],
        2,
        1e-3,
        seed,
        texts[:n],
        texts[n : n + 300],
        texts[n + 300 :],
        embed,
        ["rotten", "fresh"],
    )


def test_insert_trigger_is_deterministic_and_contains_the_phrase():
    a = insert_trigger("one two three", "james bond")
    assert a == insert_trigger("one two three", "james bond")
    assert "james bond" in a and len(a.split()) == 5


def test_trigger_poisons_work_and_are_scored_net_of_control():
    exp = toy_text_experiment()
    rows = trigger_attack(exp, sizes=(0, 40), trigger="zq zq zq", n_eval=200)
    assert rows[0]["net_success"] == pytest.approx(0.0)
    assert rows[1]["net_success"] > 0.15
    assert rows[1]["n_triggered_eval"] >= 100
    poison = make_trigger_poison(exp, 40, "zq zq zq")
    assert (poison.train_y[poison.poison_idx] == poison.target).all()
    assert (exp.train_y[poison.poison_idx] == poison.source).all()
    assert all("zq" not in exp.train_texts[i] for i in poison.poison_idx)
    assert accuracy(exp.fit(), exp.eval_x, exp.eval_y) > 0.8


def test_class_mistakes_are_user_errors_naming_the_option():
    from influent.attacks.trigger import resolve_classes
    from influent.errors import UserError

    exp = toy_text_experiment()
    assert resolve_classes(exp, "rotten", "fresh") == (0, 1) and resolve_classes(exp, None, None) == (0, 1)
    with pytest.raises(UserError, match="unknown class 'meh'") as err:
        resolve_classes(exp, "meh", None)
    assert err.value.field == "source"
    with pytest.raises(UserError, match="must differ") as err:
        resolve_classes(exp, "fresh", "1")
    assert err.value.field == "target"
    with pytest.raises(UserError) as err:
        make_trigger_poison(exp, 10_000, "zq")
    assert err.value.field == "sizes"
