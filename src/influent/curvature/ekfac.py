"""Factored curvature over ``nn.Linear`` modules: identity, diagonal, K-FAC and EK-FAC.

Curvature is the Fisher / Gauss-Newton matrix of the training objective (mean loss over n examples),
restricted to a block per tracked module (the weight and bias of one ``nn.Linear``):

- ``identity``:  ``F_m = I``.
- ``diagonal``:  ``F_m = diag(mean_i G_i ** 2)`` with ``G_i`` the per-example gradient ``[d_out, d_in+1]``.
- ``kfac``:      ``F_m = A ⊗ S`` with ``A = mean over tokens of a a^T`` (activations with a ones column)
  and ``S = (1/n) sum_i sum_t g_it g_it^T`` (output gradients of each example's loss). For one token
  per example these are the textbook K-FAC factors; for sequences this is the scale of Grosse et al.
  (2023), ``E[G G^T] ~ T * A_tok ⊗ S_tok``.
- ``ekfac``:     eigenbases ``Q_A, Q_S`` of those factors, with the eigenvalues replaced by the second
  moment of the projected per-example gradients, ``Lambda = mean_i (Q_S^T G_i Q_A) ** 2`` (George et
  al. 2018; Grosse et al. 2023).

Fisher type: ``empirical`` differentiates the loss at the training labels; ``true`` at labels sampled
from the model's predictive distribution (seeded per example, so independent of batching).

Damping (added to every eigenvalue / diagonal entry, per module): absolute (``damping=float``) or
heuristic (``damping=None``: ``damping_fraction * mean eigenvalue`` of that module, kronfluence's rule).
``task.l2`` (ridge on the objective) is added on top. Units: loss per squared parameter unit.

Factors are cached under ``cache_dir/factors/<key>/`` (safetensors + ``manifest.json``, atomic writes).
An interrupted fit resumes from the last checkpoint of partial sums (every ``checkpoint_every`` batches).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influent import store
from influent.curvature.linear_grads import (
    GradBuffers,
    LinearCapture,
    module_shapes,
    per_example_grads_from,
    select_linear_modules,
    token_mask,
)
from influent.curvature.token_cache import DEFAULT_MAX_BYTES, open_cache
from influent.errors import UserError
from influent.task import Batch, Task, length_buckets

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHER_TYPES = ("empirical", "true")
FORMAT_VERSION = 2  # 2: padding rows skipped in the fit (factors of version 1 counted them)


class FactorNumericsError(RuntimeError):
    """An eigendecomposition stayed non-finite after every fallback (the factor itself is bad)."""


@dataclass(frozen=True)
class FactorConfig:
    """Settings that determine the fitted factors (all of them go into the cache key).

    Attributes:
        strategy: ``identity``, ``diagonal``, ``kfac`` or ``ekfac``.
        modules: module selection (``all``, ``mlp`` or a regex; see ``select_linear_modules``).
        fisher: ``empirical`` (training labels) or ``true`` (labels sampled from the model, seeded).
        damping: absolute damping added to the curvature, or None for the heuristic.
        damping_fraction: heuristic damping = this fraction of each module's mean eigenvalue.
        seed: seed of the sampled labels (true Fisher).
    """

    strategy: str = "ekfac"
    modules: str = "all"
    fisher: str = "empirical"
    damping: float | None = None
    damping_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.fisher not in FISHER_TYPES:
            raise UserError(f"--fisher: expected one of {', '.join(FISHER_TYPES)}, got {self.fisher!r}")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise UserError(f"--damping must be a finite number >= 0, got {self.damping}")
        if not (math.isfinite(self.damping_fraction) and self.damping_fraction > 0):
            raise UserError(f"damping_fraction must be > 0, got {self.damping_fraction}")


# --------------------------------------------------------------------------------------------- eigh
def robust_eigh(
    matrix: torch.Tensor, name: str = "factor", max_tries: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor in float64 that never returns NaN.

    Symmetrises, tries ``torch.linalg.eigh``; on failure or non-finite output retries with growing
    jitter (``1e-10 .. 1e-4`` times the mean diagonal); then scipy's LAPACK ``eigh`` on CPU.

    Returns:
        ``(eigenvalues clamped at 0, eigenvectors)`` in float64 on CPU.

    Raises:
        FactorNumericsError: if the matrix itself is non-finite or every attempt fails.
    """
    m = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise FactorNumericsError(f"{name}: covariance factor has non-finite entries (NaN/inf in gradients?)")
    m = 0.5 * (m + m.T)
    scale = float(m.diagonal().abs().mean()) or 1.0
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    for k in range(max_tries + 1):
        jitter = 0.0 if k == 0 else scale * 10.0 ** (-10 + 2 * (k - 1))
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * eye)
        except RuntimeError:
            continue
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return (vals - jitter).clamp_min(0.0), vecs
    try:
        import scipy.linalg

        vals, vecs = scipy.linalg.eigh(m.numpy(), driver="evr")
        vals_t, vecs_t = torch.from_numpy(vals), torch.from_numpy(vecs)
        if torch.isfinite(vals_t).all() and torch.isfinite(vecs_t).all():
            return vals_t.clamp_min(0.0), vecs_t
    except Exception:  # noqa: BLE001, S110 - any LAPACK failure falls through to the error below
        pass
    raise FactorNumericsError(
        f"{name}: eigendecomposition failed or stayed non-finite after jitter and scipy"
    )


# ------------------------------------------------------------------------------------------ factors
class Factors:
    """Fitted per-module curvature; applies ``(F_m + damping_m I)^-1`` to gradients."""

    def __init__(self, config: FactorConfig, manifest: dict, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.manifest = manifest
        self.tensors = tensors
        self.names: list[str] = list(manifest["modules"])
        self.damping: dict[str, float] = {k: float(v) for k, v in manifest["damping_per_module"].items()}
        self.n_examples: int = int(manifest["n_examples"])
        self._cache: dict[tuple, torch.Tensor] = {}

    def _t(self, name: str, what: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, what, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self.tensors[f"{name}::{what}"].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _inv_scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``1 / (eigenvalue or diagonal + damping)`` in the module's basis (``[d_out, d_in]``)."""
        key = (name, "inv", like.dtype, like.device)
        if key not in self._cache:
            d = self.damping[name]
            s = self.config.strategy
            if s == "identity":
                inv = torch.tensor(1.0 / (1.0 + d), dtype=torch.float64)
            elif s == "diagonal":
                inv = 1.0 / (self.tensors[f"{name}::diag"].double() + d)
            elif s == "kfac":
                lam = torch.outer(self.tensors[f"{name}::eigval_s"], self.tensors[f"{name}::eigval_a"])
                inv = 1.0 / (lam.double() + d)
            else:
                inv = 1.0 / (self.tensors[f"{name}::lambda"].double() + d)
            self._cache[key] = inv.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    @property
    def rotated(self) -> bool:
        return self.config.strategy in ("kfac", "ekfac")

    def precondition(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``(F_m + d_m I)^-1 G`` for a stack of gradients ``G`` ``[Q, d_out, d_in(+1)]``."""
        inv = self._inv_scale(name, grads)
        if not self.rotated:
            return grads * inv
        qa, qs = self._t(name, "eigvec_a", grads), self._t(name, "eigvec_s", grads)
        rot = qs.T @ grads @ qa
        return qs @ (rot * inv) @ qa.T

    def rotate_tokens(self, name: str, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token factors in the module's eigenbasis, ``(a Q_A, g Q_S)``; unchanged for diagonal / identity.

        The per-example gradient formed from them is ``Q_S^T G_i Q_A``, the gradient in the basis in which
        the curvature is diagonal (the one :meth:`precondition_tokens_in_basis` returns queries in).
        """
        if not self.rotated:
            return a, g
        return a @ self._t(name, "eigvec_a", a), g @ self._t(name, "eigvec_s", g)

    def rotate_captured(self, captured: list) -> list:
        """:meth:`rotate_tokens` of each captured ``(name, a, g)``; activations shared by consecutive modules
        (query / key / value) in the same basis are rotated once and stay shared (the same tensor)."""
        if not self.rotated:
            return captured
        out = []
        prev = None  # (captured a, its basis, rotated a)
        for name, a, g in captured:
            qa = self._t(name, "eigvec_a", a)
            if prev is not None and prev[0] is a and (prev[1] is qa or torch.equal(prev[1], qa)):
                ar = prev[2]
            else:
                ar = a @ qa
                prev = (a, qa, ar)
            out.append((name, ar, g @ self._t(name, "eigvec_s", g)))
        return out

    def precondition_tokens_in_basis(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``Q_S^T (F_m + d_m I)^-1 G_q Q_A`` (``[Q, d_out, d_in(+1)]``) of ``G_q = sum_t g_qt a_qt^T``.

        The preconditioned query gradient in the eigenbasis: its dot product with a training gradient in
        the same basis (formed from :meth:`rotate_tokens`) is the score, without rotating it back. For
        diagonal / identity the basis is the parameters' own and this is :meth:`precondition`. The
        rotation is formed from the tokens, ``(g Q_S)^T (a Q_A)``, or from the formed gradient,
        whichever takes fewer multiply-adds (``T (d_out^2 + d_in^2 + d_out d_in)`` against
        ``d_out d_in (d_out + d_in)`` per gradient: about 6x fewer for a 1536 x 385 layer at T = 64).
        """
        inv = self._inv_scale(name, g)
        if not self.rotated:
            return per_example_grads_from(a, g) * inv
        t, d_in, d_out = a.shape[1], a.shape[-1], g.shape[-1]
        if t * (d_out * d_out + d_in * d_in + d_out * d_in) < d_out * d_in * (d_out + d_in):
            rot = per_example_grads_from(*self.rotate_tokens(name, a, g))
        else:
            qa, qs = self._t(name, "eigvec_a", a), self._t(name, "eigvec_s", g)
            rot = qs.T @ per_example_grads_from(a, g) @ qa
        return rot * inv

    def precondition_tokens(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """:meth:`precondition` of ``G_q = sum_t g_qt a_qt^T`` given by its token factors.

        ``a`` ``[Q, T, d_in(+1)]`` and ``g`` ``[Q, T, d_out]`` as captured;
        :meth:`precondition_tokens_in_basis` rotated back, ``Q_S M Q_A^T``. Same result as
        ``precondition(name, per_example_grads_from(a, g))`` up to rounding.
        """
        m = self.precondition_tokens_in_basis(name, a, g)
        if not self.rotated:
            return m
        return self._t(name, "eigvec_s", g) @ m @ self._t(name, "eigvec_a", a).T

    def self_quadratic(
        self, name: str, a: torch.Tensor, g: torch.Tensor, *, in_basis: bool = False
    ) -> torch.Tensor:
        """``vec(G_i)^T (F_m + d_m I)^-1 vec(G_i)`` per example from activations/output grads ``[B]``.

        ``in_basis``: ``a`` and ``g`` are already :meth:`rotate_tokens` of the captured ones.
        """
        inv = self._inv_scale(name, a)
        if not in_basis:
            a, g = self.rotate_tokens(name, a, g)
        if a.shape[1] == 1:
            g2, a2 = g[:, 0].square(), a[:, 0].square()
            if inv.dim() == 0:
                return g2.sum(-1) * a2.sum(-1) * inv
            return ((g2 @ inv) * a2).sum(-1)
        grads = per_example_grads_from(a, g)
        return (grads.square() * inv).sum((1, 2))


# -------------------------------------------------------------------------------- fingerprints etc.
def tensor_fingerprint(tensors, length: int = 16) -> str:
    """sha256 of the raw bytes of a sequence of tensors (shapes and dtypes included)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:length]


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every parameter and buffer of ``model`` (by name and bytes)."""
    items = sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0])
    return store.fingerprint([k for k, _ in items], tensor_fingerprint([v for _, v in items]))


def _leaves(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for k in sorted(batch) for t in _leaves(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _leaves(v)]
    return []


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """Fingerprint of the bytes of every tensor in every batch (order matters)."""
    return tensor_fingerprint([t for b in batches for t in _leaves(b)])


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def sampled_loss(task: Task, model: nn.Module, batch: Batch, uniforms: torch.Tensor) -> torch.Tensor:
    """Per-example loss at labels sampled from the model (true Fisher), shape ``[B]``.

    Uses ``task.sampled_loss(model, batch, uniforms)`` if defined; otherwise treats
    ``task.model_output(model, batch)`` as the logits of a categorical distribution, draws
    ``y_i`` by inverse CDF at ``uniforms[i]`` and returns the cross-entropy at ``y_i``.
    """
    fn = getattr(task, "sampled_loss", None)
    if callable(fn):
        return fn(model, batch, uniforms)
    try:
        logits = task.model_output(model, batch)
    except (NotImplementedError, AttributeError):
        raise UserError(
            f"--fisher true needs {type(task).__name__}.sampled_loss or model_output (logits); use --fisher empirical"
        ) from None
    return categorical_sampled_loss(logits, uniforms)


def categorical_sampled_loss(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[B, C]`` at labels drawn by inverse CDF at ``uniforms`` ``[B]``."""
    with torch.no_grad():
        cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1)
        y = (
            torch.searchsorted(cdf, uniforms.to(cdf).unsqueeze(-1))
            .squeeze(-1)
            .clamp_max(logits.shape[-1] - 1)
        )
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


# ------------------------------------------------------------------------------------------ fitting
def _cache_folder(cache_dir, key: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "factors" / key


class _Interrupted(Exception):
    pass


def _run_pass(
    *,
    stage: str,
    model: nn.Module,
    task: Task,
    batches: Sequence[Batch],
    modules: dict[str, nn.Linear],
    config: FactorConfig,
    init: Callable[[], dict[str, torch.Tensor]],
    update: Callable[..., None],
    folder: Path | None,
    checkpoint_every: int,
    uniforms: torch.Tensor | None,
    order: torch.Tensor | None,
    progress: bool,
    after_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward/backward pass over ``batches`` accumulating sums; resumable via ``folder``.

    ``order``: which input example each example of ``batches`` is when they were re-formed by length
    (None: as given); saved with a partial checkpoint, which is resumed only for the same order.

    ``update(sums, name, a, g, tokens, rows)`` gets each module's activations ``a`` and output gradients
    ``g`` (``[B, T, d]``), the number of counted tokens and ``rows``: the positions of the real tokens in
    the flattened ``[B * T]`` axis (``None`` when every position counts), so that products over tokens
    can skip the padding (half of the positions of a batch of short snippets). ``after_batch(i)`` runs
    after the updates of batch ``i``.
    """
    partial = folder / f"partial-{stage}.safetensors" if folder else None
    done_file = folder / f"stage-{stage}.safetensors" if folder else None
    if done_file is not None and done_file.exists():
        return store.read_tensors(done_file)
    sums = init()
    start = 0
    offsets = np.cumsum([0] + [task.batch_size(b) for b in batches])
    order = torch.arange(int(offsets[-1])) if order is None else order.cpu()
    if partial is not None and partial.exists():
        saved = store.read_tensors(partial)
        if set(saved) == set(sums) | {"__batches_done__", "__order__"} and torch.equal(
            saved.pop("__order__"), order
        ):
            start = int(saved.pop("__batches_done__").item())
            sums = saved
    device = next(iter(modules.values())).weight.device
    bar = _progress(len(batches), f"fit {config.strategy} ({stage})", progress, initial=start)
    with torch.enable_grad(), LinearCapture(modules) as cap:
        for i in range(start, len(batches)):
            batch = to_device(batches[i], device)
            mask = token_mask(task, batch)
            cap.set_mask(mask)
            if config.fisher == "true":
                loss = sampled_loss(task, model, batch, uniforms[offsets[i] : offsets[i + 1]].to(device))
            else:
                loss = task.per_example_loss(model, batch)
            n_tokens = (
                mask.sum().to(torch.float64).cpu() if mask is not None else None
            )  # only used when activations are masked
            real_rows = None
            if mask is not None and bool((mask == 0).any()):
                real_rows = mask.reshape(-1).nonzero().squeeze(1)
            for name, a, g in cap.backward(loss):
                if mask is None or mask.shape != a.shape[:2]:
                    tokens = torch.tensor(float(a.shape[0] * a.shape[1]), dtype=torch.float64)
                    rows = None
                else:
                    tokens = n_tokens
                    rows = real_rows
                with torch.no_grad():
                    update(sums, name, a, g, tokens, rows)
            if after_batch is not None:
                after_batch(i)
            for k in list(sums):
                if k.endswith("::n_examples"):
                    sums[k] += loss.shape[0]
            if partial is not None and ((i + 1) % checkpoint_every == 0) and i + 1 < len(batches):
                store.write_tensors(
                    partial, {**sums, "__batches_done__": torch.tensor(i + 1), "__order__": order}
                )
            bar.update(1)
    bar.close()
    if done_file is not None:
        store.write_tensors(done_file, sums)
        partial.unlink(missing_ok=True)
    return sums


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, leave=False)


def fit_factors(
    model: nn.Module,
    task: Task,
    batches: Sequence[Batch],
    config: FactorConfig = FactorConfig(),
    *,
    cache_dir: str | Path | None = None,
    checkpoint_every: int = 32,
    progress: bool = True,
    data_id: str | None = None,
    bucket: bool = True,
    train_cache: str | Path | None = None,
    train_cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Factors:
    """Fit (or load from the cache) the factored curvature of ``task``'s training loss.

    Args:
        model: the trained model (put in eval mode during the fit, restored afterwards).
        task: per-example loss (and, for the true Fisher, logits via ``model_output`` or ``sampled_loss``).
        batches: the training data as a sequence of batches (re-iterated once per pass; order fixed).
        config: strategy, modules, Fisher type, damping, seed.
        cache_dir: folder of the factor cache (``None``: no caching / no resume).
        checkpoint_every: save partial sums every this many batches (resume granularity).
        progress: show a tqdm bar.
        data_id: fingerprint of the training data; default: hash of every tensor in ``batches``.
        bucket: run the passes over the examples re-formed by length with less padding
            (:func:`~influent.task.length_buckets`, dict batches with a right-padded ``attention_mask``);
            the factors are the same up to rounding (sums over examples) and share the cache entry.
        train_cache: folder of the training token cache (:mod:`influent.curvature.token_cache`). An
            EK-FAC fit with the empirical Fisher computes, in its eigenvalue pass, exactly the rotated
            token factors that scoring ``batches`` needs and writes them there, so that
            ``pairwise_scores(..., train_batches=batches, train_cache=...)`` runs no pass over them.
            Other fits write nothing (the first scoring does). None: no token cache.
        train_cache_max_bytes: do not write a token cache estimated larger than this (None: no limit).

    Returns:
        :class:`Factors` over ``n = sum of batch sizes`` examples (averages, matching the mean loss).
    """
    config.validate()
    modules = select_linear_modules(model, config.modules)
    shapes = module_shapes(modules)
    n = int(sum(task.batch_size(b) for b in batches))
    if n == 0:
        raise UserError("no training examples to fit factors on")
    data_fp = data_id or data_fingerprint(batches)
    model_fp = model_fingerprint(model)
    l2 = float(getattr(task, "l2", 0.0) or 0.0)
    key = store.fingerprint(FORMAT_VERSION, asdict(config), list(shapes.items()), data_fp, model_fp, l2, n)
    folder = _cache_folder(cache_dir, key)
    if (
        folder is not None
        and (folder / "manifest.json").exists()
        and (folder / "factors.safetensors").exists()
    ):
        manifest = store.read_json(folder / "manifest.json")
        return Factors(config, manifest, store.read_tensors(folder / "factors.safetensors"))

    was_training = model.training
    model.eval()
    rebatched = length_buckets(batches) if bucket and config.strategy != "identity" else None
    fit_batches, order = rebatched if rebatched is not None else (batches, None)
    tokens = None
    if train_cache is not None and config.strategy == "ekfac" and config.fisher == "empirical":
        tokens = open_cache(
            train_cache,
            task=task,
            factors_key=key,
            modules=modules,
            train_batches=batches,
            pass_batches=fit_batches,
            bucket=bucket,
            max_bytes=train_cache_max_bytes,
            train_fingerprint=data_fp if data_id is None else None,
        )
    try:
        tensors, damping = _fit(
            model, task, fit_batches, config, modules, shapes, folder, checkpoint_every, progress, n, order,
            tokens,
        )
    finally:
        model.train(was_training)
    damping = {k: v + l2 for k, v in damping.items()}
    manifest = {
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
    if folder is not None:
        store.write_tensors(folder / "factors.safetensors", tensors)
        store.write_json(folder / "manifest.json", manifest)
        for stale in folder.glob("stage-*.safetensors"):
            stale.unlink(missing_ok=True)
        (folder / "eigen.safetensors").unlink(missing_ok=True)
    return Factors(config, manifest, tensors)


def _fit(model, task, batches, config, modules, shapes, folder, checkpoint_every, progress, n, order, tokens):
    strategy = config.strategy
    frac = config.damping_fraction
    tensors: dict[str, torch.Tensor] = {}
    damping: dict[str, float] = {}
    if strategy == "identity":
        for name in modules:
            damping[name] = config.damping if config.damping is not None else frac
            tensors[f"{name}::unit"] = torch.ones(1)
        return tensors, damping

    uniforms = None
    if config.fisher == "true":
        gen = torch.Generator().manual_seed(int(config.seed))
        uniforms = torch.rand(n, generator=gen, dtype=torch.float64)
        if order is not None:
            uniforms = uniforms[order.cpu()]  # each example keeps its own sampled label
    common = dict(  # noqa: C408
        model=model,
        task=task,
        batches=batches,
        modules=modules,
        config=config,
        folder=folder,
        checkpoint_every=checkpoint_every,
        uniforms=uniforms,
        order=order,
        progress=progress,
    )
    dtype = next(iter(modules.values())).weight.dtype
    buffers = GradBuffers()
    vec_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    if strategy == "diagonal":

        def init():
            s = {f"{k}::diag_sum": torch.zeros(v, dtype=torch.float64) for k, v in shapes.items()}
            s.update({f"{k}::n_examples": torch.zeros((), dtype=torch.float64) for k in shapes})
            return s

        def update(sums, name, a, g, tokens, rows):
            if a.shape[1] == 1:
                d = (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
            else:
                d = per_example_grads_from(a, g, buffers).square_().sum(0)
            sums[f"{name}::diag_sum"] += d.to(device="cpu", dtype=torch.float64)

        sums = _run_pass(stage="diagonal", init=init, update=update, **common)
        for name in modules:
            diag = sums[f"{name}::diag_sum"] / sums[f"{name}::n_examples"]
            _check_finite(diag, name)
            tensors[f"{name}::diag"] = diag
            damping[name] = config.damping if config.damping is not None else frac * float(diag.mean())
        return tensors, damping

    # K-FAC / EK-FAC: covariance pass
    def init_cov():
        s = {}
        for k, (do, di) in shapes.items():
            s[f"{k}::a_sum"] = torch.zeros(di, di, dtype=torch.float64)
            s[f"{k}::s_sum"] = torch.zeros(do, do, dtype=torch.float64)
            s[f"{k}::n_tokens"] = torch.zeros((), dtype=torch.float64)
            s[f"{k}::n_examples"] = torch.zeros((), dtype=torch.float64)
        return s

    shared: dict = {}  # activations shared by consecutive modules (query/key/value): reuse products

    def update_cov(sums, name, a, g, tokens, rows):
        if shared.get("a") is not a:
            af = _token_rows(a, rows)
            shared["a"], shared["aa"] = a, (af.T @ af).to(device="cpu", dtype=torch.float64)
        gf = _token_rows(g, rows)
        sums[f"{name}::a_sum"] += shared["aa"]
        sums[f"{name}::s_sum"] += (gf.T @ gf).to(device="cpu", dtype=torch.float64)
        sums[f"{name}::n_tokens"] += tokens

    eigen_file = folder / "eigen.safetensors" if folder else None
    if eigen_file is not None and eigen_file.exists():
        eig = store.read_tensors(eigen_file)
    else:
        sums = _run_pass(stage="covariance", init=init_cov, update=update_cov, **common)
        eig = {}
        done: dict[tuple, list] = {}

        def eigh_once(matrix: torch.Tensor, label: str) -> tuple[torch.Tensor, torch.Tensor]:
            # modules fed the same input (query/key/value of one attention layer) have bitwise equal
            # activation covariances: decompose each distinct matrix once (eigh dominates the fit)
            key = (tuple(matrix.shape), float(matrix.trace()), float(matrix.sum()))
            for other, result in done.get(key, []):
                if torch.equal(other, matrix):
                    return result[0].clone(), result[1].clone()  # safetensors refuses shared storage
            result = robust_eigh(matrix, label)
            done.setdefault(key, []).append((matrix, result))
            return result

        for name in modules:
            a_cov = sums[f"{name}::a_sum"] / sums[f"{name}::n_tokens"].clamp_min(1)
            s_cov = sums[f"{name}::s_sum"] / sums[f"{name}::n_examples"].clamp_min(1)
            eig[f"{name}::eigval_a"], va = eigh_once(a_cov, f"{name} activation covariance")
            eig[f"{name}::eigval_s"], vs = eigh_once(s_cov, f"{name} gradient covariance")
            eig[f"{name}::eigvec_a"] = va.to(vec_dtype)
            eig[f"{name}::eigvec_s"] = vs.to(vec_dtype)
        if eigen_file is not None:
            store.write_tensors(eigen_file, eig)
            (folder / "stage-covariance.safetensors").unlink(missing_ok=True)
    for name in modules:
        tensors[f"{name}::eigvec_a"] = eig[f"{name}::eigvec_a"]
        tensors[f"{name}::eigvec_s"] = eig[f"{name}::eigvec_s"]
        tensors[f"{name}::eigval_a"] = eig[f"{name}::eigval_a"]
        tensors[f"{name}::eigval_s"] = eig[f"{name}::eigval_s"]

    if strategy == "kfac":
        for name in modules:
            mean = float(eig[f"{name}::eigval_a"].mean()) * float(eig[f"{name}::eigval_s"].mean())
            damping[name] = config.damping if config.damping is not None else frac * mean
        return tensors, damping

    # EK-FAC: eigenvalue correction pass
    rot_cache: dict = {}
    rotated: dict = {}

    def rot(name, what, like):
        key = (name, what, like.dtype, like.device)
        if key not in rot_cache:
            rot_cache[key] = eig[f"{name}::{what}"].to(device=like.device, dtype=like.dtype)
        return rot_cache[key]

    def init_lam():
        s = {f"{k}::lambda_sum": torch.zeros(v, dtype=torch.float64) for k, v in shapes.items()}
        s.update({f"{k}::n_examples": torch.zeros((), dtype=torch.float64) for k in shapes})
        return s

    def update_lam(sums, name, a, g, tokens, rows):
        qa = rot(name, "eigvec_a", a)
        if rotated.get("a") is a and torch.equal(rotated["qa"], qa):
            ar = rotated["ar"]  # same activations and basis as the previous module (query/key/value)
        else:
            ar = _rotate_rows(a, qa, rows)
            rotated.update(a=a, qa=qa, ar=ar)
        gr = _rotate_rows(g, rot(name, "eigvec_s", g), rows)
        if tokens is not None:
            batch_tokens.append((name, ar, gr))
        if ar.shape[1] == 1:
            lam = (gr[:, 0] ** 2).T @ (ar[:, 0] ** 2)
        else:
            lam = per_example_grads_from(ar, gr, buffers).square_().sum(0)
        sums[f"{name}::lambda_sum"] += lam.to(device="cpu", dtype=torch.float64)

    batch_tokens: list = []  # this batch's rotated (name, a, g), for the training token cache

    def write_tokens(index: int) -> None:
        if tokens is not None:
            tokens.write(index, batch_tokens)
        batch_tokens.clear()

    sums = _run_pass(stage="lambda", init=init_lam, update=update_lam, after_batch=write_tokens, **common)
    for name in modules:
        lam = sums[f"{name}::lambda_sum"] / sums[f"{name}::n_examples"].clamp_min(1)
        _check_finite(lam, name)
        tensors[f"{name}::lambda"] = lam
        damping[name] = config.damping if config.damping is not None else frac * float(lam.mean())
    return tensors, damping


def _token_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, T, d]`` flattened to ``[B * T, d]``, keeping only ``rows`` (the real tokens) if given."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _rotate_rows(x: torch.Tensor, basis: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x @ basis`` computed on the real-token rows only (padded rows of ``x`` are zero and stay zero)."""
    if rows is None:
        return x @ basis
    out = x.new_zeros(x.shape[0] * x.shape[1], basis.shape[1])
    out.index_copy_(0, rows, _token_rows(x, rows) @ basis)
    return out.view(x.shape[0], x.shape[1], basis.shape[1])


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise FactorNumericsError(f"{name}: fitted curvature has non-finite entries (NaN/inf in gradients?)")
