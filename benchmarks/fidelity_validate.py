"""Fidelity of influence estimates on the bundled data: what `influent validate` runs, as a script.

    .venv/bin/python benchmarks/fidelity_validate.py --model head --examples 30 --subsets 50 --queries 5 --seed 0
    .venv/bin/python benchmarks/fidelity_validate.py --model finetuned --fine-tune-last 1 --train-size 500 \
        --max-length 32 --examples 24 --subsets 50 --queries 5 --epochs 1 --pbrf-epochs 2 --seed 0

The fine-tuned model caches the frozen prefix's hidden states and retrains only the trainable suffix
(``--no-frozen-prefix`` / ``--no-first-token`` turn the two speed-ups off; see docs/fidelity.md).

Writes OUT/validate.{md,json} and OUT/scatter-*.png and prints the Markdown table. Retraining results are
cached under $INFLUENT_CACHE_DIR/validate (or ~/.cache/influent/validate), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from influent.evaluation.validate import run_validate
from influent.report.fidelity import write_validation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["head", "finetuned"], default="head")
    p.add_argument("--strategy", nargs="+", default=["identity", "diagonal", "kfac", "ekfac"])
    p.add_argument("--solver", nargs="+", default=["exact", "cg", "lissa"])
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fine-tune-last", type=int, default=1)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--out", default="fidelity-out")
    p.add_argument("--lr", type=float, default=None, help="finetuned: AdamW learning rate (default 5e-5)")
    p.add_argument("--batch-size", type=int, default=None, help="finetuned: minibatch size (default 32)")
    p.add_argument("--max-length", type=int, default=None, help="finetuned: tokens per text (default 48)")
    p.add_argument("--pbrf-epochs", type=int, default=None, help="finetuned: SGD passes of the PBRF solve")
    p.add_argument("--no-frozen-prefix", action="store_true", help="finetuned: run the full model each step")
    p.add_argument(
        "--no-first-token", action="store_true", help="finetuned: retrain with the whole last layer"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    extra = {}
    if a.model == "finetuned":
        for name in ("lr", "batch_size", "max_length", "pbrf_epochs"):
            if getattr(a, name) is not None:
                extra[name] = getattr(a, name)
        extra["frozen_prefix"] = not a.no_frozen_prefix
        extra["first_token"] = not a.no_first_token
    t0 = time.perf_counter()
    result = run_validate(
        a.model,
        strategies=a.strategy,
        solvers=a.solver,
        examples=a.examples,
        subsets=a.subsets,
        queries=a.queries,
        epochs=a.epochs,
        fine_tune_last=a.fine_tune_last,
        train_size=a.train_size,
        damping=a.damping,
        seed=a.seed,
        **extra,
    )
    write_validation(result, a.out)
    print(Path(a.out, "validate.md").read_text())
    print(f"seconds: {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
