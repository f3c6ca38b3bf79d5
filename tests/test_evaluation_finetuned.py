"""validate on a fine-tuned (tiny, in-code) BERT: factored scores vs replayed retraining and PBRF."""

import numpy as np


def test_validate_finetuned_runs_end_to_end_on_a_tiny_bert(tiny_encoder_dir, reviews_csv, tmp_path):
    from influent.evaluation.validate import run_validate

    result = run_validate(
        "finetuned",
        strategies=("identity", "ekfac"),
        examples=3,
        subsets=10,
        queries=2,
        epochs=1,
        fine_tune_last=1,
        train_size=24,
        out=tmp_path / "out",
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
    for truth in ("loo_cold", "loo_warm", "pbrf"):
        arr = np.asarray(result["ground_truth"][truth])
        assert arr.shape == (3, 2) and np.isfinite(arr).all()
    assert np.isfinite(result["estimates"]["ekfac"]["lds"])
    assert (tmp_path / "out" / "validate.md").exists() and (tmp_path / "out" / "scatter-pbrf.png").exists()
