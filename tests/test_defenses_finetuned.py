"""The mislabel audit on the fine-tuned classifier, on a tiny BERT built in code."""

import numpy as np


def test_finetuned_mislabel_experiment_on_a_tiny_bert(tmp_path):
    from test_finetuned import tiny_encoder, toy_data

    from influent.defenses.finetuned_mislabel import finetuned_mislabel_experiment

    texts, labels = toy_data(120, 0)
    ev_texts, ev_labels = toy_data(40, 1)
    out = finetuned_mislabel_experiment(
        texts,
        np.asarray(labels),
        ev_texts,
        np.asarray(ev_labels),
        encoder=tiny_encoder(tmp_path),
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
    for row in out["rankers"].values():
        assert 0.0 <= row["auroc"] <= 1.0 and "recall@10%" in row
        # the labels fixed are exactly the flips found in the top 10%, and the refit is scored
        assert row["fixed"] == round(row["recall@10%"] * out["n_flipped"])
        assert 0.0 <= row["accuracy_after_fix"] <= 1.0
    assert 0.0 <= out["accuracy_noisy_model"] <= 1.0 and 0.0 <= out["accuracy_clean_model"] <= 1.0
    assert out["rankers"]["loss"]["auroc"] > 0.6
