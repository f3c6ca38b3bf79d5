"""``influent index build``, ``influent explain --index`` and ``influent trace --index``: a gradient index of
the fine-tuned classifier or of the causal language model.

``influent index build --model finetuned|lm --index DIR`` writes the projected per-example gradients of the
training set (:mod:`influent.index`; ``--model lm`` takes ``influent train --model lm``'s data and model
options and tracks the fine-tuned blocks' MLP modules by default); ``influent explain --model finetuned
--index DIR`` and ``influent trace --index DIR`` answer from it (``--rerank N``: the index's N best rescored by
the factored engine). Under
``torchrun --nproc-per-node N -m influent ...`` (or with ``--distributed``, which reads torchrun's
environment) every rank builds and scores its share of the shards (gloo on CPU, nccl with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os

from influent.cli.common import (
    add_data_options,
    add_finetune_options,
    check_output_dir,
    checked,
    finetuned_setup,
)
from influent.cli.report import check_report_path, maybe_write_report
from influent.cli.trace import add_lm_options, lm_setup, query_sequence, trace_method, tracked_modules
from influent.errors import UserError

MODELS = ("finetuned", "lm")


def add_index_options(p: argparse.ArgumentParser, build: bool) -> None:
    """The index flags (``--index``, ``--device``, ``--distributed``; the build's projection settings)."""
    g = p.add_argument_group("gradient index")
    g.add_argument("--index", required=build, default=None, help="the index folder")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--distributed", action="store_true",
                   help="join the torch.distributed world torchrun describes (also automatic under torchrun)")
    if build:
        g.add_argument("--rank", type=int, default=16, help="projection width per side and module (default 16)")
        g.add_argument("--projection", choices=["gaussian", "orthogonal"], default="gaussian")
        g.add_argument("--projection-seed", type=int, default=0)
        g.add_argument("--strategy", choices=["ekfac", "identity"], default="ekfac",
                       help="precondition with EK-FAC fitted in the projected space (default) or not")
        g.add_argument("--modules", default=None,
                       help="tracked nn.Linear modules: trainable, all, mlp, or a name regex (default: trainable "
                            "for --model finetuned; mlp, the fine-tuned blocks' MLP, for --model lm)")
        g.add_argument("--damping", type=float, default=None,
                       help="absolute damping (default 0.1 x the mean corrected eigenvalue per module)")
        g.add_argument("--shard-size", type=int, default=4096, help="examples per shard (default 4096)")
        g.add_argument("--storage", choices=["float32", "bfloat16"], default="float32",
                       help="row type on disk: float32 (default) or bfloat16 (half the bytes, faster queries)")
    else:
        g.add_argument("--rerank", type=int, default=None,
                       help="rescore the index's N best per side with the factored engine (N >= --top)")


def join_world(args: argparse.Namespace) -> None:
    """Check ``--model`` and ``--device``; join torchrun's world with ``--distributed`` or under torchrun."""
    import torch

    from influent import distributed

    if args.model not in MODELS:
        raise UserError(f"the gradient index needs --model {' or '.join(MODELS)}", field="model")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {args.device!r}: no CUDA device on this machine", field="device")
    if args.distributed or "WORLD_SIZE" in os.environ:
        distributed.init_from_env(args.device)


def on_device(setup, args: argparse.Namespace):
    """``setup`` with its model moved to ``--device`` (under nccl: this rank's GPU)."""
    import torch

    from influent import distributed

    device = args.device
    if device.startswith("cuda") and distributed.active() and ":" not in device:
        device = f"cuda:{torch.cuda.current_device()}"
    setup.model.to(device)
    return setup


def start(args: argparse.Namespace):
    """The fine-tuned classifier or LM (trained or loaded; rank 0 first under torch.distributed) on ``--device``."""
    from influent import distributed

    join_world(args)
    if distributed.rank() != 0:
        distributed.barrier()
    setup = lm_setup(args) if args.model == "lm" else finetuned_setup(args)
    if distributed.rank() == 0:
        distributed.barrier()
    return on_device(setup, args)


def cmd_index_build(args: argparse.Namespace) -> int:
    from influent import distributed
    from influent.index import IndexConfig, build_index
    from influent.models.finetuned import FinetunedTask

    check_output_dir(args.index, "index")
    checked("rank", args.rank, low=1, integer=True)
    checked("shard_size", args.shard_size, low=1, integer=True)
    checked("projection_seed", args.projection_seed, low=0, integer=True)
    if args.damping is not None:
        checked("damping", args.damping, low=0)
    setup = start(args)
    if args.model == "lm":
        task, batches = setup.task, setup.batches()
        modules = tracked_modules(setup.model, args.modules or "mlp")
    else:
        task, batches, modules = FinetunedTask(), setup.batches(setup.train_idx), args.modules or "trainable"
    config = IndexConfig(rank=args.rank, seed=args.projection_seed, modules=modules,
                         projection=args.projection, strategy=args.strategy, damping=args.damping,
                         shard_size=args.shard_size, storage=args.storage)
    manifest = build_index(setup.model, task, batches, args.index, config, progress=not args.quiet)
    if distributed.rank() == 0:
        summary = {k: manifest[k] for k in ("n_examples", "width", "bytes_per_example", "build_seconds",
                                            "shards_built_this_run", "world_size")}
        summary["shards"] = len(manifest["shards"])
        summary["index"] = args.index
        print(json.dumps(summary) if args.json else
              f"indexed {summary['n_examples']} examples in {summary['shards']} shard(s), "
              f"{summary['bytes_per_example']} bytes per example, {summary['build_seconds']:.1f} s; in {args.index}")
    return 0


def explain_from_index(args: argparse.Namespace, setup, query) -> dict | None:
    """``explain --index``: the explanation of ``query`` answered from the index (None on ranks > 0)."""
    from influent import distributed
    from influent.index import GradientIndex
    from influent.index.explain import explain_with_index
    from influent.models.finetuned import FinetunedTask

    if args.rerank is not None:
        checked("rerank", args.rerank, low=1, integer=True)
    join_world(args)
    setup = on_device(setup, args)
    index = GradientIndex(args.index)
    method = None
    if args.rerank is not None:
        method = setup.influence(args.strategy, args.modules, args.fisher, args.damping, seed=args.seed,
                                 progress=not args.quiet)
    result = explain_with_index(index, setup, setup.model, FinetunedTask(), [query], top=args.top, rank=args.rank,
                                rerank=args.rerank, method=method)[0]
    return result if distributed.rank() == 0 else None


def add_index_parser(sub) -> None:
    p = sub.add_parser("index", help="a gradient index of the training set, for fast explain queries")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="project every training example's gradient and write the index")
    b.add_argument("--model", choices=list(MODELS), default="finetuned",
                   help="finetuned (default): the fine-tuned classifier; lm: the causal language model")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    add_index_options(b, build=True)
    add_data_options(b)
    add_finetune_options(b)
    add_lm_options(b)
    b.set_defaults(func=cmd_index_build)


def cmd_trace_index(args: argparse.Namespace) -> int:
    """``influent trace --index DIR [--rerank N]``: the completion's proponents answered from the index."""
    from influent import distributed
    from influent.curvature.linear_grads import select_linear_modules
    from influent.index import GradientIndex
    from influent.index.trace import trace_with_index
    from influent.models.causal_lm import CausalLMTask
    from influent.trace import format_trace

    checked("top", args.top, low=1, integer=True)
    checked("max_new_tokens", args.max_new_tokens, low=1, integer=True)
    if args.rerank is not None:
        checked("rerank", args.rerank, low=args.top, integer=True)
    if args.damping is not None:
        checked("damping", args.damping, low=0)
    for flag, value in (("--candidates", args.candidates), ("--tokens", args.tokens or None)):
        if value is not None:
            raise UserError(f"{flag} does not apply with --index (the index scores every sequence)")
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    check_report_path(args)
    setup = start(args)
    if args.fit_size is not None and args.rerank is None:
        raise UserError("--fit-size applies with --index only to the --rerank's factored engine")
    query = query_sequence(setup, args.prompt, args.completion, args.max_new_tokens)
    index = GradientIndex(args.index)
    method = None
    if args.rerank is not None:
        if args.fit_size is not None:
            checked("fit_size", args.fit_size, low=1, integer=True)
            if args.fit_size > len(setup.sequences):
                raise UserError(f"--fit-size {args.fit_size} exceeds the {len(setup.sequences)} training sequences")
        if sorted(select_linear_modules(setup.model, tracked_modules(setup.model, args.modules))) != sorted(
                index.modules):
            raise UserError(f"--rerank scores the modules --modules {args.modules} names, the index holds others "
                            "(give the --modules of its build)", field="modules")
        method = trace_method(args, setup)
    result = trace_with_index(index, setup.model, CausalLMTask(args.measurement), setup.sequences, query,
                              setup.tokenizer, top=args.top, rerank=args.rerank, method=method, rank=args.rank)
    if distributed.rank() == 0:
        maybe_write_report(args, result, "trace")
        print(json.dumps(result) if args.json else format_trace(result))
    return 0


def extend_trace_parser(p: argparse.ArgumentParser) -> None:
    """Give ``influent trace`` the index flags (``--index``, ``--rerank``, ``--device``, ``--distributed``):
    with ``--index`` it answers from the index (:func:`cmd_trace_index`), without it as before."""
    add_index_options(p, build=False)
    p.set_defaults(model="lm")
    plain = p.get_default("func")

    def dispatch(args: argparse.Namespace) -> int:
        if args.index is not None:
            return cmd_trace_index(args)
        for flag, given in (("--rerank", args.rerank is not None), ("--device", args.device != "cpu"),
                            ("--distributed", args.distributed)):
            if given:
                raise UserError(f"{flag} applies with --index only")
        return plain(args)

    p.set_defaults(func=dispatch)
