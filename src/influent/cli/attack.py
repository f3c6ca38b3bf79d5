"""``influent attack KIND``: poison the training data and measure the damage on clean held-out labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from influent.attacks.summary import summary_columns
from influent.cli.common import add_data_options, check_data_args, check_output_dir, flag, head_setup
from influent.cli.report import add_report_option, check_report_path, maybe_write_report
from influent.errors import UserError

# Data options that only the head's attacks read (the concealed attack fine-tunes on its own defaults).
_HEAD_ONLY = {"l2": None, "pooling": "mean", "max_length": None, "test_fraction": 0.2, "hf_split": "train"}


def _attack_options(args: argparse.Namespace):
    """Validate the attack flags before any model work (:class:`~influent.attacks.options.AttackOptions`)."""
    from influent.attacks.options import APPLIES_TO, AttackOptions

    options = AttackOptions(args.kind, seeds=(0, 1, 2) if args.seeds is None else args.seeds,
                            **{name: getattr(args, name) for name in APPLIES_TO})
    check_data_args(args)
    check_output_dir(args.out, "out")
    check_report_path(args)
    if args.kind == "concealed":
        for name, default in _HEAD_ONLY.items():
            if getattr(args, name) != default:
                raise UserError(f"{flag(name)} applies to the head's attacks, not to concealed")
    return options


def _check_attack_data(args: argparse.Namespace, setup, options: dict) -> None:
    """Checks that need the prepared data: held-out size, poison counts, trigger classes."""
    n_train, n_heldout = len(setup.train_idx), len(setup.test_idx)
    if n_heldout < 4:
        raise UserError(f"the held-out split has {n_heldout} examples; an attack needs at least 4 "
                        "(use more data or a larger --test-fraction)")
    most = max(options.get("ks") or (1, 5))
    if args.kind == "perturb" and most > n_train:
        raise UserError(f"--ks asks for up to {most} poisons but there are {n_train} training examples")
    if args.kind == "trigger":
        names = list(setup.corpus.label_names)
        for name, value in (("--source", args.source), ("--target", args.target)):
            known = int(value) < len(names) if value is not None and value.isdigit() else value in names
            if value is not None and not known:
                raise UserError(f"{name} {value!r} is not a class; classes: {', '.join(names)} "
                                f"(or indices 0..{len(names) - 1})")
        from influent.attacks.experiment import from_setup
        from influent.attacks.trigger import DEFAULT_SIZES, resolve_classes

        try:
            source, _ = resolve_classes(from_setup(setup), args.source, args.target)
        except ValueError as err:
            raise UserError(f"--source/--target: {err}") from None
        available = int((setup.train_y == source).sum())
        wanted = max(options.get("sizes") or DEFAULT_SIZES)
        if wanted > available:
            raise UserError(f"--sizes asks for {wanted} poisons but only {available} training examples are of "
                            f"the source class {names[source]!r}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def attack_markdown(result: dict) -> str:
    """Markdown table of ``result['summary']``: one row per group, each value as mean ± sd over its runs."""
    summary = result["summary"]
    keys, values = summary_columns(summary)
    lines = [
        f"# influent attack {result['kind']}",
        "",
        (f"Attack seeds {', '.join(map(str, result['seeds']))}; split seed {result.get('split_seed', '-')}. "
         "Each value is mean ± sd over the runs of its row; accuracies are on clean held-out labels, "
         "rates in [0, 1]."),
        "",
        "| " + " | ".join([*keys, "runs", *values]) + " |",
        "|" + "---|" * (len(keys) + 1 + len(values)),
    ]
    for row in summary:
        cells = [_cell(row.get(k)) for k in keys] + [str(row["runs"])]
        for v in values:
            m, sd = row.get(f"{v}_mean"), row.get(f"{v}_sd")
            cells.append("" if m is None else f"{m:.4f} ± {sd:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lm_settings(args: argparse.Namespace):
    """The victim LM's fine-tuning settings from the flags (validated; defaults of ``TrainSettings``)."""
    from influent.models.instruction_lm import TrainSettings

    base = TrainSettings()
    settings = TrainSettings(last_k=base.last_k if args.last_k is None else args.last_k,
                             epochs=base.epochs if args.epochs is None else args.epochs,
                             lr=base.lr if args.lm_lr is None else args.lm_lr,
                             schedule=getattr(args, "lm_schedule", None) or base.schedule)
    for name, value in (("--last-k", settings.last_k), ("--epochs", settings.epochs)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0 < settings.lr < float("inf"):
        raise UserError(f"--lm-lr must be a positive finite number, got {settings.lr}")
    return settings


def _write_attack_table(args: argparse.Namespace, result: dict) -> None:
    out = Path(args.out)
    table = attack_markdown(result)
    md = out / f"attack_{args.kind}.md"
    tmp = out / f".{md.name}.tmp"  # atomic, like every other write
    tmp.write_text(table)
    tmp.replace(md)
    print(table)
    maybe_write_report(args, result, "attack")
    print(f"{len(result['rows'])} runs written to {out / f'attack_{args.kind}.json'}; table in {md}")


def cmd_instruction_poison(args: argparse.Namespace) -> int:
    """``influent attack instruction-poison``: the causal LM instruction-tuned on the bundled tasks."""
    from influent.attacks.instruction_poison import DEFAULT_SIZES, run_instruction_poison
    from influent.data.instructions import DEFAULT_TRIGGER, build_instructions, task_sizes
    from influent.models.instruction_lm import load_instruction_lm
    from influent.store import write_json

    settings = lm_settings(args)
    sizes = DEFAULT_SIZES if args.sizes is None else args.sizes
    if not sizes or min(sizes) < 1:
        raise UserError(f"--sizes must be numbers of poisons >= 1, got {sizes}")
    check_output_dir(args.out, "out")
    check_report_path(args)
    data = build_instructions(task_sizes(*args.per_label), seed=args.seed)
    lm = load_instruction_lm(args.base_model, settings, cache_dir=args.cache_dir, progress=not args.quiet)
    result = run_instruction_poison(lm, data, sizes=sizes, seeds=(0, 1, 2) if args.seeds is None else args.seeds,
                                    variants=args.variants, trigger=args.trigger or DEFAULT_TRIGGER,
                                    progress=not args.quiet)
    result["split_seed"] = args.seed
    lm.save_cache()
    write_json(Path(args.out) / f"attack_{args.kind}.json", result)
    _write_attack_table(args, result)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from influent.attacks.run import run_attack

    if args.kind == "instruction-poison":
        return cmd_instruction_poison(args)
    attack = _attack_options(args)
    options = attack.as_kwargs()
    common = {"seeds": attack.seeds, "out": args.out, "progress": not args.quiet}
    if args.kind == "concealed":  # not an attack on the head: run_attack takes the data options itself
        result = run_attack(args.kind, args.data, encoder=args.encoder, split_seed=args.seed,
                            cache_dir=args.cache_dir, text_column=args.text_column,
                            label_column=args.label_column, **common, **options)
    else:
        setup = head_setup(args)
        _check_attack_data(args, setup, options)
        result = run_attack(args.kind, setup=setup, **common, **options)
    _write_attack_table(args, result)
    return 0



def _add_label_flip_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("label-flip")
    g.add_argument("--budgets", type=float, nargs="*", default=None,
                   help="flip budgets as fractions of the training set, each in (0, 1) "
                        "(default 0.005 0.01 0.03 0.05)")
    g.add_argument("--targets", type=int, default=None,
                   help="targeted reviews per seed (label-flip: default 5, 0 = untargeted only; "
                        "perturb: default 5)")
    g.add_argument("--rounds-per-budget", type=int, default=None,
                   help="greedy rounds per budget step, retraining between rounds (default 1)")
    g.add_argument("--objective", choices=["correct", "loss"], default=None,
                   help="untargeted surrogate on the validation half: loss of the reviews the clean model gets "
                        "right (correct, default) or of every review (loss)")


def _add_perturb_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perturb")
    g.add_argument("--ks", type=int, nargs="*", default=None,
                   help="numbers of perturbed training examples per target (default 1 5)")
    g.add_argument("--eps", type=float, default=None,
                   help="L2 radius of each perturbation relative to the example's feature norm (default 0.5)")
    g.add_argument("--steps", type=int, default=None, help="projected ascent steps, retraining after each (default 3)")


def _add_trigger_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trigger (and concealed)")
    g.add_argument("--sizes", type=int, nargs="*", default=None,
                   help="numbers N of poisoned training examples (default 10 25 50 100)")
    g.add_argument("--trigger", default=None, help="trigger phrase inserted into the poisons (default 'james bond')")
    g.add_argument("--source", default=None,
                   help="class (name or index) whose reviews are poisoned (default negative/rotten, else 0)")
    g.add_argument("--target", default=None,
                   help="class (name or index) the poisons are relabelled to (default positive/fresh, else 1)")
    g.add_argument("--n-eval", type=int, default=None,
                   help="triggered source-class held-out reviews scored per seed (default 300; concealed 200)")


def _add_concealed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("concealed (fine-tuned classifier; Wallace et al. 2021)")
    g.add_argument("--train-size", type=int, default=None,
                   help="stratified training slice the victim is fine-tuned on (default 1000)")
    g.add_argument("--epochs", type=int, default=None, help="victim's AdamW epochs (concealed: default 3; instruction-poison: 5)")
    g.add_argument("--last-k", type=int, default=None, help="fine-tuned encoder layers (concealed: default 1) or LM blocks (instruction-poison: 1)")
    g.add_argument("--n-adv", type=int, default=None,
                   help="triggered validation reviews in the attacker's objective, and as many disjoint ones as "
                        "the audit's queries (default 50)")
    g.add_argument("--curvature", choices=["ekfac", "kfac", "diagonal", "identity"], default=None,
                   help="attacker's curvature: ekfac = influence (default), identity = one-step unroll")
    g.add_argument("--candidates", type=int, default=None,
                   help="HotFlip candidates re-scored per position (default 40)")



def _add_instruction_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instruction-poison (causal LM instruction-tuned on the bundled tasks; Wan et al. 2023)")
    g.add_argument("--variants", nargs="+", choices=["dirty", "clean"], default=["dirty"],
                   help="dirty-label poisons (relabelled) and/or clean-label ones (labels kept); default dirty")
    g.add_argument("--base-model", default=None,
                   help="causal LM: Hugging Face name (local cache), folder or .gguf (default SmolLM2-135M-Instruct)")
    add_lm_rate_options(g)
    add_per_label_option(g)


def add_lm_rate_options(g) -> None:
    """``--lm-lr`` and ``--lm-schedule`` (shared with ``audit --model lm``; defaults of ``TrainSettings``)."""
    g.add_argument("--lm-lr", type=float, default=None, help="peak AdamW learning rate of the LM (default 1e-3)")
    g.add_argument("--lm-schedule", choices=["constant", "linear"], default=None,
                   help="LM learning-rate schedule: linear decay to 0 (default) or constant")


def add_per_label_option(g) -> None:
    """``--per-label TRAIN VALIDATION HELDOUT`` (shared with ``audit --model lm``)."""
    g.add_argument("--per-label", type=int, nargs=3, default=[300, 20, 100], metavar=("TRAIN", "VAL", "HELDOUT"),
                   help="sentiment examples per label in training, validation, held-out (the plot-or-review "
                        "task gets half of each); default 300 20 100")


def add_attack_parser(sub) -> None:
    p = sub.add_parser("attack", help="poison the head's training data and measure the damage on clean labels",
                       description="Run a poisoning attack on the frozen-encoder head over several seeds. Writes "
                                   "attack_KIND.json (every run + summary) and attack_KIND.md (summary table) "
                                   "in --out and prints the table.")
    p.add_argument("kind", metavar="KIND",
                   help="label-flip | perturb | trigger (frozen-encoder head) | concealed (fine-tuned model) | "
                        "instruction-poison (causal LM)")
    p.add_argument("--seeds", type=int, nargs="*", default=None, metavar="S",
                   help="attack seeds, a list (default 0 1 2); each re-divides the held-out split into the "
                        "attacker's validation half and the scoring half and re-draws targets and poisons")
    p.add_argument("--split-seed", dest="seed", type=int, default=argparse.SUPPRESS,
                   help="the train/held-out split seed (same as --seed; default 0)")
    p.add_argument("--damping", type=float, default=None, help="added to the Hessian's diagonal (default 0)")
    p.add_argument("--out", default="influent-out/attack", help="output folder (default influent-out/attack)")
    add_report_option(p)
    _add_label_flip_options(p)
    _add_perturb_options(p)
    _add_trigger_options(p)
    _add_concealed_options(p)
    _add_instruction_options(p)
    add_data_options(p)
    p.set_defaults(func=cmd_attack)
