"""Fidelity of influence estimates on the bundled data: what `influent validate` runs, as a script.

    .venv/bin/python benchmarks/fidelity_validate.py --model head --examples 30 --subsets 50 --queries 5 --seed 0
    .venv/bin/python benchmarks/fidelity_validate.py --model finetuned --fine-tune-last 1 --train-size 300 \
        --examples 6 --subsets 0 --queries 3 --epochs 1 --seed 0

Writes OUT/validate.{md,json} and OUT/scatter-*.png and prints the Markdown table. Retraining results are
cached under $INFLUENT_CACHE_DIR/validate (or ~/.cache/influent/validate), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from influent.evaluation.validate import run_validate


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
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.perf_counter()
    run_validate(
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
        out=a.out,
        seed=a.seed,
    )
    print(Path(a.out, "validate.md").read_text())
    print(f"seconds: {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
