"""``influent demo``: the main job on the bundled data: train, evaluate, explain."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from influent.cli.common import add_data_options, check_data_args, check_output_dir, checked, head_setup
from influent.cli.demo_lm import cmd_demo_lm


def cmd_demo(args: argparse.Namespace) -> int:
    if args.kind == "lm":
        return cmd_demo_lm(args)
    from influent.explain import Query, explain, format_explanation
    from influent.store import write_json

    start = time.perf_counter()
    checked("top", args.top, low=1, integer=True)
    check_data_args(args)
    check_output_dir(args.out, "out")
    out = Path(args.out)
    print("influent demo: frozen all-MiniLM-L6-v2 + L2 logistic regression on Rotten Tomatoes snippets")
    setup = head_setup(args)
    info = setup.info
    print(f"  train {info['n_train']} / test {info['n_test']} (split seed {args.seed}); head gradient norm "
          f"{info['grad_norm']:.1e}; test accuracy {info['test_accuracy']:.4f}")
    picks = [0, 1, 2]
    queries = [Query(setup.corpus.texts[setup.test_idx[i]], setup.test_x[i], None, int(setup.test_y[i]))
               for i in picks]
    results = explain(setup.influence(), setup, queries, top=args.top)
    for i, r in zip(picks, results):
        print(f"\n=== test review {i} ===")
        print(format_explanation(r))
    write_json(out / "demo_explanations.json", {"model": info, "explanations": results})
    print(f"\nOutputs: {out / 'demo_explanations.json'}; model and caches under {setup.folder.parent.parent}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the bundled data: train, evaluate, explain "
                                    "(demo lm: trace a fine-tuned causal LM)")
    p.add_argument("kind", nargs="?", choices=["head", "lm"], default="head",
                   help="head (default): the sentiment classifier; lm: fine-tune and trace the default causal LM")
    p.add_argument("--out", default="influent-out", help="output folder (default influent-out)")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--lm-pairs", type=int, default=48,
                   help="demo lm: instruction pairs drawn from the bundled corpus (2 held out as queries; default 48)")
    add_data_options(p)
    p.set_defaults(func=cmd_demo)
