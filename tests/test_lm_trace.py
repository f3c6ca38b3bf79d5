"""Causal-LM tracing on tiny LLaMA- and GPT-2-config models built in code.

Independent truths: the loss by hand from the logits; per-example gradients by autograd on one unpadded
sequence at a time (no hooks, no masking); the dense identity and EK-FAC matrices formed explicitly from
those gradients and solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_fixtures import (
    FACTS,
    dense_ekfac_inverse,
    dense_gradients,
    hand_loss,
    mlp_modules,
    tiny_lm_folder,
    tiny_tokenizer,
)

from influent.cli import main
from influent.data.lm_text import lm_batches, pair_ids, pair_sequence, read_documents, tokenize_documents
from influent.factored_influence import FactorConfig, FactoredInfluence
from influent.models.causal_lm import CausalLMTask, load_causal_lm, mlp_pattern
from influent.retrieval import CandidateFilter
from influent.token_influence import token_scores


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    folder = tiny_lm_folder(tmp_path_factory.mktemp(request.param), request.param)
    model, tokenizer = load_causal_lm(str(folder))
    return request.param, folder, model.double(), tokenizer


def training_sequences(tokenizer):
    docs = [(f, None) for f in FACTS[:6]] + [("the capital of italy", "is rome"), ("the cat", "sat on the mat")]
    return tokenize_documents(tokenizer, docs, max_length=8)


def test_loss_counts_only_completion_tokens(lm):
    _, _, model, tokenizer = lm
    prompt, completion = pair_ids(tokenizer, "where is the capital of france", "paris")
    query = pair_sequence(prompt, completion, tokenizer)
    other = pair_sequence(*pair_ids(tokenizer, "the dog", "ran to the big old sea and the river"), tokenizer)
    batch = lm_batches([query, other], 2, tokenizer.pad_token_id)[0]  # the query is padded in this batch
    got = CausalLMTask().per_example_loss(model, batch)[0]
    ids = list(query.input_ids)
    completion_positions = list(range(len(prompt), len(ids)))
    assert float(got.detach()) == pytest.approx(float(hand_loss(model, ids, completion_positions).detach()), rel=1e-9)
    every_position = float(hand_loss(model, ids, list(range(1, len(ids)))).detach())
    assert abs(float(got) - every_position) > 1e-3  # prompt positions are not counted


def test_head_at_targets_only_matches_full_logits_and_yields_to_a_tracked_head(lm):
    """The loss with the head at target positions only (plain_head) equals the full-logit loss, gradients
    included; with the head tracked (modules "all") the full logits are used and the head's per-example
    gradients equal autograd on one unpadded sequence."""
    from influent.curvature.linear_grads import LinearCapture, per_example_linear_grads, select_linear_modules
    from influent.models.causal_lm import plain_head

    _, _, model, tokenizer = lm
    seqs = training_sequences(tokenizer)
    batch = lm_batches(seqs[:4], 4, tokenizer.pad_token_id)[0]
    task = CausalLMTask()
    assert plain_head(model) is model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    fast = task.per_example_loss(model, batch)
    full = task.output_loss(task.model_output(model, batch), batch)
    assert torch.allclose(fast, full, rtol=1e-10)
    weights = torch.arange(1.0, 5.0, dtype=fast.dtype)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), params),
                    torch.autograd.grad((full * weights).sum(), params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    modules = select_linear_modules(model, "all")
    head_name, head = next((n, m) for n, m in modules.items() if m is model.get_output_embeddings())
    with LinearCapture({head_name: head}):
        assert plain_head(model) is None
    assert plain_head(model) is head  # the capture's hooks are gone again
    got = per_example_linear_grads(model, task, batch, modules)[head_name]
    if head.weight is model.get_input_embeddings().weight:
        return  # GPT-2 ties the head to the embeddings: autograd's weight gradient adds the lookup's part
    for i, seq in enumerate(seqs[:4]):
        want = dense_gradients(model, {head_name: modules[head_name]}, seq)[0][head_name]
        assert torch.allclose(got[i], want, rtol=1e-8, atol=1e-12)


def test_chunking_and_masks(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "docs.txt"
    path.write_text("the cat sat on the mat and the dog ran\n\n  \n\nparis\n\nthe sea")
    seqs = tokenize_documents(tokenizer, read_documents(str(path)), max_length=4)
    assert [len(s.input_ids) for s in seqs] == [4, 4, 2, 2]  # 10 tokens -> 4 + 4 + 2; "paris" alone is dropped
    assert all(s.loss_mask == (0,) + (1,) * (len(s.input_ids) - 1) for s in seqs)
    assert len({s.id for s in seqs}) == 4
    csv = tmp_path / "pairs.csv"
    csv.write_text("q,a\nthe capital of france,is paris\nthe capital of spain,is madrid\n")
    pairs = tokenize_documents(tokenizer, read_documents(str(csv), prompt_column="q", completion_column="a"), 16)
    assert pairs[0].loss_mask == (0, 0, 0, 0, 1, 1)
    assert tokenizer.decode(list(pairs[1].input_ids[4:])) == "is madrid"


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_scores_equal_dense_definition(lm, strategy):
    _, _, model, tokenizer = lm
    seqs = training_sequences(tokenizer)
    query = pair_sequence(*pair_ids(tokenizer, "the capital of italy", "is rome"), tokenizer)
    modules = mlp_modules(model)
    damping = 0.05
    method = FactoredInfluence(model, CausalLMTask(), lm_batches(seqs, 3, tokenizer.pad_token_id),
                               FactorConfig(strategy=strategy, modules=mlp_pattern(model), damping=damping),
                               progress=False)
    qbatch = lm_batches([query], 1, tokenizer.pad_token_id)
    got = method.pairwise_scores(qbatch)[0]

    train = [dense_gradients(model, modules, s) for s in seqs]
    gq = dense_gradients(model, modules, query)[0]
    if strategy == "identity":
        inverses = {n: torch.eye(g.numel(), dtype=g.dtype) / (1 + damping) for n, g in gq.items()}
    else:
        inverses = dense_ekfac_inverse([t[0] for t in train], [t[1] for t in train], [t[2] for t in train], damping)
    want = torch.tensor([sum(float(gq[n].reshape(-1) @ inverses[n] @ gi[n].reshape(-1)) for n in gq)
                         for gi, _, _ in train], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    # the candidate path: token shares of any subset, against the same factors, sum to the same scores
    subset = [4, 1, 7]
    shares = token_scores(method, qbatch, lm_batches([seqs[i] for i in subset], 2, tokenizer.pad_token_id))
    sums = torch.tensor([float(s[0].sum()) for s in shares], dtype=torch.float64)
    assert torch.allclose(sums, want[subset], rtol=1e-6, atol=1e-9 * float(want.abs().max()))


def test_retrieval_ranks_lexical_matches_first():
    texts = ["the cat sat on the mat", "dogs bark", "paris is in france", "rome is in italy"]
    ranker = CandidateFilter(texts)
    for method in ("tfidf", "bm25"):
        assert ranker.top("is paris in france", 2, method)[0] == 2
        assert ranker.top("italy rome", 1, method).tolist() == [3]
    assert ranker.top("anything", 4, "all").tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-cli")
    folder = tiny_lm_folder(root / "model", "gpt2")
    data = root / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    base = ["--data", str(data), "--base-model", str(folder), "--cache-dir", str(root / "cache"), "--last-k", "-1",
            "--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet"]
    return root, folder, data, base


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_then_trace_tokens_and_candidates(cli_files, capsys):
    root, _, _, base = cli_files
    assert main(["train", "--model", "lm", *base]) == 0
    first = capsys.readouterr().out
    assert "fine-tuned" in first and "10 sequences" in first
    saved = sorted((root / "cache" / "lm").glob("*/weights.safetensors"))
    assert len(saved) == 1
    query = ["trace", *base, "--prompt", "the capital of italy", "--completion", "is rome", "--json"]
    full = run_json(capsys, [*query, "--top", "10", "--tokens"])
    assert len(saved) == len(sorted((root / "cache" / "lm").glob("*/weights.safetensors")))  # no second model
    assert full["query"]["completion"] == "is rome" and full["query"]["loss"] > 0
    assert full["candidates"] == {"method": "all", "kept": 10, "of": 10}
    scores = [r["score"] for r in full["results"]]
    assert scores == sorted(scores, reverse=True)
    for row in full["results"]:
        total = sum(t["score"] for t in row["tokens"])
        assert abs(total - row["score"]) <= 1e-5 * abs(row["score"])
        assert row["loss_change"] == pytest.approx(row["score"] / 10)
    by_id = {r["id"]: r["score"] for r in full["results"]}
    for method in ("tfidf", "bm25"):
        kept = run_json(capsys, [*query, "--candidates", "4", "--candidates-method", method])
        assert kept["candidates"] == {"method": method, "kept": 4, "of": 10}
        assert len(kept["results"]) == 4
        for row in kept["results"]:
            assert row["score"] == pytest.approx(by_id[row["id"]], rel=1e-5)
    generated = run_json(capsys, ["trace", *base, "--prompt", "the capital of", "--max-new-tokens", "3", "--json"])
    assert len(generated["query"]["completion"].split()) == 3  # the greedy completion, traced


def one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("influent: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_exit_2(cli_files, capsys, tmp_path):
    _, folder, _, base = cli_files
    trace = ["trace", *base]
    err = one_line_exit_2(capsys, ["trace", *[a if a != str(folder) else "no-such-org/no-such-lm-42" for a in base],
                                   "--prompt", "the cat"])
    assert "no-such-org/no-such-lm-42" in err
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n")
    assert "no text" in one_line_exit_2(capsys, ["train", "--model", "lm", *base[2:], "--data", str(blank)])
    empty_col = tmp_path / "empty.csv"
    empty_col.write_text("text,other\n,1\n,2\n")
    one_line_exit_2(capsys, ["train", "--model", "lm", *base[2:], "--data", str(empty_col)])
    assert "--prompt is empty" in one_line_exit_2(capsys, [*trace, "--prompt", "   "])
    long_prompt = " ".join(["the cat"] * 20)  # 40 tokens; the context is 32
    assert "context" in one_line_exit_2(capsys, [*trace, "--prompt", long_prompt, "--completion", "sat"])
    assert "--candidates" in one_line_exit_2(capsys, [*trace, "--prompt", "the cat", "--completion", "sat",
                                                      "--candidates", "11"])


def test_fine_tune_is_seeded_and_the_checkpoint_reloads(tmp_path):
    from influent.lm_pipeline import LMSettings, prepare_lm

    folder = tiny_lm_folder(tmp_path / "model", "llama")
    data = tmp_path / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    settings = {"data": str(data), "base_model": str(folder), "last_k": 1, "epochs": 2, "lr": 1e-2,
                "batch_size": 4}
    first = prepare_lm(LMSettings(**settings), cache_dir=tmp_path / "a", progress=False)
    again = prepare_lm(LMSettings(**settings), cache_dir=tmp_path / "b", progress=False)  # trained afresh
    loaded = prepare_lm(LMSettings(**settings), cache_dir=tmp_path / "a", progress=False)  # from the checkpoint
    base, _ = load_causal_lm(str(folder))
    trained = dict(first.model.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert changed and all(n.startswith("model.layers.1.") for n in changed)  # only the last block trained
    for other in (again, loaded):
        for name, p in other.model.named_parameters():
            assert torch.equal(p, trained[name]), name
    assert loaded.metrics == first.metrics


def test_diverging_fine_tune_is_a_numerical_error_and_saves_nothing(tmp_path):
    from influent.errors import NumericalError
    from influent.lm_pipeline import LMSettings, prepare_lm

    folder = tiny_lm_folder(tmp_path / "model", "llama")
    data = tmp_path / "facts.txt"
    data.write_text("\n\n".join(FACTS))
    settings = LMSettings(data=str(data), base_model=str(folder), last_k=None, epochs=3, lr=1e30, batch_size=2)
    with pytest.raises(NumericalError):
        prepare_lm(settings, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("settings.json"))
