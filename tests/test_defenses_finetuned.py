"""The mislabel audit on the fine-tuned classifier, on a tiny BERT built in code: the shared rankers against
autograd and a planted mislabel, and the experiment against its own seeded retraining."""

import numpy as np
import pytest
import torch

from influent.defenses.inputs import SuffixBaselines, factored_audit_inputs
from influent.defenses.rankers import score_all


def _victim(tmp_path, n=48, flip=None):
    from test_finetuned import tiny_encoder, toy_data

    from influent.models.suffix_classifier import SuffixClassifier

    texts, labels = toy_data(n, 0)
    if flip is not None:
        labels[flip] = 1 - labels[flip]
    clf = SuffixClassifier(tiny_encoder(tmp_path), 2, last_k=1, seed=0, epochs=20, lr=3e-3, batch_size=16,
                           max_length=16)
    batch = clf.cache(texts, labels)
    theta, _ = clf.fit(batch)
    return clf, batch, theta


def _chunks(batch, size=16):
    from influent.task import iter_chunks

    return [c for _, c in iter_chunks(batch, int(batch["labels"].shape[0]), size)]


def test_finetuned_tracin_and_loss_rankers_equal_autograd(tmp_path):
    from influent.task import slice_batch

    clf, batch, theta = _victim(tmp_path)
    suffix = clf.load_suffix(theta)
    inputs = factored_audit_inputs(suffix, clf.task, _chunks(batch), seed=0)
    scores = score_all(inputs, ["tracin_self", "loss", "self_influence", "loo_loss"])
    params = [p for m in suffix.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
              for p in (m.weight, m.bias)]
    sq_norms, losses = [], []
    for i in range(int(batch["labels"].shape[0])):
        row = slice_batch(batch, torch.tensor([i]))
        loss = clf.task.per_example_loss(suffix, row).sum()
        grads = torch.autograd.grad(loss, params)
        sq_norms.append(sum(float(g.double().pow(2).sum()) for g in grads))
        losses.append(float(loss.detach()))
    # identity curvature with damping 1: g^T (I + 1 I)^-1 g = ||g||^2 / 2
    np.testing.assert_allclose(scores["tracin_self"], np.array(sq_norms) / 2, rtol=1e-4)
    np.testing.assert_allclose(scores["loss"], losses, rtol=1e-5, atol=1e-7)
    n = len(losses)
    np.testing.assert_allclose(scores["loo_loss"], scores["loss"] + scores["self_influence"] / n, rtol=1e-12)


def test_finetuned_rankers_put_a_planted_mislabel_first(tmp_path):
    flip = 5
    clf, batch, theta = _victim(tmp_path, flip=flip)
    inputs = factored_audit_inputs(
        clf.load_suffix(theta), clf.task, _chunks(batch), SuffixBaselines(clf, batch, 2, folds=3, seed=0), seed=0
    )
    scores = score_all(inputs, ["loss", "loss_oof", "self_influence", "loo_loss", "tracin_self"])
    for name, s in scores.items():
        assert int(np.argmax(s)) == flip, name


def test_finetuned_mislabel_experiment_on_a_tiny_bert(tmp_path):
    from test_finetuned import tiny_encoder, toy_data

    from influent.defenses.evaluate import random_label_noise
    from influent.defenses.finetuned_mislabel import finetuned_mislabel_experiment
    from influent.models.suffix_classifier import SuffixClassifier

    texts, labels = toy_data(120, 0)
    ev_texts, ev_labels = toy_data(40, 1)
    enc = tiny_encoder(tmp_path)
    out = finetuned_mislabel_experiment(
        texts,
        np.asarray(labels),
        ev_texts,
        np.asarray(ev_labels),
        encoder=enc,
        last_k=1,
        epochs=3,
        lr=3e-3,
        folds=2,
        max_length=16,
    )
    assert out["n_flipped"] == 12
    assert set(out["rankers"]) == {
        "random",
        "loss",
        "loss_oof",
        "cleanlab",
        "self_influence",
        "loo_loss",
        "tracin_self",
    }
    # the clean and noisy accuracies are those of the same seeded fine-tuning replayed here
    clf = SuffixClassifier(enc, 2, last_k=1, seed=0, epochs=3, lr=3e-3, max_length=16)
    noisy, _ = random_label_noise(torch.as_tensor(labels), 0.10, 2, 0)
    eval_batch = clf.cache(ev_texts, list(ev_labels))
    assert out["accuracy_clean_model"] == pytest.approx(clf.accuracy(clf.fit(clf.cache(texts, labels))[0], eval_batch))
    assert out["accuracy_noisy_model"] == pytest.approx(
        clf.accuracy(clf.fit(clf.cache(texts, noisy.tolist()))[0], eval_batch)
    )
    for row in out["rankers"].values():
        assert "recall@10%" in row
        # the labels fixed are exactly the flips found in the top 10%
        assert row["fixed"] == round(row["recall@10%"] * out["n_flipped"])
    assert out["rankers"]["loss"]["auroc"] > 0.6
