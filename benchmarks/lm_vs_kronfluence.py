"""LM EK-FAC influence: influent against kronfluence 1.0.1 on the same fine-tuned tiny LLaMA-config LM.

Model and data (all built in code; ``benchmarks/lm_lds.py`` supplies the pieces): the bundled Rotten
Tomatoes snippets in a seeded order; a word-level vocabulary of the ``--vocab`` most frequent tokens; a
``LlamaForCausalLM`` (``--hidden``, ``--intermediate``, ``--layers``, 4 heads) pre-trained from scratch on the
first ``--n-pretrain`` snippets as plain text, then fine-tuned (influent's ``fine_tune``: seeded AdamW, all
layers) on the next ``--n-train`` snippets as prompt/completion pairs (prompt = the first half of the words,
completion = the rest; the loss counts the completion tokens only). The next ``--n-query`` snippets, split
the same way, are the queries; their measurement is the completion's summed NLL given the prompt.

Both libraries get: the same model; the same tracked modules (every MLP ``gate_proj``, ``up_proj``,
``down_proj``); the same training batches in the same order (each padded to its longest sequence; influent
re-forms them by length internally, same scores); the summed completion NLL per sequence as the training
loss (kronfluence's ``compute_train_loss`` sums it over the batch, written here by hand; the vocabulary head
is applied at the target-predicting positions only, as influent's ``CausalLMTask`` does)
and as the measurement; padding masked (``get_attention_mask``); the empirical Fisher
(``use_empirical_fisher=True``); EK-FAC; and the same damping: ``damping_factor=None`` in kronfluence is
``0.1 x mean(Lambda)`` per module, which is influent's ``damping=None`` (``--damping X`` gives both the
absolute value X). Per-token scores: kronfluence's ``compute_per_token_scores=True`` (which needs every
training batch padded to the same width, so that run pads to ``--max-length``), against influent's
``token_scores``; only real positions are compared.

Timings (``torch.set_num_threads(--threads)``, the same for both): fit = factors (covariances, eigenbases,
eigenvalue correction); scores = all queries x all training sequences (kronfluence writes its factors and
scores to a temporary folder, part of its cost; it runs a pass over the training data); token scores = the
same with per-token scores. influent is timed with its defaults (``FactoredInfluence(...)``): the captured
training tokens (338 MB here) fit the in-memory budget (``memory_max_bytes``, 2 GiB), so the fit is one
pass (the eigenvalue correction is computed from the kept captures) and the scores are read from those
tokens in the eigenbasis, with no pass over the training data. Then again with ``memory_max_bytes=0``
(``fit_two_passes_s``: covariance pass + eigenvalue pass; ``score_with_passes_s``: a pass over the
training data, kronfluence's only mode), checking that both fits give the same factors; and with the
on-disk training token cache (``cache_dir=..., train_cache=True``, memory off): ``fit_with_token_cache_s``
/ ``score_from_token_cache_s``. Then ``--rounds`` more alternating fit + score timings of both libraries
(influent's defaults; fresh engines and folders) give ``*_speedup_of_best_times`` (fastest time of each)
and ``*_speedup_median_of_rounds``, since the shared machine's load drifts between phases.
Before any timing, each library fits and scores once on the first ``--warmup`` training sequences (untimed,
``warmup_s`` in the JSON), so that one-time costs of a process (lazy imports, first BLAS / LAPACK calls,
allocator growth) fall on neither library's timed fit. Load averages are recorded per phase. A float64 copy of the model scored by influent is the rounding
reference for both (``float64_reference``).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_vs_kronfluence.py`` (progress on stderr, one JSON
line last on stdout).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from lm_lds import llama_config, log, sequences_of, snippets, train_from_scratch, word_tokenizer


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def split_pair(text: str) -> tuple[str, str]:
    """``(prompt, completion)``: the first half of the snippet's words and the rest."""
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def pair_sequences(tokenizer, texts: list[str], max_length: int):
    """Prompt/completion sequences (completion-only targets) of the snippets with at least two words."""
    from influent.data.lm_text import pair_ids, pair_sequence

    out = []
    for text in texts:
        prompt, completion = split_pair(text)
        if not completion:
            continue
        p, c = pair_ids(tokenizer, prompt, completion)
        room = max_length - len(p)
        if room >= 1 and c:
            out.append(pair_sequence(p, c[:room], tokenizer))
    return out


def summed_completion_nll(model, batch: dict) -> torch.Tensor:
    """``-sum_t log p(x_t | x_<t)`` over the positions with ``loss_mask * attention_mask``, summed over the
    batch (by hand): the vocabulary head is applied only at the positions that predict those tokens, as
    influent's ``CausalLMTask`` does for a LLaMA model, so both libraries pay the same head cost."""
    states = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    rows, cols = (batch["loss_mask"] * batch["attention_mask"])[:, 1:].nonzero(as_tuple=True)
    logp = torch.log_softmax(model.lm_head(states[rows, cols]).float(), dim=-1)
    return -logp.gather(-1, batch["input_ids"][rows, cols + 1][:, None]).sum()


def build_model(args):
    """Tokenizer, fine-tuned model, training and query pair sequences, and the fine-tuning losses."""
    from influent.data.lm_text import lm_batches
    from influent.models.causal_lm import fine_tune

    texts = snippets(args.seed)
    pre_texts = texts[: args.n_pretrain]
    pair_texts = texts[args.n_pretrain : args.n_pretrain + args.n_train]
    query_texts = texts[args.n_pretrain + args.n_train : args.n_pretrain + args.n_train + 4 * args.n_query]
    tok = word_tokenizer(pre_texts + pair_texts, args.vocab)
    config = llama_config(len(tok), args.hidden, args.intermediate, args.layers, args.max_length)
    pre = sequences_of(tok, pre_texts, args.max_length)
    t0 = time.perf_counter()
    model = train_from_scratch(config, pre, epochs=args.pretrain_epochs, lr=3e-3, batch_size=32, seed=args.seed)
    train = pair_sequences(tok, pair_texts, args.max_length)
    queries = pair_sequences(tok, query_texts, args.max_length)[: args.n_query]

    def epoch(gen):
        order = torch.randperm(len(train), generator=gen).tolist()
        return lm_batches([train[i] for i in order], 32, 0)

    history = fine_tune(model, epoch, epochs=args.finetune_epochs, lr=1e-3, seed=args.seed, progress=False)
    log(f"model: {sum(p.numel() for p in model.parameters())} parameters, pre-trained + fine-tuned in "
        f"{time.perf_counter() - t0:.0f} s, fine-tuning loss per epoch {[round(h, 3) for h in history]}")
    return tok, model.eval(), train, queries, history


def run_influent(model, train_batches, query_batches, args):
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import CausalLMTask, mlp_pattern
    from influent.token_influence import token_scores

    cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(model), fisher="empirical", damping=args.damping)
    method = FactoredInfluence(model, CausalLMTask(), train_batches, cfg, progress=False)  # the defaults
    t0 = time.perf_counter()
    method.fit()  # one pass: the captures fit the memory budget (memory_max_bytes, 2 GiB)
    fit_s = time.perf_counter() - t0
    loads = {"after_influent_fit": load1()}
    t0 = time.perf_counter()
    scores = method.pairwise_scores(query_batches).numpy()  # from the tokens the fit kept in memory
    score_s = time.perf_counter() - t0
    loads["after_influent_score"] = load1()
    t0 = time.perf_counter()
    tokens = token_scores(method, query_batches, train_batches)
    token_s = time.perf_counter() - t0
    loads["after_influent_tokens"] = load1()
    log(f"influent: fit {fit_s:.1f} s, scores {score_s:.1f} s, token scores {token_s:.1f} s")
    times = {"fit_s": fit_s, "score_s": score_s, "token_s": token_s}
    passes = FactoredInfluence(model, CausalLMTask(), train_batches, cfg, progress=False, memory_max_bytes=0)
    t0 = time.perf_counter()
    passes.fit()  # two passes: covariances, then the eigenvalue correction
    times["fit_two_passes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_passes = passes.pairwise_scores(query_batches).numpy()  # a pass over the training data
    times["score_with_passes_s"] = time.perf_counter() - t0
    loads["after_influent_passes"] = load1()
    times["one_vs_two_pass_factors_max_relative_difference"] = max(
        float((method.factors.tensors[k] - v).abs().max() / v.abs().max())
        for k, v in passes.factors.tensors.items())
    times["memory_vs_passes_relative_difference"] = float(
        np.linalg.norm(scores - with_passes) / np.linalg.norm(with_passes))
    log(f"influent, memory off: fit {times['fit_two_passes_s']:.1f} s, scores {times['score_with_passes_s']:.1f} s")
    with tempfile.TemporaryDirectory(dir=args.cache_parent) as folder:
        cached = FactoredInfluence(model, CausalLMTask(), train_batches, cfg, cache_dir=folder, train_cache=True,
                                   train_cache_max_bytes=None, progress=False, memory_max_bytes=0)
        t0 = time.perf_counter()
        cached.fit()  # the factors, plus the training token cache written from the eigenvalue pass
        times["fit_with_token_cache_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from_cache = cached.pairwise_scores(query_batches).numpy()  # no pass over the training data
        times["score_from_token_cache_s"] = time.perf_counter() - t0
        times["token_cache_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    loads["after_influent_token_cache"] = load1()
    times["token_cache_vs_passes_relative_difference"] = float(
        np.linalg.norm(from_cache - with_passes) / np.linalg.norm(with_passes))
    log(f"influent with the token cache: fit {times['fit_with_token_cache_s']:.1f} s, scores "
        f"{times['score_from_token_cache_s']:.1f} s")
    return method, scores, tokens, times, loads


def float64_reference(model, train_batches, query_batches, args) -> np.ndarray:
    """influent's EK-FAC scores with the model, factors and passes in float64 (the rounding reference)."""
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import CausalLMTask, mlp_pattern

    ref = copy.deepcopy(model).double()
    cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(ref), fisher="empirical", damping=args.damping)
    return FactoredInfluence(ref, CausalLMTask(), train_batches, cfg, progress=False).pairwise_scores(
        query_batches).numpy()


def kronfluence_task(names):
    from kronfluence.task import Task as KTask

    class LMTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("this benchmark uses the empirical Fisher")
            return summed_completion_nll(model, batch)

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


class PaddedPairs(torch.utils.data.Dataset):
    """Each sequence right-padded to ``width`` (``input_ids``, ``attention_mask``, ``loss_mask``)."""

    def __init__(self, seqs, width: int):
        from influent.data.lm_text import lm_batches

        b = lm_batches(seqs, len(seqs), 0)[0]
        pad = width - b["input_ids"].shape[1]
        self.items = [{k: nn.functional.pad(v[i], (0, pad)) for k, v in b.items()} for i in range(len(seqs))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trim_collate(items):
    """Stack, then drop the padding columns no sequence of the batch uses (= influent's ``lm_batches``)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width].contiguous() for k, v in batch.items()}


def prepared_kronfluence(model):
    """A copy of ``model`` prepared by kronfluence for the MLP modules, and the task."""
    from kronfluence.analyzer import prepare_model

    from influent.models.causal_lm import mlp_pattern

    kmodel = copy.deepcopy(model).eval()
    names = [n for n, m in kmodel.named_modules() if isinstance(m, nn.Linear) and re.search(mlp_pattern(model), n)]
    ktask = kronfluence_task(names)
    return prepare_model(kmodel, ktask), ktask


def kronfluence_fit(analyzer, train_ds, args) -> float:
    """Seconds of kronfluence's EK-FAC fit (empirical Fisher) in ``analyzer``'s folder."""
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    t0 = time.perf_counter()
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=args.batch_size,
                             dataloader_kwargs=DataLoaderKwargs(collate_fn=trim_collate),
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                             overwrite_output_dir=True)
    return time.perf_counter() - t0


def kronfluence_scores(analyzer, train_ds, query_ds, args, name: str, per_token: bool = False):
    """``(seconds, scores)`` of kronfluence's pairwise (or per-token) scores against the fitted factors."""
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    kwargs = {} if per_token else {"dataloader_kwargs": DataLoaderKwargs(collate_fn=trim_collate)}
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=query_ds,
                                     train_dataset=train_ds, per_device_query_batch_size=len(query_ds),
                                     per_device_train_batch_size=args.batch_size,
                                     score_args=ScoreArguments(damping_factor=args.damping,
                                                               compute_per_token_scores=per_token),
                                     overwrite_output_dir=True, **kwargs)
    seconds = time.perf_counter() - t0
    return seconds, analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()


def run_kronfluence(model, train, queries, args):
    from kronfluence.analyzer import Analyzer

    kmodel, ktask = prepared_kronfluence(model)
    loads, out = {}, {}
    train_ds, query_ds = PaddedPairs(train, args.max_length), PaddedPairs(queries, args.max_length)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(analysis_name="lm", model=kmodel, task=ktask, cpu=True, output_dir=folder,
                            disable_tqdm=True)
        out["fit_s"] = kronfluence_fit(analyzer, train_ds, args)
        loads["after_kronfluence_fit"] = load1()
        out["score_s"], scores = kronfluence_scores(analyzer, train_ds, query_ds, args, "scores")
        loads["after_kronfluence_score"] = load1()
        out["token_s"], tokens = kronfluence_scores(analyzer, train_ds, query_ds, args, "tokens", per_token=True)
        loads["after_kronfluence_tokens"] = load1()
    log(f"kronfluence: fit {out['fit_s']:.1f} s, scores {out['score_s']:.1f} s, token scores {out['token_s']:.1f} s")
    return scores, tokens, out, loads


def warm_up(model, train, queries, args) -> dict:
    """Untimed fit + scores of each library on the first ``--warmup`` training sequences; their seconds."""
    from kronfluence.analyzer import Analyzer

    from influent.data.lm_text import lm_batches
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import CausalLMTask, mlp_pattern

    out, subset = {}, train[: args.warmup]
    t0 = time.perf_counter()
    cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(model), fisher="empirical", damping=args.damping)
    method = FactoredInfluence(model, CausalLMTask(), lm_batches(subset, args.batch_size, 0), cfg, progress=False)
    method.fit()
    method.pairwise_scores(lm_batches(queries, len(queries), 0))
    out["influent"] = round(time.perf_counter() - t0, 3)
    kmodel, ktask = prepared_kronfluence(model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(analysis_name="warmup", model=kmodel, task=ktask, cpu=True, output_dir=folder,
                            disable_tqdm=True)
        train_ds = PaddedPairs(subset, args.max_length)
        kronfluence_fit(analyzer, train_ds, args)
        kronfluence_scores(analyzer, train_ds, PaddedPairs(queries, args.max_length), args, "warmup")
    out["kronfluence"] = round(time.perf_counter() - t0, 3)
    log(f"warm-up (untimed) on {len(subset)} sequences: {out}")
    return out


def timing_rounds(model, train, queries, train_batches, query_batches, args) -> list[dict]:
    """``--rounds`` more fits + scores of each library, alternating (influent's defaults, then kronfluence),
    each in a fresh engine / folder, with the load after each round: the shared machine's load drifts, so
    one phase per library can land on a busier minute than the other."""
    from kronfluence.analyzer import Analyzer

    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import CausalLMTask, mlp_pattern

    cfg = FactorConfig(strategy="ekfac", modules=mlp_pattern(model), fisher="empirical", damping=args.damping)
    kmodel, ktask = prepared_kronfluence(model)
    train_ds, query_ds = PaddedPairs(train, args.max_length), PaddedPairs(queries, args.max_length)
    rounds = []
    for r in range(args.rounds):
        method = FactoredInfluence(model, CausalLMTask(), train_batches, cfg, progress=False)
        row = {"load_start": load1()}
        t0 = time.perf_counter()
        method.fit()
        row["influent_fit_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        method.pairwise_scores(query_batches)
        row["influent_score_s"] = round(time.perf_counter() - t0, 3)
        del method
        with tempfile.TemporaryDirectory() as folder:
            analyzer = Analyzer(analysis_name=f"lm{r}", model=kmodel, task=ktask, cpu=True, output_dir=folder,
                                disable_tqdm=True)
            row["kronfluence_fit_s"] = round(kronfluence_fit(analyzer, train_ds, args), 3)
            row["kronfluence_score_s"] = round(kronfluence_scores(analyzer, train_ds, query_ds, args, "s")[0], 3)
        row["load_end"] = load1()
        log(f"round {r + 1}: {row}")
        rounds.append(row)
    return rounds


def compare(ours, theirs, our_tokens, their_tokens, train_batches) -> dict:
    """Sequence- and token-level agreement figures."""
    from scipy.stats import spearmanr

    a, b = ours.ravel(), theirs.ravel()
    per_query = [float(np.corrcoef(ours[q], theirs[q])[0, 1]) for q in range(ours.shape[0])]
    mask = torch.cat([nn.functional.pad(bt["attention_mask"], (0, their_tokens.shape[2] - bt["attention_mask"].shape[1]))
                      for bt in train_batches]).bool().numpy()
    width = their_tokens.shape[2]
    mine = np.stack([np.pad(t.numpy(), ((0, 0), (0, width - t.shape[1]))) for t in our_tokens], axis=1)
    ta, tb = mine[:, mask], their_tokens[:, mask]
    share_sum = mine.sum(2)
    return {
        "pearson": round(float(np.corrcoef(a, b)[0, 1]), 6),
        "pearson_min_per_query": round(min(per_query), 6),
        "spearman": round(float(spearmanr(a, b)[0]), 6),
        "relative_difference": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_abs_difference_over_max_abs": float(np.abs(a - b).max() / np.abs(b).max()),
        "scale_ratio_kronfluence_over_influent": round(float(np.median(b / np.where(a == 0, np.nan, a))), 6),
        "token_pearson": round(float(np.corrcoef(ta.ravel(), tb.ravel())[0, 1]), 6),
        "token_relative_difference": float(np.linalg.norm(ta - tb) / np.linalg.norm(tb)),
        "token_max_abs_difference_over_max_abs": float(np.abs(ta - tb).max() / np.abs(tb).max()),
        "token_padding_abs_max_influent": float(np.abs(mine[:, ~mask]).max()) if (~mask).any() else 0.0,
        "token_padding_abs_max_kronfluence": float(np.abs(their_tokens[:, ~mask]).max()) if (~mask).any() else 0.0,
        "influent_token_sum_vs_score_max_relative_error": float(np.abs(share_sum - ours).max() / np.abs(ours).max()),
        "kronfluence_token_sum_vs_its_score_max_relative_error": float(
            np.abs(their_tokens.sum(2) - theirs).max() / np.abs(theirs).max()),
        "compared_tokens": int(mask.sum()),
    }


def round_ratios(inf_t: dict, kf_t: dict, rounds: list[dict]) -> dict:
    """kronfluence / influent time ratios over the main run and the extra rounds: of the fastest time of
    each library, and the median of the per-round ratios."""
    fits = [(inf_t["fit_s"], kf_t["fit_s"])] + [(r["influent_fit_s"], r["kronfluence_fit_s"]) for r in rounds]
    scores = [(inf_t["score_s"], kf_t["score_s"])] + [(r["influent_score_s"], r["kronfluence_score_s"])
                                                      for r in rounds]
    out = {}
    for what, pairs in (("fit", fits), ("score", scores)):
        out[f"{what}_speedup_of_best_times"] = round(min(k for _, k in pairs) / min(i for i, _ in pairs), 2)
        out[f"{what}_speedup_median_of_rounds"] = round(float(np.median([k / i for i, k in pairs])), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-pretrain", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-query", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--damping", type=float, default=None, help="absolute damping for both (default: heuristic)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4, help="extra alternating fit + score timings of each library")
    ap.add_argument("--warmup", type=int, default=64, help="training sequences of the untimed warm-up (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-parent", default=None, help="folder for influent's temporary factor + token cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from influent.data.lm_text import lm_batches

    t_start, load_start = time.perf_counter(), load1()
    _, model, train, queries, history = build_model(args)
    train_batches = lm_batches(train, args.batch_size, 0)
    query_batches = lm_batches(queries, len(queries), 0)
    warmup = warm_up(model, train, queries, args) if args.warmup else {}
    method, ours, our_tokens, inf_t, loads = run_influent(model, train_batches, query_batches, args)
    theirs, their_tokens, kf_t, kf_loads = run_kronfluence(model, train, queries, args)
    rounds = timing_rounds(model, train, queries, train_batches, query_batches, args)
    loads.update(kf_loads)
    ref = float64_reference(model, train_batches, query_batches, args)

    def rel(x):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    result = {
        "benchmark": "lm_vs_kronfluence",
        "command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]),
        "settings": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tracked_modules": method.factors.names,
        "n_train_sequences": len(train),
        "n_queries": len(queries),
        "train_targets_per_sequence": round(sum(sum(s.loss_mask) for s in train) / len(train), 2),
        "train_tokens_per_sequence": round(sum(len(s.input_ids) for s in train) / len(train), 2),
        "finetune_loss_per_epoch": history,
        "damping": "heuristic 0.1*mean(lambda) per module" if args.damping is None else args.damping,
        "damping_per_module_influent": method.factors.damping,
        "influent": {k: (v if k == "token_cache_bytes" or "difference" in k else round(v, 3))
                     for k, v in inf_t.items()},
        "kronfluence": {k: round(v, 3) for k, v in kf_t.items()},
        "fit_speedup": round(kf_t["fit_s"] / inf_t["fit_s"], 2),
        "score_speedup": round(kf_t["score_s"] / inf_t["score_s"], 2),
        "fit_two_passes_speedup": round(kf_t["fit_s"] / inf_t["fit_two_passes_s"], 2),
        "score_with_passes_speedup": round(kf_t["score_s"] / inf_t["score_with_passes_s"], 2),
        "token_score_speedup": round(kf_t["token_s"] / inf_t["token_s"], 2),
        "score_from_token_cache_speedup": round(kf_t["score_s"] / inf_t["score_from_token_cache_s"], 2),
        "fit_with_token_cache_speedup": round(kf_t["fit_s"] / inf_t["fit_with_token_cache_s"], 2),
        "warmup_s": warmup,
        "rounds": rounds,
        **round_ratios(inf_t, kf_t, rounds),
        "fit_plus_score_speedup": round((kf_t["fit_s"] + kf_t["score_s"]) / (inf_t["fit_s"] + inf_t["score_s"]), 2),
        **compare(ours, theirs, our_tokens, their_tokens, train_batches),
        "float64_reference": {"influent_float32_relative_difference": rel(ours),
                              "kronfluence_relative_difference": rel(theirs)},
        "load_avg_1min": {"start": load_start, **loads},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
