"""One fidelity evaluation for every model: the head and a tiny fine-tuned BERT go through the same function.

Independent truths: the head's leave-one-out changes are recomputed here by training a fresh head on the data
without the example (``train_head``'s own Newton loop, not the retraining code under test) and the
fine-tuned model's by replaying its fine-tuning without the example; the estimates are recomputed from the
influence methods directly.
"""

import numpy as np
import torch

from influent.evaluation.fidelity import evaluate_fidelity
from influent.evaluation.finetuned import FinetunedFidelity, build_finetuned_classifier, fidelity_rows
from influent.evaluation.validate import HeadFidelity
from influent.factored_influence import FactoredInfluence
from influent.influence import ExactInfluence
from influent.models.head import train_head
from influent.report.fidelity import write_validation

SCHEMA = {"model", "settings", "estimates", "ground_truth", "examples", "estimated_change", "gap", "seconds"}


def _head_result(tmp_path):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(120, 4, generator=gen, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.5 * torch.randn(120, generator=gen,
         dtype=torch.float64) > 0).long()
    model, task, _ = train_head(x, y, 2, l2=1e-2)
    queries = (x[:3] * 1.2 + 0.1, y[:3])
    subject = HeadFidelity(model, task, (x, y), queries, solvers=("exact", "cg"), progress=False)
    result = write_validation(evaluate_fidelity(subject, examples=6, subsets=0, seed=1), tmp_path / "head")
    return result, (x, y, queries, model, task)


def _finetuned_result(tiny_encoder_dir, reviews_csv, tmp_path):
    from influent.data import load_corpus, load_or_make_split

    corpus = load_corpus(str(reviews_csv), text_column="review", label_column="sentiment")
    split = load_or_make_split(corpus, tmp_path / "cache", seed=0)
    labels = np.asarray(corpus.labels)
    rows = fidelity_rows(labels, split, train_size=20, queries=2, heldout=5, seed=0)
    clf = build_finetuned_classifier(
        corpus, labels, rows, encoder=str(tiny_encoder_dir), fine_tune_last=1, seed=0, epochs=1, lr=1e-3,
        batch_size=8, max_length=16, frozen_prefix=True, first_token=True, cache=tmp_path / "cache",
    )
    subject = FinetunedFidelity(
        clf, strategies=("identity", "ekfac"), damping=None, seed=0, pbrf_epochs=1, pbrf_lr=0.05,
        cache=tmp_path / "cache", progress=False,
    )
    return write_validation(evaluate_fidelity(subject, examples=3, subsets=0, seed=0), tmp_path / "ft"), clf


def test_head_and_finetuned_model_go_through_the_same_evaluation(tiny_encoder_dir, reviews_csv, tmp_path):
    head, (x, y, queries, model, task) = _head_result(tmp_path)
    ft, clf = _finetuned_result(tiny_encoder_dir, reviews_csv, tmp_path)
    # one schema, one set of ground truths and one report for both
    assert SCHEMA <= set(head) and SCHEMA <= set(ft) and head["model"] == "head" and ft["model"] == "finetuned"
    for result, folder in ((head, "head"), (ft, "ft")):
        assert set(result["ground_truth"]) == {"loo_cold", "loo_warm", "pbrf"}
        assert all(set(row["vs"]) == set(result["ground_truth"]) for row in result["estimates"].values())
        assert (tmp_path / folder / "validate.md").read_text().startswith(f"# influent validate: {result['model']}")
        assert sorted(p.name for p in (tmp_path / folder).glob("scatter-*.png")) == sorted(result["plots"])

    # head: cold leave-one-out equals a fresh head trained without the example; exact influence predicts it
    base = task.per_example_loss(model, queries)
    idx = head["examples"]["indices"]
    for row, i in zip(head["ground_truth"]["loo_cold"], idx):
        keep = torch.tensor([j for j in range(len(y)) if j != i])
        m_i, t_i, _ = train_head(x[keep], y[keep], 2, l2=1e-2)
        with torch.no_grad():
            truth = (t_i.per_example_loss(m_i, queries) - base).numpy()
        np.testing.assert_allclose(row, truth, rtol=1e-6, atol=1e-10)
    exact = ExactInfluence(model, task, (x, y))
    np.testing.assert_allclose(
        head["estimated_change"]["exact"], exact.loss_change(exact.pairwise_scores(queries)).numpy()[:, idx].T,
        rtol=1e-10, atol=1e-15,
    )
    assert head["estimates"]["exact (damping 0)"]["vs"]["loo_cold"]["pearson_per_query"] >= 0.99

    # fine-tuned: cold leave-one-out equals the fine-tuning replayed without the example, against the full replay
    trainer, task_ft, n = clf.trainer, clf.task, clf.n_train
    from influent.gradients import ParameterSpace

    space = ParameterSpace(clf.fit_model, task_ft)

    def query_loss(theta):
        return space.loss_values(clf.query_batch, theta, "measure").detach().numpy()

    full, _ = trainer.fit(clf.train_batch, torch.arange(n), trainer.init_theta)
    for row, i in zip(ft["ground_truth"]["loo_cold"], ft["examples"]["indices"]):
        theta_i, _ = trainer.fit(clf.train_batch, torch.tensor([j for j in range(n) if j != i]), trainer.init_theta)
        np.testing.assert_allclose(row, query_loss(theta_i) - query_loss(full), rtol=1e-5, atol=1e-7)
    # its estimates are the factored method's own loss changes at the chosen examples
    from influent.curvature.config import FactorConfig
    from influent.evaluation.finetuned import trainable_module_regex
    from influent.task import iter_chunks

    chunks = [c for _, c in iter_chunks(clf.train_batch, n, 64)]
    method = FactoredInfluence(clf.model, task_ft, chunks, FactorConfig(strategy="ekfac",
                               modules=trainable_module_regex(clf.model), seed=0), progress=False)
    expected = method.loss_change(method.pairwise_scores(clf.query_batch)).numpy()[:, ft["examples"]["indices"]].T
    np.testing.assert_allclose(ft["estimated_change"]["ekfac"], expected, rtol=1e-6, atol=1e-12)
    assert ft["settings"]["n_train"] == n == 20

