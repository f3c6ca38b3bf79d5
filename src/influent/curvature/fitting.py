"""Fitting factored curvature over ``nn.Linear`` modules, with a cache and resumable passes.

Curvature is the Fisher / Gauss-Newton matrix of the training objective (mean loss over n examples),
restricted to a block per tracked module (the weight and bias of one ``nn.Linear``), approximated by a
registered strategy (:mod:`influent.curvature.strategies`: identity, diagonal, K-FAC, EK-FAC).

Fisher type: ``empirical`` differentiates the loss at the training labels; ``true`` at labels sampled
from the model's predictive distribution (``Task.sampled_loss``, seeded per example, so independent of
batching).

Damping (added to every eigenvalue / diagonal entry, per module): absolute (``damping=float``) or
heuristic (``damping=None``: ``damping_fraction * mean eigenvalue`` of that module, kronfluence's rule).
``task.l2`` (ridge on the objective) is added on top. Units: loss per squared parameter unit.

Factors are cached under ``cache_dir/factors/<key>/`` (``factors.safetensors`` + ``manifest.json``,
atomic, checksummed writes; the manifest pins the checksum of its factors file). An interrupted fit resumes from the last checkpoint of partial sums (every
``checkpoint_every`` batches; :mod:`influent.curvature.passes`). A cache file that cannot be read is
recomputed with a one-line warning, never used.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from influent import distributed, store
from influent.curvature.config import FactorConfig
from influent.curvature.factors import Factors
from influent.curvature.fingerprints import data_fingerprint, model_fingerprint
from influent.curvature.linear_grads import module_shapes, select_linear_modules
from influent.curvature.passes import FitContext
from influent.curvature.strategies import EIGEN_FILE, get_strategy
from influent.curvature.token_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MEMORY_BYTES,
    MemoryTokens,
    estimated_bytes,
    open_cache,
)
from influent.errors import CacheCorruptError, UserError
from influent.task import Batch, Task, length_buckets

FORMAT_VERSION = 2  # 2: padding rows skipped in the fit (factors of version 1 counted them)
FACTORS_FILE = "factors.safetensors"
MANIFEST_FILE = "manifest.json"
FACTORS_CHECKSUM = "factors_sha256"  # manifest entry: the checksum of the factors file it belongs to


def fit_factors(
    model: nn.Module,
    task: Task,
    batches: Sequence[Batch],
    config: FactorConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    checkpoint_every: int = 32,
    progress: bool = True,
    data_id: str | None = None,
    bucket: bool = True,
    train_cache: str | Path | None = None,
    train_cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
    memory_max_bytes: int | None = DEFAULT_MEMORY_BYTES,
    memory_tokens: MemoryTokens | None = None,
) -> Factors:
    """Fit (or load from the cache) the factored curvature of ``task``'s training loss.

    Args:
        model: the trained model (put in eval mode during the fit, restored afterwards).
        task: per-example loss (and, for the true Fisher, ``sampled_loss``).
        batches: the training data as a sequence of batches (re-iterated once per pass; order fixed).
        config: strategy, modules, Fisher type, damping, seed (None: ``FactorConfig()``).
        cache_dir: folder of the factor cache (``None``: no caching / no resume).
        checkpoint_every: save partial sums every this many batches (resume granularity).
        progress: show a progress bar.
        data_id: fingerprint of the training data; default: hash of every tensor in ``batches``.
        bucket: run the passes over the examples re-formed by length with less padding
            (:func:`~influent.task.length_buckets`, dict batches with a right-padded ``attention_mask``);
            the factors are the same up to rounding (sums over examples) and share the cache entry.
        train_cache: folder of the training token cache (:mod:`influent.curvature.token_cache`). A fit
            whose last pass computes the training tokens in the final eigenbasis (EK-FAC) with the
            empirical Fisher writes them there, so that scoring ``batches`` with the same ``train_cache``
            runs no pass over them. Other fits write nothing (the first scoring does). None: no token cache.
        train_cache_max_bytes: do not write a token cache estimated larger than this (None: no limit).
        memory_max_bytes: one-pass EK-FAC: when the tracked modules' captured training tokens are
            estimated (:func:`~influent.curvature.token_cache.estimated_bytes`, padding included) at
            most this many bytes, the covariance pass keeps them in memory and the eigenvalue correction
            is computed from them with no second forward/backward pass (same factors). Above it, or 0,
            the fit runs two passes. None: no limit. Default 2 GiB. Other strategies run one pass anyway.
        memory_tokens: a :class:`~influent.curvature.token_cache.MemoryTokens` to keep them in instead
            (its ``max_bytes`` is then the budget): after a one-pass or two-pass EK-FAC fit that ran
            over all of ``batches`` it holds every batch's tokens in the final eigenbasis, as the passes
            form them (for scoring the same batches with no pass; empty otherwise).

    Returns:
        :class:`Factors` over ``n = sum of batch sizes`` examples (averages, matching the mean loss).
    """
    config = config or FactorConfig()
    config.validate()
    strategy = get_strategy(config.strategy)
    modules = select_linear_modules(model, config.modules)
    shapes = module_shapes(modules)
    n = int(sum(task.batch_size(b) for b in batches))
    if n == 0:
        raise UserError("no training examples to fit factors on")
    data_fp = data_id or data_fingerprint(batches)
    model_fp = model_fingerprint(model)
    l2 = float(task.l2 or 0.0)
    key = store.fingerprint(FORMAT_VERSION, asdict(config), list(shapes.items()), data_fp, model_fp, l2, n)
    folder = None if cache_dir is None else Path(cache_dir) / "factors" / key
    if memory_tokens is not None:
        memory_tokens.clear()
    cached = _load(folder, config)
    if cached is not None:
        return cached

    rebatched = length_buckets(batches) if bucket and strategy.has_passes else None
    fit_batches, order = rebatched if rebatched is not None else (batches, None)
    tokens = None
    if train_cache is not None and strategy.token_factors_in_fit and config.fisher == "empirical":
        tokens = open_cache(
            train_cache, task=task, factors_key=key, modules=modules, train_batches=batches,
            pass_batches=fit_batches, bucket=bucket, max_bytes=train_cache_max_bytes,
            train_fingerprint=data_fp if data_id is None else None,
        )  # fmt: skip
    ctx = FitContext(
        model=model, task=task, batches=fit_batches, modules=modules, shapes=shapes, fisher=config.fisher,
        label=f"fit {config.strategy}", damping=config.damping, damping_fraction=config.damping_fraction,
        folder=folder, checkpoint_every=checkpoint_every, uniforms=_uniforms(config, n, order), order=order,
        progress=progress, tokens=tokens,
        memory=_memory(strategy, task, fit_batches, modules, memory_max_bytes, memory_tokens),
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        tensors, damping = strategy.fit(ctx)
    finally:
        model.train(was_training)
    manifest = _manifest(
        config, modules, shapes, {k: v + l2 for k, v in damping.items()}, l2, n, data_fp, model_fp, key
    )
    if distributed.rank() == 0:  # under torch.distributed every rank holds the same factors; one writes them
        _save(folder, tensors, manifest)
    return Factors(config, manifest, tensors)


def _memory(strategy, task, batches, modules, max_bytes, memory: MemoryTokens | None) -> MemoryTokens | None:
    """The store an EK-FAC fit keeps its captures in (``memory``, or a new one of ``max_bytes``), if they fit."""
    if not strategy.token_factors_in_fit or (memory is None and max_bytes == 0):
        return None
    memory = memory if memory is not None else MemoryTokens(max_bytes)
    itemsize = next(iter(modules.values())).weight.element_size()
    return memory if memory.reserve(estimated_bytes(task, batches, modules, itemsize)) else None


def _uniforms(config: FactorConfig, n: int, order: torch.Tensor | None) -> torch.Tensor | None:
    """Per example of the passes, the uniform its sampled label is drawn at (true Fisher; else None)."""
    if config.fisher != "true":
        return None
    gen = torch.Generator().manual_seed(int(config.seed))
    uniforms = torch.rand(n, generator=gen, dtype=torch.float64)
    return uniforms if order is None else uniforms[order.cpu()]  # each example keeps its own sampled label


def _manifest(config, modules, shapes, damping, l2, n, data_fp, model_fp, key) -> dict:
    return {
        "format": FORMAT_VERSION,
        "strategy": config.strategy,
        "module_spec": config.modules,
        "modules": list(modules),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "fisher": config.fisher,
        "damping": config.damping,
        "damping_fraction": config.damping_fraction,
        "damping_per_module": damping,
        "l2": l2,
        "seed": config.seed,
        "n_examples": n,
        "data_fingerprint": data_fp,
        "model_fingerprint": model_fp,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _load(folder: Path | None, config: FactorConfig) -> Factors | None:
    """The cached factors in ``folder``, or None (absent, or damaged: then a one-line warning and a refit)."""
    if folder is None or not (folder / MANIFEST_FILE).exists() or not (folder / FACTORS_FILE).exists():
        return None
    try:
        manifest = store.read_json(folder / MANIFEST_FILE)
        pinned = manifest.get(FACTORS_CHECKSUM)  # the factors file this manifest was written with
        tensors = store.read_tensors_with_metadata(folder / FACTORS_FILE, expect_sha256=pinned)[0]
        factors = Factors(config, manifest, tensors)
        _check_complete(factors, folder.name)
        return factors
    except (CacheCorruptError, Exception) as exc:  # noqa: BLE001 - any unreadable cache entry is refitted
        warnings.warn(f"factor cache {folder} is damaged ({type(exc).__name__}); refitting", stacklevel=3)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
        return None


def _check_complete(factors: Factors, key: str) -> None:
    """Raise CacheCorruptError unless the manifest matches its key and every module has its tensors."""
    if factors.manifest.get("key") != key or set(factors.damping) != set(factors.names):
        raise CacheCorruptError("manifest does not match its cache entry")
    for name in factors.names:
        factors.strategy.inverse_scale(factors.tensors, name, factors.damping[name])


def _save(folder: Path | None, tensors: dict, manifest: dict) -> None:
    """Write factors, then manifest (an entry with a manifest is complete); drop the checkpoints."""
    if folder is None:
        return
    manifest[FACTORS_CHECKSUM] = store.write_tensors(folder / FACTORS_FILE, tensors)
    store.write_json(folder / MANIFEST_FILE, manifest)
    for stale in folder.glob("stage-*.safetensors"):
        stale.unlink(missing_ok=True)
    (folder / EIGEN_FILE).unlink(missing_ok=True)
