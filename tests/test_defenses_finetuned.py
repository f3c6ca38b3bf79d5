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
    assert out["rankers"]["loss"]["auroc"] > 0.6
