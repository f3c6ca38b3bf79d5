"""Time to score every test review against every training review on the default head, vs pyDVL and kronfluence.

The default head is the L2-regularised logistic regression (one logit, d + 1 = 385 float64 parameters) on
all-MiniLM-L6-v2 mean-pooled embeddings of the bundled Rotten Tomatoes snippets; its objective is
``J(theta) = mean_i BCE(z_i) + (l2/2)||theta||^2`` with ``l2 = 1e-3``. All three libraries score the same
(test, train) pairs with ``score = g_test^T (curvature)^-1 g_train`` over the same parameters:

* influent: exact Hessian of J (holds the ``l2 I`` term), per-example gradients by ``vmap``, one Cholesky
  solve for all test gradients (the s_test trick), one matrix product. No damping.
* pyDVL 0.10 ``DirectInfluence(model, loss=mean BCE, regularization=l2)``: pyDVL forms the Hessian of the
  *mean* loss over the training DataLoader and adds ``regularization * I`` to its diagonal, so
  ``regularization = l2`` gives exactly our matrix ``H_BCE + l2 I``. Scores from ``influences(x_test, y_test,
  x_train, y_train, mode=Up)``, which is ``<H^-1 g_test, g_train>`` (same sign as ours). pyDVL needs
  numpy < 2, so it runs in the separate ``.venv-pydvl`` as a subprocess (this same file with
  ``--pydvl-worker``) that reads features, labels and head weights from a safetensors file and writes its
  scores back to one (nothing pickled).
* kronfluence 1.0.1 EK-FAC over the head's ``nn.Linear`` (bias folded in): its curvature is the true Fisher
  (labels sampled from the model, seeded) of the mean loss without the L2 term, approximated in the
  Kronecker eigenbasis with corrected eigenvalues; ``damping_factor = l2`` (absolute, added to every
  eigenvalue) stands in for the ``l2 I`` of our Hessian. For this model the Fisher equals the Hessian of the
  loss in expectation, so EK-FAC's error is the factorisation (plus the label sampling), not the damping.

Each library's time runs from the trained head and the embeddings in memory to the full
``[n_test, n_train]`` score matrix (kronfluence's includes fitting its factors and writing them to a temp
folder; pyDVL's excludes the subprocess start and file transfer). Correlations are computed per test query
(row) against influent's row and averaged. The last line printed is one JSON object.

Run::

    .venv/bin/python benchmarks/head_scores.py --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PYDVL_PYTHON = REPO / ".venv-pydvl" / "bin" / "python"


# --- pyDVL worker (runs inside .venv-pydvl: imports only torch, safetensors and pydvl) -----------------------
def pydvl_worker(in_path: str, out_path: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # pyDVL 0.10 emits deprecation warnings on import
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(in_path, framework="pt") as f:
        meta = f.metadata()
    data = load_file(in_path)
    torch.set_num_threads(int(meta["threads"]))
    l2, batch_size = float(meta["l2"]), int(meta["batch_size"])

    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import DirectInfluence
    from torch.utils.data import DataLoader, TensorDataset

    def mean_bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], targets)

    train_x, train_y = data["train_x"], data["train_y"].double()
    test_x, test_y = data["test_x"], data["test_y"].double()
    start = time.perf_counter()
    model = torch.nn.Linear(train_x.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(data["weight"])
        model.bias.copy_(data["bias"])
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size)
    influence = DirectInfluence(model, mean_bce, regularization=l2).fit(loader)
    scores = influence.influences(test_x, test_y, train_x, train_y, mode=InfluenceMode.Up)
    seconds = time.perf_counter() - start
    import pydvl

    save_file(
        {"scores": scores.detach().contiguous()},
        out_path,
        metadata={"seconds": repr(seconds), "version": pydvl.__version__},
    )
    return 0


def run_pydvl(setup, threads: int, batch_size: int, folder: Path) -> tuple[torch.Tensor, float, str]:
    """pyDVL's DirectInfluence scores ``[n_test, n_train]`` through the ``.venv-pydvl`` subprocess."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not PYDVL_PYTHON.exists():
        raise FileNotFoundError(f"{PYDVL_PYTHON} is missing; run `make bench` to create .venv-pydvl")
    weight, bias = setup.model.linear.weight.detach(), setup.model.linear.bias.detach()
    in_path, out_path = folder / "pydvl_in.safetensors", folder / "pydvl_out.safetensors"
    tensors = {
        "train_x": setup.train_x,
        "train_y": setup.train_y,
        "test_x": setup.test_x,
        "test_y": setup.test_y,
        "weight": weight,
        "bias": bias,
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(in_path),
        metadata={"l2": repr(setup.task.l2), "threads": str(threads), "batch_size": str(batch_size)},
    )
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [str(PYDVL_PYTHON), str(Path(__file__).resolve()), "--pydvl-worker", str(in_path), str(out_path)]
    subprocess.run(cmd, check=True, env=env)
    with safe_open(str(out_path), framework="pt") as f:
        meta = f.metadata()
        scores = f.get_tensor("scores")
    return scores.double(), float(meta["seconds"]), meta["version"]


# --- kronfluence ---------------------------------------------------------------------------------------
def run_kronfluence(setup, batch_size: int, seed: int, folder: Path) -> tuple[torch.Tensor, float, str]:
    """kronfluence EK-FAC scores ``[n_test, n_train]`` on a copy of the head (damping_factor = l2)."""
    import copy
    import logging

    import kronfluence
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KronTask
    from torch.utils.data import TensorDataset

    class BinaryHeadTask(KronTask):
        """Summed BCE of the one-logit head (kronfluence sums over the batch); query measurement = loss."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)[:, 0]
            if sample:  # true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.bernoulli(torch.sigmoid(logits))
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)[:, 0]
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="sum")

    import warnings

    warnings.filterwarnings("ignore", message=".*GradScaler.*")  # kronfluence 1.0.1 on CPU
    f64 = torch.float64
    torch.manual_seed(seed)
    train_ds = TensorDataset(setup.train_x, setup.train_y)
    test_ds = TensorDataset(setup.test_x, setup.test_y)
    start = time.perf_counter()
    task = BinaryHeadTask()
    model = prepare_model(copy.deepcopy(setup.model), task)
    analyzer = Analyzer(
        "head_scores",
        model,
        task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=str(folder / "kronfluence"),
    )
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=False,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    analyzer.fit_all_factors(
        "ekfac",
        train_ds,
        per_device_batch_size=batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    score_args = ScoreArguments(
        damping_factor=setup.task.l2, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
    )
    analyzer.compute_pairwise_scores(
        "pairwise",
        "ekfac",
        test_ds,
        train_ds,
        per_device_query_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    seconds = time.perf_counter() - start
    return scores.double(), seconds, kronfluence.__version__


# --- influent ------------------------------------------------------------------------------------------
def run_influent(setup) -> tuple[torch.Tensor, float]:
    """influent's exact scores ``[n_test, n_train]``: per-example grads, one Cholesky solve, one matmul."""
    start = time.perf_counter()
    engine = setup.engine("exact")
    scores = engine.pairwise_scores(setup.test_batch)
    seconds = time.perf_counter() - start
    return scores, seconds, engine.last_solution.residual


def row_correlations(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean over rows of Pearson and Spearman (ranks; ties broken by order) and the worst row Pearson."""

    def pearson(u, v):
        u = u - u.mean(1, keepdim=True)
        v = v - v.mean(1, keepdim=True)
        return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))

    def ranks(u):
        return u.argsort(1).argsort(1).double()

    p = pearson(a, b)
    s = pearson(ranks(a), ranks(b))
    return float(p.mean()), float(s.mean()), float(p.min())


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--pydvl-worker"]:
        return pydvl_worker(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds kronfluence's sampled Fisher labels")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (all three libraries)")
    parser.add_argument("--batch-size", type=int, default=2048, help="pyDVL / kronfluence batch size")
    parser.add_argument("--peers", default="pydvl,kronfluence", help="comma-separated: pydvl,kronfluence")
    parser.add_argument(
        "--cache-dir", default=None, help="influent cache (default $INFLUENT_CACHE_DIR or ~/.cache/influent)"
    )
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ("pydvl", "kronfluence")]
    if unknown:
        print(
            f"error: unknown peer {unknown[0]!r} in --peers; choose from pydvl, kronfluence", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)

    from influent.pipeline import prepare_head

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    setup = prepare_head(cache_dir=args.cache_dir)
    n_train, n_test = len(setup.train_y), len(setup.test_y)
    log(f"default head: {n_train} training x {n_test} test reviews, {setup.train_x.shape[1] + 1} parameters")
    ours, ours_s, residual = run_influent(setup)
    log(f"influent exact: {ours_s:.2f}s (solve residual {residual:.1e})")
    out = {
        "n_train": n_train,
        "n_test": n_test,
        "params": setup.train_x.shape[1] + 1,
        "l2": setup.task.l2,
        "threads": args.threads,
        "seed": args.seed,
        "influent_seconds": ours_s,
        "influent_residual": residual,
    }
    with tempfile.TemporaryDirectory(prefix="influent-bench-") as tmp:
        for peer in peers:
            if peer == "pydvl":
                scores, secs, version = run_pydvl(setup, args.threads, args.batch_size, Path(tmp))
            else:
                scores, secs, version = run_kronfluence(setup, args.batch_size, args.seed, Path(tmp))
            if scores.shape != ours.shape:
                raise RuntimeError(
                    f"{peer} returned scores of shape {tuple(scores.shape)}, expected {tuple(ours.shape)}"
                )
            pearson, spearman, worst = row_correlations(scores, ours)
            rel = float((scores - ours).norm() / ours.norm())
            out[peer] = {
                "version": version,
                "seconds": secs,
                "time_ratio": secs / ours_s,
                "pearson": pearson,
                "spearman": spearman,
                "pearson_min": worst,
                "relative_difference": rel,
            }
            log(
                f"{peer} {version}: {secs:.2f}s = {secs / ours_s:.1f}x influent; per-query pearson {pearson:.6f} "
                f"(min {worst:.6f}) spearman {spearman:.6f}; ||peer - ours|| / ||ours|| = {rel:.2e}"
            )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
