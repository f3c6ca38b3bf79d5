"""``influent train --model lm`` and ``influent trace``: fine-tune a causal LM on a text file, then the
training sequences behind a completion."""

from __future__ import annotations

import argparse
import json
import re

from influent.cli.common import add_data_options, add_finetune_options, check_finetune_args, checked
from influent.cli.report import add_report_option, check_report_path, maybe_write_report
from influent.errors import UserError


def add_lm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("causal language model (--model lm)")
    g.add_argument("--base-model", default=None,
                   help="Hugging Face causal LM name (local cache only), local folder or .gguf file "
                        "(default: the packaged SmolLM2-135M-Instruct)")
    g.add_argument("--prompt-column", default=None, help="prompt column of --data (pairs: loss on completions)")
    g.add_argument("--completion-column", default=None, help="completion column of --data")


def lm_settings(args: argparse.Namespace):
    """The :class:`~influent.lm_pipeline.LMSettings` the data, model and fine-tuning options describe."""
    from influent.lm_pipeline import LMSettings

    if args.data is None:
        raise UserError("--model lm needs --data (a .txt, CSV, TSV, JSONL or Parquet file, or hf:NAME)")
    if args.train_size is not None:
        raise UserError("--train-size is not supported with --model lm")
    return LMSettings(
        data=args.data, base_model=args.base_model, text_column=args.text_column, prompt_column=args.prompt_column,
        completion_column=args.completion_column, hf_split=args.hf_split,
        max_length=args.max_length,
        last_k=None if args.last_k < 0 else args.last_k, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed,
    )


def lm_setup(args: argparse.Namespace, retrain: bool = False):
    """Fine-tune (or load) the causal LM the data, model and fine-tuning options describe."""
    from influent.lm_pipeline import prepare_lm

    check_finetune_args(args)
    if args.last_k == 0:
        raise UserError("--last-k must be at least 1 (or -1 for all layers) with --model lm")
    return prepare_lm(lm_settings(args), cache_dir=args.cache_dir, retrain=retrain, progress=not args.quiet)


def cmd_train_lm(args: argparse.Namespace) -> int:
    setup = lm_setup(args, retrain=args.retrain)
    m = setup.metrics
    losses = ", ".join(f"{x:.3f}" for x in m.get("epoch_loss", []))
    print(f"fine-tuned {args.base_model or 'SmolLM2-135M-Instruct'} on {m['n_sequences']} sequences "
          f"({m['trainable_parameters']} trainable parameters; loss per epoch {losses} nats/sequence); "
          f"saved in {setup.folder}")
    return 0


def tracked_modules(model, spec: str) -> str:
    """``mlp`` -> a regex naming the trainable MLP linear modules (all MLP ones if none trains); else ``spec``."""
    from influent.curvature.linear_grads import select_linear_modules
    from influent.models.causal_lm import mlp_pattern

    if spec != "mlp":
        return spec
    mlp = select_linear_modules(model, mlp_pattern(model))
    trainable = [n for n, m in mlp.items() if m.weight.requires_grad] or list(mlp)
    return "^(" + "|".join(re.escape(n) for n in trainable) + ")$"


def query_sequence(setup, prompt: str, completion: str | None, max_new_tokens: int):
    """The query as a sequence: the given completion, or the model's greedy one."""
    from influent.data.lm_text import pair_ids, pair_sequence
    from influent.models.causal_lm import context_length, greedy_completion

    if not prompt.strip():
        raise UserError("--prompt is empty")
    if completion is not None and not completion.strip():
        raise UserError("--completion is empty")
    limit = context_length(setup.model)
    prompt_ids, completion_ids = pair_ids(setup.tokenizer, prompt, completion or "x")
    if completion is None:
        if len(prompt_ids) >= limit:
            raise UserError(f"--prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
        completion_ids = greedy_completion(setup.model, setup.tokenizer, prompt_ids, max_new_tokens)
        if not completion_ids:
            raise UserError("the model's greedy completion is empty; give --completion")
    if len(prompt_ids) + len(completion_ids) > limit:
        raise UserError(f"--prompt and completion have {len(prompt_ids) + len(completion_ids)} tokens; "
                        f"the model's context is {limit}")
    return pair_sequence(prompt_ids, completion_ids, setup.tokenizer)


def trace_method(args: argparse.Namespace, setup):
    """The :class:`~influent.factored_influence.FactoredInfluence` of ``trace``: the measurement, modules,
    strategy and damping the options name, factors fitted on every training sequence or ``--fit-size`` of them."""
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.lm_pipeline import fit_sample
    from influent.models.causal_lm import CausalLMTask

    fit = None
    if args.fit_size is not None and args.fit_size != len(setup.sequences):
        fit = setup.batches(fit_sample(setup.sequences, args.fit_size, args.seed))
    config = FactorConfig(strategy=args.strategy, modules=tracked_modules(setup.model, args.modules),
                          damping=args.damping, seed=args.seed)
    return FactoredInfluence(setup.model, CausalLMTask(args.measurement), setup.batches(), config,
                             cache_dir=setup.folder / "factors", progress=not args.quiet, fit_batches=fit,
                             memory_max_bytes=int(args.memory_gb * 2**30))


def cmd_trace(args: argparse.Namespace) -> int:
    from influent.retrieval import CandidateFilter
    from influent.store import default_cache_dir
    from influent.trace import format_trace, trace

    checked("top", args.top, low=1, integer=True)
    checked("max_new_tokens", args.max_new_tokens, low=1, integer=True)
    for name in ("candidates", "fit_size"):
        if getattr(args, name) is not None:
            checked(name, getattr(args, name), low=1, integer=True)
    if args.damping is not None:
        checked("damping", args.damping, low=0)
    checked("memory_gb", args.memory_gb, low=0)
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    check_report_path(args)
    setup = lm_setup(args)
    n = len(setup.sequences)
    if args.candidates is not None and args.candidates > n:
        raise UserError(f"--candidates {args.candidates} exceeds the {n} training sequences")
    if args.fit_size is not None and args.fit_size > n:
        raise UserError(f"--fit-size {args.fit_size} exceeds the {n} training sequences")
    query = query_sequence(setup, args.prompt, args.completion, args.max_new_tokens)
    method = trace_method(args, setup)
    root = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    ranker = CandidateFilter([s.text for s in setup.sequences], cache_dir=root)
    result = trace(method, setup.sequences, query, setup.tokenizer, top=args.top, tokens=args.tokens,
                   candidates=args.candidates, candidates_method=args.candidates_method, candidate_filter=ranker,
                   batch_size=setup.settings.batch_size, rank=args.rank)
    maybe_write_report(args, result, "trace")
    print(json.dumps(result) if args.json else format_trace(result))
    return 0


def add_trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="the training sequences that made a language model write a completion")
    p.add_argument("--model", choices=["lm"], default="lm", help="lm: a causal language model")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--completion", default=None, help="the completion to trace (default: the greedy one)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="length cap of the greedy completion")
    p.add_argument("--top", type=int, default=10, help="proponents shown (default 10)")
    p.add_argument("--tokens", action="store_true", help="each token's share of every shown sequence's score")
    p.add_argument("--candidates", type=int, default=None,
                   help="score only the N training sequences most related to the query (default: all)")
    p.add_argument("--candidates-method", choices=["tfidf", "bm25", "all"], default="tfidf")
    p.add_argument("--measurement", choices=["loss", "margin"], default="loss",
                   help="loss (default): the completion's summed NLL; margin: minus its summed logit margin "
                        "(target logit - logsumexp of the others), see docs/lm.md")
    p.add_argument("--rank", choices=["influence", "relatif", "cosine"], default="influence",
                   help="order of the results: influence (default, the raw score), relatif (score / "
                        "sqrt(self-influence)) or cosine (the H^-1 cosine of the two gradients)")
    p.add_argument("--fit-size", type=int, default=None,
                   help="fit the curvature on a seeded sample of N training sequences (default: all)")
    p.add_argument("--strategy", choices=["ekfac", "kfac", "diagonal", "identity"], default="ekfac")
    p.add_argument("--modules", default="mlp",
                   help="tracked linear modules: mlp (default: the fine-tuned blocks' MLP), all, or a name regex")
    p.add_argument("--damping", type=float, default=None,
                   help="added to the curvature (default: 0.1 x the mean eigenvalue per module)")
    p.add_argument("--memory-gb", type=float, default=2.0,
                   help="keep the tracked modules' training tokens in memory up to this size (GiB, default 2): "
                        "the EK-FAC fit is then one pass and scores need no pass over the training data; 0: off")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_report_option(p)
    add_data_options(p)
    add_finetune_options(p)
    add_lm_options(p)
    p.set_defaults(func=cmd_trace)
