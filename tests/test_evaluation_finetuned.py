"""validate on a fine-tuned (tiny, in-code) BERT: factored scores vs replayed retraining and PBRF; frozen-prefix cache."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_classifier(tiny_encoder_dir):
    """A 2-layer tiny BERT classifier (last layer trainable) and 24 tokenized synthetic reviews."""
    from conftest import make_reviews
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from influent.models.finetuned import freeze_all_but_last, make_batches

    rows = make_reviews(24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    (batch,) = make_batches(
        tokenizer, [r[0] for r in rows], [int(r[1] == "pos") for r in rows], batch_size=24, max_length=16
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder_dir, num_labels=2, attn_implementation="eager"
    )
    freeze_all_but_last(model, 1)
    return model.eval(), batch


def _trainer(model, task, dropout):
    from influent.gradients import ParameterSpace
    from influent.models.training import MinibatchTrainer

    theta0 = ParameterSpace(model, task).flat()
    return MinibatchTrainer(
        model, task, theta0, epochs=2, lr=1e-3, batch_size=8, optimizer="adamw", dropout=dropout, seed=0
    )


@pytest.mark.parametrize("dropout", [False, True])
def test_retraining_on_cached_hidden_states_matches_the_full_model(tiny_classifier, dropout):
    import copy

    from influent.models.finetuned import FinetunedTask
    from influent.models.frozen_prefix import (
        CachedPrefixTask,
        cache_hidden_states,
        disable_prefix_dropout,
        first_token_model,
        split_frozen_prefix,
    )

    model, batch = tiny_classifier
    full = copy.deepcopy(model)
    disable_prefix_dropout(full, 1)  # the cached prefix runs without dropout
    suffix = split_frozen_prefix(model, 1)
    cached = cache_hidden_states(model, batch, 1)
    assert cached["inputs_embeds"].shape[:2] == batch["input_ids"].shape
    task_full, task_cached = FinetunedTask(), CachedPrefixTask()
    with torch.no_grad():
        torch.testing.assert_close(
            task_cached.model_output(suffix, cached), task_full.model_output(full, batch), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            task_cached.model_output(first_token_model(suffix), cached),
            task_full.model_output(full, batch),
            rtol=0,
            atol=1e-6,
        )
    keep = torch.tensor([i for i in range(24) if i != 5])
    t_full, t_cached = _trainer(full, task_full, dropout), _trainer(suffix, task_cached, dropout)
    torch.testing.assert_close(t_cached.init_theta, t_full.init_theta, rtol=0, atol=0)
    theta_full, _ = t_full.fit(batch, keep, t_full.init_theta)
    theta_cached, _ = t_cached.fit(cached, keep, t_cached.init_theta)
    assert (theta_full - t_full.init_theta).norm() > 1e-2  # it trained
    torch.testing.assert_close(theta_cached, theta_full, rtol=1e-5, atol=1e-6)
    if not dropout:  # first-token retraining: same function, so same parameters (dropout draws differ)
        ft = first_token_model(suffix)
        t_ft = _trainer(ft, task_cached, dropout)
        theta_ft, _ = t_ft.fit(cached, keep, t_ft.init_theta)
        torch.testing.assert_close(theta_ft, theta_full, rtol=1e-4, atol=1e-5)


def test_validate_finetuned_runs_end_to_end_on_a_tiny_bert(tiny_encoder_dir, reviews_csv, tmp_path):
    from influent.evaluation.validate import run_validate
    from influent.report.fidelity import write_validation

    result = run_validate(
        "finetuned",
        strategies=("identity", "ekfac"),
        examples=3,
        subsets=10,
        queries=2,
        epochs=1,
        fine_tune_last=1,
        train_size=24,
        seed=0,
        data=str(reviews_csv),
        text_column="review",
        label_column="sentiment",
        encoder=str(tiny_encoder_dir),
        lr=1e-3,
        batch_size=8,
        max_length=16,
        pbrf_epochs=1,
        pbrf_lr=0.05,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert set(result["estimates"]) == {"identity", "ekfac"}
    assert "cached hidden states" in result["settings"]["frozen_prefix"]
    for truth in ("loo_cold", "loo_warm", "pbrf"):
        arr = np.asarray(result["ground_truth"][truth])
        assert arr.shape == (3, 2) and np.isfinite(arr).all()
    assert np.isfinite(result["estimates"]["ekfac"]["lds"])
    write_validation(result, tmp_path / "out")
    assert (tmp_path / "out" / "validate.md").exists() and (tmp_path / "out" / "scatter-pbrf.png").exists()
