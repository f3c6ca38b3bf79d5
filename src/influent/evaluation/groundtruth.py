"""Ground truth for influence estimates: actual changes of query measurements under retraining.

:class:`GroundTruth` computes, for a trained model and a set of queries,

* :meth:`~GroundTruth.leave_one_out`: remove one training example, retrain cold or warm (see
  :mod:`influent.models.training`), measure each query;
* :meth:`~GroundTruth.pbrf`: solve the proximal Bregman response function for the example
  (:mod:`influent.evaluation.pbrf`), measure each query;
* :meth:`~GroundTruth.remove_groups`: retrain on subsets (linear datamodeling score).

Every result is an actual change ``f(z_q; theta_new) - f(z_q; theta_s)`` in the units of the query
measurement (the query loss by default), directly comparable with ``ExactInfluence.loss_change`` for
removal. Each retrained result is cached (one atomic safetensors file) so a run can be interrupted and
resumed; the cache folder is keyed by the model's parameters, the retraining settings and the queries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent.errors import NumericalError, UserError
from influent.evaluation.cache import RetrainCache
from influent.evaluation.pbrf import PBRF
from influent.gradients import ParameterSpace
from influent.models.training import Trainer
from influent.progress import progress_iter
from influent.store import fingerprint
from influent.task import Batch, Task

STARTS = ("cold", "warm")


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Stable digest of tensor contents (for cache keys)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def batch_digest(batch: Batch) -> str:
    """Stable digest of every tensor in a batch pytree."""
    if isinstance(batch, torch.Tensor):
        return tensor_digest(batch)
    if isinstance(batch, dict):
        return fingerprint({k: batch_digest(v) for k, v in sorted(batch.items())})
    return fingerprint([batch_digest(v) for v in batch])


class GroundTruth:
    """Actual query changes under leave-one-out, PBRF and group-removal retraining.

    Args:
        model: the trained model (its tracked parameters are ``theta_s``; never modified).
        task: its task.
        train_batch: all n training examples.
        query_batch: the Q queries whose measurement (``Task.query_measurement``) is tracked.
        trainer: retraining procedure for leave-one-out and groups (None: PBRF only).
        damping: PBRF proximity coefficient (added to ``task.l2``); use the influence engine's damping.
        pbrf_method: ``'gauss_newton'``, ``'newton'`` or ``'lbfgs'`` (see :meth:`PBRF.solve`).
        pbrf_tol: gradient-norm tolerance of the PBRF solve.
        pbrf_max_iter: iteration cap of the PBRF solve.
        cache_dir: root of the retraining cache (None: no caching).
        store_params: also cache the retrained parameters when the model has at most this many.
        use_baseline: measure retraining changes against the same retraining on all examples
            (:meth:`baseline`) instead of against ``theta_s``.
        pbrf_options: extra keyword arguments of :meth:`PBRF.solve` (e.g. epochs, lr for ``method='adam'``).
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_batch: Batch,
        query_batch: Batch,
        trainer: Trainer | None = None,
        *,
        damping: float = 0.0,
        pbrf_method: str = "gauss_newton",
        pbrf_tol: float = 1e-10,
        pbrf_max_iter: int = 100,
        cache_dir: str | Path | None = None,
        store_params: int = 100_000,
        use_baseline: bool = True,
        pbrf_options: dict | None = None,
        progress: bool = True,
    ):
        self.model, self.task = model, task
        self.train_batch, self.query_batch = train_batch, query_batch
        self.trainer = trainer
        self.damping = float(damping)
        self.pbrf_method, self.pbrf_tol, self.pbrf_max_iter = pbrf_method, pbrf_tol, pbrf_max_iter
        self.progress = progress
        self.space = ParameterSpace(model, task)
        self.theta_s = self.space.flat()
        self.n = task.batch_size(train_batch)
        self.base = self.measure(self.theta_s)
        self.store_params = self.space.dim <= store_params
        self.infos: dict[str, dict] = {}
        self._pbrf: PBRF | None = None
        self._baselines: dict[str, torch.Tensor] = {}
        self.use_baseline = use_baseline
        self.pbrf_options = dict(pbrf_options or {})
        if cache_dir is not None:
            key = fingerprint(
                tensor_digest(self.theta_s),
                batch_digest(train_batch),
                batch_digest(query_batch),
                type(model).__name__,
                type(task).__name__,
                task.l2,
            )
            self._root = Path(cache_dir) / key
        else:
            self._root = None

    # --- helpers ---------------------------------------------------------------------------------------------
    def measure(self, theta: torch.Tensor) -> torch.Tensor:
        """Query measurements ``[Q]`` at flat parameters ``theta``."""
        return self.space.loss_values(self.query_batch, theta, "measure").detach()

    def _cache(self, kind: str, settings: dict) -> RetrainCache:
        if self._root is None:
            return RetrainCache(None)
        return RetrainCache(self._root / f"{kind}-{fingerprint(settings)}")

    def _run(
        self,
        kind: str,
        settings: dict,
        names: list[str],
        compute,
        desc: str,
        base: torch.Tensor | None = None,
    ) -> np.ndarray:
        base = self.base if base is None else base
        cache = self._cache(kind, settings)
        rows = []
        for name in progress_iter(names, desc, enabled=self.progress):
            hit = cache.get(name)
            if hit is not None:
                tensors, info = hit
            else:
                theta, info = compute(name)
                if not torch.isfinite(theta).all():
                    raise NumericalError(f"{kind} retraining for {name} produced non-finite parameters")
                tensors = {"measure": self.measure(theta)}
                if self.store_params:
                    tensors["theta"] = theta
                cache.put(name, tensors, info)
            self.infos[f"{kind}/{name}"] = info
            rows.append((tensors["measure"] - base).numpy())
        return np.stack(rows) if rows else np.zeros((0, len(self.base)))

    def _need_trainer(self) -> Trainer:
        if self.trainer is None:
            raise ValueError("this GroundTruth has no trainer: pass trainer= for retraining")
        return self.trainer

    # --- ground truths ---------------------------------------------------------------------------------------
    def baseline(self, start: str) -> torch.Tensor:
        """Measurements ``[Q]`` after retraining on *all* examples from ``start`` (cached).

        Leave-one-out and group changes are taken against this, so retraining effects that do not depend on
        the removal (continuing to train a network that is not at an optimum, a replay that is not bitwise
        identical to the original run) cancel. For a convex model trained to the optimum it equals ``f(theta_s)``.
        """
        if start in self._baselines:
            return self._baselines[start]
        trainer = self._need_trainer()
        init = trainer.init_theta if start == "cold" else self.theta_s
        settings = {"start": start, "trainer": trainer.settings, "init": tensor_digest(init)}
        cache = self._cache(f"baseline-{start}", settings)
        hit = cache.get("all")
        if hit is None:
            theta, info = trainer.fit(self.train_batch, torch.arange(self.n), init)
            measure = self.measure(theta)
            info = {**info, "distance_to_theta_s": float((theta - self.theta_s).norm())}
            cache.put("all", {"measure": measure}, info)
        else:
            measure, info = hit[0]["measure"], hit[1]
        self.infos[f"baseline-{start}"] = info
        self._baselines[start] = measure
        return measure

    def leave_one_out(self, indices: list[int], start: str = "cold") -> np.ndarray:
        """Actual change ``[k, Q]`` of each query when each training example in ``indices`` is removed.

        Args:
            indices: training rows to remove (one at a time).
            start: ``'cold'`` (the trainer's original initialisation) or ``'warm'`` (``theta_s``).
        """
        if start not in STARTS:
            raise UserError(f"unknown start {start!r}; choose cold or warm", field="start")
        trainer = self._need_trainer()
        init = trainer.init_theta if start == "cold" else self.theta_s

        def compute(name):
            i = int(name.split("-")[1])
            keep = torch.tensor([j for j in range(self.n) if j != i], dtype=torch.long)
            return trainer.fit(self.train_batch, keep, init)

        settings = {"start": start, "trainer": trainer.settings, "init": tensor_digest(init)}
        names = [f"example-{int(i)}" for i in indices]
        base = self.baseline(start) if self.use_baseline else None
        return self._run(f"loo-{start}", settings, names, compute, f"leave-one-out ({start} start)", base)

    def pbrf(self, indices: list[int], eps: float | None = None) -> np.ndarray:
        """Query change ``[k, Q]`` at the PBRF solution for each example (``eps`` None = ``-1/n``, removal)."""
        if self._pbrf is None:
            self._pbrf = PBRF(self.model, self.task, self.train_batch, damping=self.damping)
        solver = self._pbrf

        def compute(name):
            i = int(name.split("-")[1])
            return solver.solve(
                i, eps, self.pbrf_method, self.pbrf_tol, self.pbrf_max_iter, **self.pbrf_options
            )

        settings = {
            "damping": self.damping,
            "eps": eps,
            "method": self.pbrf_method,
            "tol": self.pbrf_tol,
            "max_iter": self.pbrf_max_iter,
            **self.pbrf_options,
        }
        names = [f"example-{int(i)}" for i in indices]
        return self._run("pbrf", settings, names, compute, "PBRF")

    def remove_groups(self, keep_masks: np.ndarray, start: str = "warm") -> np.ndarray:
        """Actual change ``[m, Q]`` when the model is retrained on each subset (``keep_masks`` ``[m, n]`` bool)."""
        if start not in STARTS:
            raise UserError(f"unknown start {start!r}; choose cold or warm", field="start")
        trainer = self._need_trainer()
        init = trainer.init_theta if start == "cold" else self.theta_s
        masks = np.asarray(keep_masks, dtype=bool)
        names = [f"subset-{fingerprint(np.flatnonzero(m).tolist())}" for m in masks]
        by_name = dict(zip(names, masks))

        def compute(name):
            keep = torch.as_tensor(np.flatnonzero(by_name[name]), dtype=torch.long)
            return trainer.fit(self.train_batch, keep, init)

        settings = {"start": start, "trainer": trainer.settings, "init": tensor_digest(init)}
        base = self.baseline(start) if self.use_baseline else None
        return self._run(f"groups-{start}", settings, names, compute, f"subset retraining ({start})", base)
