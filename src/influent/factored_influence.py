"""The factored influence engine: K-FAC / EK-FAC / diagonal / identity curvature over linear modules.

Consumers use :class:`FactoredInfluence` (the :class:`~influent.influence.InfluenceMethod` protocol plus
``factors``, ``query_gradients``, ``preconditioned_query_gradients``, ``train_losses``,
``train_gradients``); the free functions below are its internals (kept public for benchmarks that time
the stages separately).

Sign and units (DESIGN.md): ``score(z_train, z_query) = g_query^T (F + damping)^-1 g_train`` summed over
the tracked modules (block-diagonal curvature), where ``g`` are gradients of the per-example training
loss (``task.per_example_loss``) and of the query measurement (``task.query_measurement``, default the
loss). Positive = proponent (up-weighting ``z_train`` lowers the query loss); ``loss_change = score / n``
is the predicted change of the query loss when ``z_train`` is removed from the n training examples.

Query gradients are preconditioned once (``[Q, d_out, d_in(+1)]`` per module); training examples are
streamed batch by batch, their per-example gradients formed per module from activations and output
gradients and contracted with all queries at once, so no full parameter vector per example exists.
With ``query_rank=r`` each preconditioned query gradient is replaced by its rank-r SVD truncation and
training gradients are never formed (cost per token ``Q * r * (d_in + d_out)``).

With ``train_cache`` the training examples' token factors are kept on disk in the factors' eigenbasis
(:mod:`influent.curvature.token_cache`, about 4 MB per snippet for MiniLM): the first scoring (or the
empirical-Fisher EK-FAC fit) writes them, and later query sets are scored from
them with the queries kept in the eigenbasis, so no forward or backward pass over the training data runs
and the preconditioned queries are not rotated back. Same scores up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from influent.curvature.config import FactorConfig
from influent.curvature.factors import Factors
from influent.curvature.fingerprints import tensor_fingerprint
from influent.curvature.fitting import fit_factors
from influent.curvature.linear_grads import (
    GradBuffers,
    LinearCapture,
    PerExampleDots,
    captured_passes,
    per_example_grads_from,
    select_linear_modules,
)
from influent.curvature.token_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MEMORY_BYTES,
    MemoryTokens,
    TrainTokenCache,
    estimated_bytes,
    open_cache,
)
from influent.errors import NumericalError, UserError
from influent.influence import InfluenceMethod, Queries, as_batches
from influent.progress import progress_bar
from influent.task import Batch, Task, batch_to, length_buckets

__all__ = [
    "FactorConfig",
    "FactoredInfluence",
    "Factors",
    "fit_factors",
    "loss_change",
    "pairwise_scores",
    "query_gradients",
    "query_self_scores",
    "self_scores",
]


def _modules(model: nn.Module, factors: Factors) -> dict[str, nn.Linear]:
    all_linear = select_linear_modules(model, "all")
    missing = [n for n in factors.names if n not in all_linear]
    if missing:
        raise UserError(f"factors were fitted on modules this model lacks: {missing[:3]}")
    return {n: all_linear[n] for n in factors.names}


def query_gradients(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_batches: Sequence[Batch],
    *,
    measurement: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-query gradients ``{module: [Q, d_out, d_in(+1)]}`` of the query measurement (or loss)."""
    return _per_query(
        model, task, factors, query_batches, measurement, lambda name, a, g: per_example_grads_from(a, g)
    )


def preconditioned_query_gradients(
    model: nn.Module, task: Task, factors: Factors, query_batches: Sequence[Batch], *, in_basis: bool = False
) -> dict[str, torch.Tensor]:
    """``(F_m + d_m)^-1 g_query`` per module, ``[Q, d_out, d_in(+1)]``.

    Rotated into the eigenbasis from the query's token factors (:meth:`Factors.precondition_tokens`),
    without forming the gradient first where that is cheaper. ``in_basis``: left in the eigenbasis
    (:meth:`Factors.precondition_tokens_in_basis`), for training gradients in that basis.
    """
    reduce = factors.precondition_tokens_in_basis if in_basis else factors.precondition_tokens
    return _per_query(model, task, factors, query_batches, True, reduce)


def _per_query(model, task, factors, query_batches, measurement: bool, reduce) -> dict[str, torch.Tensor]:
    """``reduce(name, a, g)`` (``[Q_batch, ...]``) per module and query batch, concatenated over queries."""
    modules = _modules(model, factors)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    for _, captured in captured_passes(model, task, modules, query_batches, measurement):
        for name, a, g in captured:
            with torch.no_grad():
                out[name].append(reduce(name, a, g))
    return {n: torch.cat(v) for n, v in out.items()}


def _low_rank(pre: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(L [Q, d_out, r], R [Q, d_in, r])`` with ``pre ~ L R^T``."""
    u, s, vh = torch.linalg.svd(pre.double(), full_matrices=False)
    r = min(rank, s.shape[-1])
    left = (u[..., :r] * s[..., None, :r]).to(pre.dtype)
    right = vh[..., :r, :].transpose(-1, -2).to(pre.dtype)
    return left, right


def pairwise_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_batches: Sequence[Batch],
    train_batches: Sequence[Batch],
    *,
    query_rank: int | None = None,
    progress: bool = True,
    bucket: bool = True,
    train_cache: str | Path | None = None,
    train_cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
    memory_tokens: MemoryTokens | None = None,
) -> torch.Tensor:
    """Scores ``[Q, N]``: ``g_query^T (F + damping)^-1 g_train`` (positive = proponent; float64).

    Args:
        model, task: as in :func:`fit_factors`.
        factors: fitted curvature (defines the tracked modules and damping).
        query_batches: batches of queries (their ``query_measurement`` is differentiated).
        train_batches: batches of training examples, streamed (``per_example_loss`` differentiated).
        query_rank: if set, compress each preconditioned query gradient to this rank (SVD).
        progress: show a tqdm bar.
        bucket: re-form dict batches with a right-padded ``attention_mask`` into batches of similar
            length with less padding (:func:`~influent.task.length_buckets`) for the passes; the
            scores come back in the order of ``train_batches`` and are the same up to rounding.
        train_cache: folder of the training token cache (:mod:`influent.curvature.token_cache`): read
            what is there, compute and write the rest; None: no cache.
        train_cache_max_bytes: do not write a cache estimated larger than this (None: no limit).
        memory_tokens: training tokens held in memory in ``factors``' eigenbasis for these
            ``train_batches`` and ``bucket`` (as the EK-FAC fit leaves them,
            :class:`~influent.curvature.token_cache.MemoryTokens`): a batch held there is read instead of a
            pass (before ``train_cache``); an empty store is filled by the passes when the tokens fit its
            budget, for the next call.
    """
    if query_rank is not None and query_rank < 1:
        raise UserError(f"query_rank must be >= 1, got {query_rank}", field="query_rank")
    modules = _modules(model, factors)
    device = next(iter(modules.values())).weight.device
    plan = _plan(task, factors, modules, train_batches, bucket, train_cache, train_cache_max_bytes, memory_tokens)
    pre = preconditioned_query_gradients(model, task, factors, query_batches, in_basis=plan.cache is not None)
    lowrank = {n: _low_rank(p, query_rank) for n, p in pre.items()} if query_rank else None
    n_q = next(iter(pre.values())).shape[0]
    dots = None if lowrank is not None else {n: PerExampleDots(p) for n, p in pre.items()}
    buffers = GradBuffers()

    def score_batch(size, captured):
        block = torch.zeros(n_q, size, dtype=torch.float64, device=device)
        for name, a, g in captured:
            with torch.no_grad():
                if lowrank is not None:
                    left, right = lowrank[name]
                    gl = torch.einsum("bto,qor->qbtr", g, left)
                    ar = torch.einsum("bti,qir->qbtr", a, right)
                    block += (gl * ar).sum((2, 3)).double()
                else:
                    block += dots[name](a, g, buffers).double()
        return block

    desc = "pairwise scores"
    return _score_training_examples(model, task, factors, modules, plan, score_batch, desc, progress)


def self_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    train_batches: Sequence[Batch],
    *,
    progress: bool = True,
    bucket: bool = True,
    train_cache: str | Path | None = None,
    train_cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
    memory_tokens: MemoryTokens | None = None,
) -> torch.Tensor:
    """Self-influence ``g_i^T (F + damping)^-1 g_i`` per training example, ``[N]`` float64 (>= 0).

    ``bucket``, ``train_cache``, ``train_cache_max_bytes``, ``memory_tokens``: as in :func:`pairwise_scores`.
    """
    modules = _modules(model, factors)
    device = next(iter(modules.values())).weight.device
    plan = _plan(task, factors, modules, train_batches, bucket, train_cache, train_cache_max_bytes, memory_tokens)
    in_basis = plan.cache is not None

    def score_batch(size, captured):
        acc = torch.zeros(size, dtype=torch.float64, device=device)
        for name, a, g in captured:
            with torch.no_grad():
                acc += factors.self_quadratic(name, a, g, in_basis=in_basis).double()
        return acc

    return _score_training_examples(model, task, factors, modules, plan, score_batch, "self scores", progress)


class _Plan(NamedTuple):
    """The batches the scoring passes run over, the order that restores the input's, and the token stores."""

    batches: list
    order: torch.Tensor | None
    cache: _TokenSources | None


class _TokenSources:
    """Training tokens in the factors' basis from memory, else the disk cache; a batch computed by a pass is
    written to both (each keeps it if it can)."""

    def __init__(self, memory: MemoryTokens | None, disk: TrainTokenCache | None):
        self.memory, self.disk = memory, disk

    def read(self, index: int, size: int):
        got = None if self.memory is None else self.memory.read(index, size)
        if got is None and self.disk is not None:
            got = self.disk.read(index, size)
            if got is not None and self.memory is not None:
                self.memory.write(index, got)
        return got

    def write(self, index: int, captured) -> None:
        for store in (self.memory, self.disk):
            if store is not None:
                store.write(index, captured)


def _plan(task, factors, modules, train_batches, bucket, train_cache, max_bytes, memory=None) -> _Plan:
    rebatched = length_buckets(train_batches) if bucket else None
    batches, order = rebatched if rebatched is not None else (list(train_batches), None)
    disk = open_cache(
        train_cache,
        task=task,
        factors_key=factors_key(factors),
        modules=modules,
        train_batches=train_batches,
        pass_batches=batches,
        bucket=bucket,
        max_bytes=max_bytes,
    )
    if memory is not None and not memory.active and len(memory) == 0:
        itemsize = next(iter(modules.values())).weight.element_size()
        if not memory.reserve(estimated_bytes(task, batches, modules, itemsize)):
            memory = None  # an empty store over its budget: the passes run, nothing is kept
    return _Plan(batches, order, None if memory is None and disk is None else _TokenSources(memory, disk))


def factors_key(factors: Factors) -> str:
    """The factors' cache key (from :func:`fit_factors`), or a fingerprint of their tensors."""
    key = factors.manifest.get("key")
    if key:
        return str(key)
    return tensor_fingerprint([factors.tensors[k] for k in sorted(factors.tensors)]) + str(factors.damping)


def _score_training_examples(model, task, factors, modules, plan, score_batch, desc: str, progress: bool):
    """``score_batch(batch size, captured)`` (scores ``[..., B]``) over ``plan``'s batches, concatenated
    along the last axis and put back in the order of the input training batches.

    With a token cache, ``captured`` is in the factors' basis (:meth:`Factors.rotate_captured`).
    """
    passes = _training_passes(model, task, modules, plan.batches, desc, progress, plan.cache, factors)
    scores = torch.cat([score_batch(size, captured).cpu() for size, captured in passes], dim=-1)
    if plan.order is not None:
        restored = torch.empty_like(scores)
        restored[..., plan.order] = scores
        scores = restored
    _check_scores(scores)
    return scores


def _training_passes(
    model, task, modules, train_batches, desc: str, progress: bool, cache: _TokenSources | None = None,
    factors: Factors | None = None,
):
    """Per training batch, ``(batch size, captured (name, activations, output grads))`` in eval mode.

    One forward + backward pass per batch through :class:`LinearCapture`, padding masked; the model's
    train/eval mode is restored afterwards. With ``cache``: a batch found there is read instead (no
    pass); the others are rotated into ``factors``' basis and written, so every yielded batch is in
    that basis.
    """
    device = next(iter(modules.values())).weight.device
    was_training = model.training
    model.eval()
    bar = progress_bar(len(train_batches), desc, progress)
    try:
        with torch.enable_grad(), LinearCapture(modules) as cap:
            for index, batch in enumerate(train_batches):
                size = task.batch_size(batch)
                captured = cache.read(index, size) if cache is not None else None
                if captured is not None:
                    captured = [(n, a.to(device), g.to(device)) for n, a, g in captured]
                else:
                    batch = batch_to(batch, device)
                    cap.set_mask(task.token_mask(batch))
                    loss = task.per_example_loss(model, batch)
                    captured = cap.backward(loss)
                    if cache is not None:
                        with torch.no_grad():
                            captured = factors.rotate_captured(captured)
                        cache.write(index, captured)
                yield size, captured
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)


def loss_change(scores: torch.Tensor, n_train: int) -> torch.Tensor:
    """Predicted change of the query loss when a training example is removed: ``score / n``."""
    return scores / float(n_train)


def _check_scores(scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise NumericalError(
            f"{bad} influence scores are non-finite (check damping and the model's loss)"
        )


class FactoredInfluence(InfluenceMethod):
    """:class:`~influent.influence.InfluenceMethod` with factored curvature over ``nn.Linear`` modules.

    The factored engine: the curvature (identity / diagonal / K-FAC / EK-FAC, a registered strategy of
    :mod:`influent.curvature.strategies`) is fitted once over the training batches (cached under
    ``cache_dir``, resumable); queries are preconditioned once and contracted with the training examples'
    per-example gradients, streamed batch by batch from their token factors (or read from the training
    token cache). Consumers need only this class; the module's free functions are its internals.

    Args:
        model, task: the trained model and how its losses / measurements are computed.
        train_batches: the training data as a sequence of batches (streamed; order fixed).
        config: strategy, modules, Fisher type, damping, seed.
        cache_dir: factor cache folder (None: no cache, no resume).
        train_cache: keep the training token factors under ``cache_dir`` (see module docstring).
        train_cache_max_bytes: do not write a token cache estimated larger than this.
        query_rank: optional rank of the preconditioned query gradients (SVD truncation).
        progress: show progress bars.
        bucket: run the passes over the training examples re-formed by length (same scores, less padding).
        fit_batches: the batches the curvature is fitted on (e.g. a seeded sample of the training data;
            the factors' cache key follows them); None: ``train_batches``. Scores are still over
            ``train_batches``, and the fit then writes no training token cache.
        memory_max_bytes: memory for the training tokens of the tracked modules (estimated with padding,
            :func:`~influent.curvature.token_cache.estimated_bytes`; 338 MB for 1,000 22-token sequences
            over 6 MLP modules of a 128-wide LLaMA). When they fit, the EK-FAC fit runs one pass instead of
            two (:func:`fit_factors`) and keeps the tokens in the eigenbasis, and with the empirical
            Fisher every pairwise / self score of ``train_batches`` is read from them, with no pass (the
            first scoring fills them after a fit on ``fit_batches`` or from the factor cache). Same
            scores up to float rounding. Dropped if a parameter of the model changes in place. 0: off
            (two fit passes, a pass per scoring); None: no limit. Default 2 GiB.

    Raises:
        UserError: (field ``query_rank``) for a rank below 1; (field ``config.<name>``) for a bad setting.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_batches: Sequence[Batch],
        config: FactorConfig | None = None,
        *,
        cache_dir: str | Path | None = None,
        train_cache: bool = False,
        train_cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
        query_rank: int | None = None,
        progress: bool = True,
        bucket: bool = True,
        fit_batches: Sequence[Batch] | None = None,
        memory_max_bytes: int | None = DEFAULT_MEMORY_BYTES,
    ):
        self.model, self.task = model, task
        self.train_batches = list(train_batches)
        self.fit_batches = None if fit_batches is None else list(fit_batches)
        self.config = config or FactorConfig()
        self.config.validate()
        if query_rank is not None and query_rank < 1:
            raise UserError(f"query_rank must be >= 1, got {query_rank}", field="query_rank")
        self.cache_dir = cache_dir
        self.tokens = cache_dir if train_cache else None
        self.max_bytes = train_cache_max_bytes
        self.query_rank = query_rank
        self.progress = progress
        self.bucket = bucket
        self._factors: Factors | None = None
        self._n = int(sum(task.batch_size(b) for b in self.train_batches))
        self.memory_max_bytes = memory_max_bytes
        self._memory = MemoryTokens(memory_max_bytes) if memory_max_bytes != 0 else None

    @property
    def n_train(self) -> int:
        return self._n

    @property
    def factors(self) -> Factors:
        """The fitted curvature (fitted on first use)."""
        self.fit()
        return self._factors

    def fit(self) -> FactoredInfluence:
        if self._factors is None:
            sample = self.fit_batches is not None
            keep = None if sample else self._scoring_memory()
            self._factors = fit_factors(
                self.model, self.task, self.fit_batches if sample else self.train_batches, self.config,
                cache_dir=self.cache_dir, progress=self.progress, bucket=self.bucket,
                train_cache=None if sample else self.tokens, train_cache_max_bytes=self.max_bytes,
                memory_max_bytes=self.memory_max_bytes, memory_tokens=keep,
            )  # fmt: skip
            if keep is not None:
                keep.stamp = _parameter_state(self.model)
        return self

    def _scoring_memory(self) -> MemoryTokens | None:
        """The in-memory training tokens scoring may read (None: off, or the true Fisher, whose fit
        captures sampled-label gradients, not the training loss's); emptied if the model changed since
        they were taken."""
        if self._memory is None or self.config.fisher != "empirical":
            return None
        state = _parameter_state(self.model)
        if self._memory.stamp != state:
            self._memory.clear()
            self._memory.stamp = state
        return self._memory

    def pairwise_scores(self, queries: Queries) -> torch.Tensor:
        self.fit()
        return pairwise_scores(
            self.model, self.task, self.factors, as_batches(queries), self.train_batches,
            query_rank=self.query_rank, progress=self.progress, bucket=self.bucket, train_cache=self.tokens,
            train_cache_max_bytes=self.max_bytes, memory_tokens=self._scoring_memory(),
        )  # fmt: skip

    def self_scores(self) -> torch.Tensor:
        self.fit()
        return self_scores(
            self.model, self.task, self.factors, self.train_batches, progress=self.progress,
            bucket=self.bucket, train_cache=self.tokens, train_cache_max_bytes=self.max_bytes,
            memory_tokens=self._scoring_memory(),
        )  # fmt: skip

    def query_self_scores(self, queries: Queries) -> torch.Tensor:
        return query_self_scores(self.model, self.task, self.factors, as_batches(queries))

    def query_gradients(self, queries: Queries) -> dict[str, torch.Tensor]:
        """Gradients of each query's measurement per tracked module, ``{name: [Q, d_out, d_in(+1)]}``."""
        return query_gradients(self.model, self.task, self.factors, as_batches(queries))

    def preconditioned_query_gradients(self, queries: Queries) -> dict[str, torch.Tensor]:
        """Each query's preconditioned measurement gradient ``(F + damping)^-1 g_q`` (its s_test), per tracked
        module: ``{name: [Q, d_out, d_in(+1)]}``, bias gradient in the last column.

        The score of a training example is the sum over modules of the contraction of this with its loss
        gradient (:meth:`pairwise_scores`); a consumer that needs a direction in parameter space (e.g. the
        concealed-poison alignment) uses it instead of scores.
        """
        self.fit()
        return preconditioned_query_gradients(self.model, self.task, self.factors, as_batches(queries))

    def train_losses(self) -> torch.Tensor:
        """Per-example training loss ``[n]`` (nats; eval mode, no gradients), in training-batch order."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                losses = [self.task.per_example_loss(self.model, batch_to(b, device))
                          for b in self.train_batches]
        finally:
            self.model.train(was_training)
        return torch.cat(losses).double().cpu()

    def train_gradients(self) -> torch.Tensor:
        """Per-example training-loss gradients ``[n, p]`` over the tracked modules (weights, then bias, per
        module in model order), in training-batch order. Materialises ``n x p``: small models only."""
        modules = _modules(self.model, self.fit().factors)
        rows = []
        for _, captured in _training_passes(self.model, self.task, modules, self.train_batches, "gradients",
                                            self.progress):
            with torch.no_grad():
                rows.append(torch.cat([per_example_grads_from(a, g).flatten(1) for _, a, g in captured], 1))
        return torch.cat(rows).double().cpu()

    def describe(self) -> dict:
        out = {
            "method": "factored",
            "strategy": self.config.strategy,
            "modules": self.config.modules,
            "fisher": self.config.fisher,
            "damping": self.config.damping,
            "damping_fraction": self.config.damping_fraction,
            "query_rank": self.query_rank,
            "n_train": self.n_train,
        }
        if self._factors is not None:
            out["tracked_modules"] = len(self._factors.names)
            out["damping_per_module"] = self._factors.damping
        return out


def _parameter_state(model: nn.Module) -> tuple:
    """Identity and in-place version counter of every parameter: changes when an optimiser step, a
    ``load_state_dict`` or any in-place write touches a parameter (cheap, no hashing)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def query_self_scores(
    model: nn.Module, task: Task, factors: Factors, query_batches: Sequence[Batch]
) -> torch.Tensor:
    """``g_q^T (F + damping)^-1 g_q`` of each query's measurement gradient, ``[Q]`` float64."""
    grads = query_gradients(model, task, factors, query_batches)
    total = None
    for name, g in grads.items():
        term = (g.double() * factors.precondition(name, g).double()).sum((1, 2))
        total = term if total is None else total + term
    return total
