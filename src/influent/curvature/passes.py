"""The fit's passes over the training data: one forward/backward per batch, sums accumulated per tracked
module, resumable from checkpoints.

A curvature strategy (:mod:`influent.curvature.strategies`) describes a pass by two functions,
``init() -> sums`` and ``update(sums, name, a, g, tokens, rows)``; :meth:`FitContext.run_pass` runs it over
the batches with the padding masked, and saves the sums every ``checkpoint_every`` batches
(``partial-<stage>.safetensors``) and when done (``stage-<stage>.safetensors``) in the factor folder, so an
interrupted fit resumes where it stopped. A checkpoint that cannot be read is recomputed with a one-line
warning, never used.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from influent import distributed, store
from influent.curvature import keys
from influent.curvature.linear_grads import LinearCapture
from influent.errors import CacheCorruptError
from influent.progress import progress_bar
from influent.task import Batch, Task, batch_to

Sums = dict[str, torch.Tensor]
FLUSH_EVERY = 32  # batches a GramSums accumulates in the rows' dtype before its float64 sums get them


def blas_threads(n: int):
    """Context limiting scipy's / numpy's BLAS to ``n`` threads (as torch's), if threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def read_checkpoint(path: Path | None, what: str) -> Sums | None:
    """The tensors of cache file ``path``, or None when absent or damaged (then with a one-line warning).

    ``what`` names the file's role in the warning (``"factor checkpoint"``).
    """
    if path is None or not path.exists():
        return None
    try:
        return store.read_tensors(path)
    except (CacheCorruptError, Exception) as exc:  # noqa: BLE001 - any unreadable cache file is recomputed
        warnings.warn(f"{what} {path} is damaged ({type(exc).__name__}); recomputing it", stacklevel=2)
        path.unlink(missing_ok=True)
        return None


@dataclass
class FitContext:
    """Everything one fit's passes share.

    Attributes:
        model: the model (in eval mode during the fit).
        task: per-example loss, token mask, sampled loss (true Fisher).
        batches: the batches the passes run over (possibly re-formed by length).
        modules: tracked ``nn.Linear`` modules by name.
        shapes: ``{name: (d_out, d_in(+1))}``.
        fisher: ``empirical`` (training labels) or ``true`` (labels sampled with ``uniforms``).
        label: what the progress bar calls the fit (``"fit ekfac"``).
        damping: absolute damping, or None for ``damping_fraction`` x the module's mean eigenvalue.
        damping_fraction: heuristic damping fraction.
        folder: factor cache folder for checkpoints (None: no resume).
        checkpoint_every: save partial sums every this many batches.
        uniforms: per example of ``batches``, the uniform number its sampled label is drawn at (true Fisher).
        order: input position of each example of ``batches`` (None: as given); resumes only the same order.
        progress: show progress bars.
        tokens: training token cache written by a pass that computes the rotated tokens (or None).
        memory: :class:`~influent.curvature.token_cache.MemoryTokens` a pass keeps its captures in and a
            later pass replays them from instead of running the model (or None: every pass runs it).
    """

    model: nn.Module
    task: Task
    batches: Sequence[Batch]
    modules: dict[str, nn.Linear]
    shapes: dict[str, tuple[int, int]]
    fisher: str
    label: str
    damping: float | None
    damping_fraction: float
    folder: Path | None = None
    checkpoint_every: int = 32
    uniforms: torch.Tensor | None = None
    order: torch.Tensor | None = None
    progress: bool = True
    tokens: Any = None
    memory: Any = None

    def damping_for(self, mean_eigenvalue: float) -> float:
        """The module's damping: the absolute one, or ``damping_fraction * mean_eigenvalue``."""
        return self.damping if self.damping is not None else self.damping_fraction * mean_eigenvalue

    @property
    def vector_dtype(self) -> torch.dtype:
        """dtype eigenvectors are stored in: float64 for a float64 model, else float32."""
        dtype = next(iter(self.modules.values())).weight.dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def file(self, name: str) -> Path | None:
        """``folder / name``, or None without a folder."""
        return None if self.folder is None else self.folder / name

    def discard_checkpoints(self, keep: str) -> None:
        """Delete the partial and finished checkpoints of every stage but ``keep`` (they are stale)."""
        if self.folder is None:
            return
        for path in [*self.folder.glob("partial-*.safetensors"), *self.folder.glob("stage-*.safetensors")]:
            if path.stem.split("-", 1)[1] != keep:
                path.unlink(missing_ok=True)

    def run_pass(
        self,
        stage: str,
        init: Callable[[], Sums],
        update: Callable[..., None],
        after_batch: Callable[[int], None] | None = None,
        *,
        keep: bool = False,
        replay: bool = False,
        flush: Callable[[Sums], None] | None = None,
    ) -> Sums:
        """One forward/backward pass over :attr:`batches` accumulating sums; resumable via :attr:`folder`.

        ``update(sums, name, a, g, tokens, rows)`` gets each module's activations ``a`` and output gradients
        ``g`` (``[B, T, d]``), the number of counted tokens and ``rows``: the positions of the real tokens
        in the flattened ``[B * T]`` axis (``None`` when every position counts), so that products over
        tokens can skip the padding. ``after_batch(i)`` runs after the updates of batch ``i``. Every
        ``n_examples`` entry of the sums counts the examples.

        ``keep``: hold each batch's captured ``(name, a, g)`` in :attr:`memory` (when it is keeping);
        ``replay``: a batch held there is taken from it, with no forward or backward pass (the same
        tensors a pass would capture: the model is in eval mode and unchanged during the fit).
        ``flush(sums)``: moves what ``update`` accumulated elsewhere (:class:`GramSums`) into ``sums``;
        called every ``min(FLUSH_EVERY, checkpoint_every)`` batches (with or without a cache folder, so a
        pass resumed from a checkpoint adds in the same order as one never interrupted), before each
        checkpoint and at the end of the pass.

        Under torch.distributed (:mod:`influent.distributed`) rank ``r`` runs batches ``r, r + world, ...``
        and the sums are all-reduced at the end of the pass (every rank gets the totals); such a pass keeps
        no partial checkpoint (finished stages are still saved, by rank 0).
        """
        partial, done_file = (
            None if distributed.active() else self.file(f"partial-{stage}.safetensors"),
            self.file(f"stage-{stage}.safetensors"),
        )
        done = read_checkpoint(done_file, "factor checkpoint")
        if done is not None:
            return done
        offsets = np.cumsum([0] + [self.task.batch_size(b) for b in self.batches])
        order = torch.arange(int(offsets[-1])) if self.order is None else self.order.cpu()
        sums, start = self._resume(partial, init(), order)
        bar = progress_bar(len(self.batches), f"{self.label} ({stage})", self.progress, initial=start)
        with torch.enable_grad(), LinearCapture(self.modules) as cap:
            mine = set(distributed.owned(len(self.batches)))
            for i in range(start, len(self.batches)):
                if i not in mine:
                    bar.update(1)
                    continue
                n_examples = self._accumulate(cap, i, offsets, sums, update, keep, replay)
                if after_batch is not None:
                    after_batch(i)
                for k in sums:
                    if keys.is_key_of(k, keys.N_EXAMPLES):
                        sums[k] += n_examples
                checkpoint_now = (i + 1) % self.checkpoint_every == 0 and i + 1 < len(self.batches)
                if flush is not None and (checkpoint_now or (i + 1) % min(FLUSH_EVERY, self.checkpoint_every) == 0):
                    flush(sums)
                if partial is not None and checkpoint_now:
                    checkpoint = {**sums, keys.BATCHES_DONE: torch.tensor(i + 1), keys.ORDER: order}
                    store.write_tensors(partial, checkpoint)
                bar.update(1)
        bar.close()
        if flush is not None:
            flush(sums)
        for k in sorted(sums):
            distributed.all_reduce_sum(sums[k])
        if done_file is not None and distributed.rank() == 0:
            store.write_tensors(done_file, sums)
            if partial is not None:
                partial.unlink(missing_ok=True)
        return sums

    def _resume(self, partial: Path | None, sums: Sums, order: torch.Tensor) -> tuple[Sums, int]:
        """The sums and first batch to resume from: a matching partial checkpoint's, else ``(sums, 0)``."""
        saved = read_checkpoint(partial, "partial factor checkpoint")
        if saved is None or set(saved) != set(sums) | {keys.BATCHES_DONE, keys.ORDER}:
            return sums, 0
        if not torch.equal(saved.pop(keys.ORDER), order):
            return sums, 0
        start = int(saved.pop(keys.BATCHES_DONE).item())
        if not 0 <= start <= len(self.batches):
            return sums, 0
        return saved, start

    def _accumulate(self, cap: LinearCapture, i: int, offsets, sums: Sums, update, keep, replay) -> int:
        """Forward/backward of batch ``i`` (or its replay), ``update`` per module; returns its number of
        examples."""
        device = next(iter(self.modules.values())).weight.device
        batch = batch_to(self.batches[i], device)
        mask = self.task.token_mask(batch)
        size = int(offsets[i + 1] - offsets[i])
        captured = self.memory.read(i, size) if replay and self.memory is not None else None
        if captured is None:
            captured = self._capture(cap, batch, mask, offsets, i, device)
            if keep and self.memory is not None:
                self.memory.write(i, captured)
        n_tokens = mask.sum().to(torch.float64).cpu() if mask is not None else None  # only for masked inputs
        real_rows = None
        if mask is not None and bool((mask == 0).any()):
            real_rows = mask.reshape(-1).nonzero().squeeze(1)
        for name, a, g in captured:
            if mask is None or mask.shape != a.shape[:2]:
                tokens = torch.tensor(float(a.shape[0] * a.shape[1]), dtype=torch.float64)
                rows = None
            else:
                tokens, rows = n_tokens, real_rows
            with torch.no_grad():
                update(sums, name, a, g, tokens, rows)
        return size

    def _capture(self, cap: LinearCapture, batch, mask, offsets, i: int, device):
        """One forward/backward of ``batch`` (batch ``i``): the captured ``(name, a, g)`` of every module."""
        cap.set_mask(mask)
        if self.fisher == "true":
            loss = self.task.sampled_loss(
                self.model, batch, self.uniforms[offsets[i] : offsets[i + 1]].to(device)
            )
        else:
            loss = self.task.per_example_loss(self.model, batch)
        return cap.backward(loss)


DENSE_SHARE = 0.75  # real tokens >= this share of the positions: products over all rows beat gathering rows


def _mostly_real(x: torch.Tensor, rows: torch.Tensor | None) -> bool:
    return rows is None or rows.numel() >= DENSE_SHARE * x.shape[0] * x.shape[1]


def token_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, T, d]`` flattened to ``[B * T, d]``, keeping only ``rows`` (the real tokens) if given."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def real_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """:func:`token_rows`, or all ``B * T`` rows when the padded ones are few (they are zero in the passes'
    captures, so products over rows such as ``x^T x`` do not change; gathering would cost more)."""
    return token_rows(x, None if _mostly_real(x, rows) else rows)


def rotate_rows(x: torch.Tensor, basis: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x @ basis`` computed on the real-token rows only (padded rows of ``x`` are zero and stay zero);
    on every row when the padded ones are few (the same result, without the gather and scatter)."""
    if _mostly_real(x, rows):
        return x @ basis
    out = x.new_zeros(x.shape[0] * x.shape[1], basis.shape[1])
    out.index_copy_(0, rows, token_rows(x, rows) @ basis)
    return out.view(x.shape[0], x.shape[1], basis.shape[1])


class GramSums:
    """Running ``x^T x`` over token rows ``x`` ``[N, d]`` per sum key, added to float64 sums on :meth:`flush`.

    Each product is formed in the rows' dtype and added to a float64 running sum (as adding every batch's
    product to the float64 sums would): on CPU (float32 / float64) with BLAS ``syrk``, the upper triangle
    only (half the multiply-adds of a matrix product; 1 thread, 736 x 512 rows: 4.5 ms with the float64
    add, against 8-9 ms for a product and its add), elsewhere with a matrix product on the rows' device
    (no transfer per batch). :meth:`flush` adds the symmetrised running sums to the pass's sums.
    Consecutive :meth:`add` calls with the same ``source`` (modules fed the same input, such as gate / up
    or query / key / value) share one product, accumulated for that group of keys.
    """

    def __init__(self) -> None:
        self._sum: dict[tuple[str, ...], torch.Tensor] = {}  # group of keys -> float64 running sum
        self._lower: set[tuple[str, ...]] = set()  # groups whose sum holds the lower triangle only
        self._buffers: dict[tuple, np.ndarray] = {}  # syrk output per (d, dtype), reused
        self._pending: tuple[Any, torch.Tensor, list[str]] | None = None  # (source, rows, keys)

    def add(self, key: str, x: torch.Tensor, source: Any = None) -> None:
        """Accumulate ``x^T x`` for ``key``; ``source``: the tensor the rows come from, so that the next
        key added with the same ``source`` (the same object) shares this product."""
        pending = self._pending
        if pending is not None and source is not None and pending[0] is source:
            pending[2].append(key)
            return
        self._commit()
        self._pending = (source, x, [key])

    def _commit(self) -> None:
        if self._pending is None:
            return
        _, x, group = self._pending
        self._pending = None
        group = tuple(group)
        d = x.shape[1]
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            from scipy.linalg import blas

            rows = x.detach().numpy().T  # [d, N], Fortran order: syrk's A A^T is x^T x
            buf = self._buffers.get((d, rows.dtype))
            if buf is None:
                buf = self._buffers[(d, rows.dtype)] = np.zeros((d, d), dtype=rows.dtype, order="F")
            syrk = blas.ssyrk if x.dtype == torch.float32 else blas.dsyrk
            # syrk writes the upper triangle of the Fortran-ordered buffer (the lower one stays zero); its
            # transpose is the lower triangle, contiguous, which adds to the sum 3x faster than strided
            product = torch.from_numpy(syrk(1.0, rows, beta=0.0, c=buf, trans=0, overwrite_c=1)).T
            self._lower.add(group)
        else:
            product = x.T @ x
        total = self._sum.get(group)
        if total is None:
            total = self._sum[group] = torch.zeros(d, d, dtype=torch.float64, device=product.device)
        total += product

    def flush(self, sums: Sums) -> None:
        """Add every running sum (symmetrised, float64, CPU) to ``sums`` and restart from zero."""
        self._commit()
        for group, total in self._sum.items():
            full = total.to("cpu")
            if group in self._lower:
                full = full + full.tril(-1).T
            for key in group:
                sums[key] += full
            total.zero_()
