"""Queries against a gradient index: one backward pass per query batch, one product per shard, top-k.

:class:`GradientIndex` opens an index folder (manifest, preconditioner; shards memory-mapped as they are
read). :meth:`GradientIndex.query_vectors` projects each query's gradient of ``task.query_measurement``
exactly as the build projected training gradients and applies the projected EK-FAC, so
``score(train j, query q) = <precondition(P_out G_q P_in^T), P_out G_j P_in^T>`` summed over modules
(positive = proponent; the units of the factored engine's scores in the projected space).
:meth:`GradientIndex.top_k` streams the shards: each shard's ``[Q, rows]`` block is reduced to its k
largest and k smallest scores and merged with the running lists, so the full ``[Q, n]`` matrix is never
held. Under torch.distributed each rank scores its own shards and the lists are merged (same result).
:func:`rerank` rescores the candidates with the unprojected factored engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influent import distributed, store
from influent.curvature.linear_grads import LinearCapture, select_linear_modules
from influent.errors import CacheCorruptError, UserError
from influent.factored_influence import pairwise_scores
from influent.index import precondition as pre
from influent.index import shards
from influent.index.projection import projections
from influent.task import Batch, Task, batch_to, slice_batch

BLOCK_ROWS = 16384  # rows of a shard multiplied at once (bounds the float32 copy of the mapped rows)


@dataclass
class TopK:
    """The k most positive (proponents) and most negative (opponents) scores per query.

    ``*_rows`` ``[Q, k]`` int64 are training positions, ``*_scores`` ``[Q, k]`` float64 their scores;
    proponents in descending order, opponents ascending (most negative first). Ties: smaller row first.
    """

    proponent_rows: torch.Tensor
    proponent_scores: torch.Tensor
    opponent_rows: torch.Tensor
    opponent_scores: torch.Tensor


def merge_top(scores: torch.Tensor, rows: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of candidate ``scores`` ``[Q, m]`` with their ``rows`` ``[Q, m]`` (ties: smaller row)."""
    by_row = torch.argsort(rows, dim=1, stable=True)
    s, r = scores.gather(1, by_row), rows.gather(1, by_row)
    order = torch.argsort(s, dim=1, descending=largest, stable=True)[:, :k]
    return s.gather(1, order), r.gather(1, order)


class GradientIndex:
    """An index folder written by :func:`~influent.index.build.build_index`, opened for queries."""

    def __init__(self, folder: str | Path, verify: bool = False) -> None:
        """Open ``folder``; ``verify`` checks every shard's sha256 against the manifest first.

        Raises:
            UserError: (field ``index``) when the folder holds no complete index.
            CacheCorruptError: when a checked shard does not match its checksum.
        """
        self.folder = Path(folder)
        path = self.folder / shards.MANIFEST
        if not path.exists():
            raise UserError(f"index {str(self.folder)!r} holds no complete index (no {shards.MANIFEST})",
                            field="index")
        self.manifest = store.read_json(path)
        config = self.manifest["config"]
        info = self.manifest["modules"]
        # the row layout is the build's module order (the columns), not the JSON's (sorted) key order
        self.modules = sorted(info, key=lambda m: info[m]["columns"][0])
        shapes = {m: (info[m]["shape"][0], info[m]["shape"][1]) for m in self.modules}
        self.projections = projections(shapes, config["rank"], config["seed"], config["projection"])
        self.n = int(self.manifest["n_examples"])
        self.pre = None
        if config["strategy"] == "ekfac":
            self.pre = store.read_tensors(self.folder / shards.PRECONDITIONER)
        if verify:
            for entry in self.manifest["shards"]:
                shards.verify_shard(self.folder / entry["file"], entry["sha256"])

    @property
    def bytes_per_example(self) -> int:
        """Bytes of one index row (float32 projected gradients of every module)."""
        return int(self.manifest["bytes_per_example"])

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~influent.errors.UserError` unless ``model`` has the indexed modules and widths."""
        linear = select_linear_modules(model, "all")
        for name, info in self.manifest["modules"].items():
            m = linear.get(name)
            if m is None or [m.out_features, m.in_features + int(m.bias is not None)] != info["shape"]:
                raise UserError(f"the index was built on a model with module {name} {info['shape']}; "
                                "this model differs", field="index")

    def query_vectors(self, model: nn.Module, task: Task, query_batches: Sequence[Batch]) -> torch.Tensor:
        """Preconditioned projected query gradients ``[Q, width]`` (float64), one backward pass per batch."""
        self.check_model(model)
        linear = select_linear_modules(model, "all")
        modules = {m: linear[m] for m in self.modules}
        device = next(iter(modules.values())).weight.device
        out = []
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad(), LinearCapture(modules) as cap:
                for batch in query_batches:
                    batch = batch_to(batch, device)
                    cap.set_mask(task.token_mask(batch))
                    f = task.query_measurement(model, batch)
                    parts = []
                    for name, a, g in cap.backward(f):
                        with torch.no_grad():
                            parts.append(self._precondition(name, self.projections[name].project(a, g)))
                    out.append(torch.cat(parts, dim=1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def _precondition(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        p = self.projections[name]
        if self.pre is None:
            return flat.double()
        k_out, k_in = p.p_out.shape[0], p.p_in.shape[0]
        damping = self.manifest["damping_per_module"][name]
        grads = flat.double().cpu().reshape(-1, k_out, k_in)
        out = pre.precondition(grads, self.pre[f"q_a/{name}"], self.pre[f"q_s/{name}"], self.pre[f"lambda/{name}"],
                               damping)
        return out.reshape(flat.shape[0], -1)

    def shard_blocks(self, shard_ids: Sequence[int] | None = None):
        """Yield ``(rows [m] int64, grads [m, width] float32)`` blocks of the shards, memory-mapped (the
        ``grads`` tensors are views of read-only pages: do not write to them)."""
        entries = self.manifest["shards"]
        for s in range(len(entries)) if shard_ids is None else shard_ids:
            grads, rows = shards.open_shard(self.folder / entries[s]["file"])
            if grads.shape[0] != entries[s]["rows"]:
                raise CacheCorruptError(f"index shard {entries[s]['file']} has {grads.shape[0]} rows, "
                                        f"manifest says {entries[s]['rows']}")
            for lo in range(0, grads.shape[0], BLOCK_ROWS):
                hi = min(grads.shape[0], lo + BLOCK_ROWS)
                with warnings.catch_warnings():  # read-only mapped pages, never written: no copy needed
                    warnings.simplefilter("ignore", UserWarning)
                    block = torch.from_numpy(grads[lo:hi])
                yield torch.from_numpy(rows[lo:hi]), block

    def pairwise_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """The full ``[Q, n]`` score matrix (float64) for query vectors (small n: tests, benchmarks)."""
        out = torch.zeros(vectors.shape[0], self.n, dtype=torch.float64)
        q32 = vectors.float()
        for rows, grads in self.shard_blocks():
            out[:, rows] = (q32 @ grads.T).double()
        return out

    def top_k(self, vectors: torch.Tensor, k: int) -> TopK:
        """Top-``k`` proponents and opponents per query by a streaming partial sort over the shards.

        Under torch.distributed each rank scores the shards it owns and the lists are merged; every rank
        returns the same :class:`TopK`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"top must be an integer >= 1, got {k!r}", field="top")
        q32 = vectors.float()
        n_q = vectors.shape[0]
        empty = (torch.empty(n_q, 0, dtype=torch.float64), torch.empty(n_q, 0, dtype=torch.long))
        best, worst = empty, empty
        for rows, grads in self.shard_blocks(distributed.owned(len(self.manifest["shards"]))):
            s = (q32 @ grads.T).double()
            r = rows.expand(n_q, -1)
            best = merge_top(torch.cat([best[0], s], 1), torch.cat([best[1], r], 1), k, largest=True)
            worst = merge_top(torch.cat([worst[0], s], 1), torch.cat([worst[1], r], 1), k, largest=False)
        if distributed.active():
            parts = distributed.all_gather_objects([t.tolist() for t in (*best, *worst)])
            cat = [torch.cat([torch.tensor(p[i], dtype=d).reshape(n_q, -1) for p in parts], 1)
                   for i, d in enumerate((torch.float64, torch.long, torch.float64, torch.long))]
            best = merge_top(cat[0], cat[1], k, largest=True)
            worst = merge_top(cat[2], cat[3], k, largest=False)
        return TopK(best[1], best[0], worst[1], worst[0])


def training_subset(task: Task, batches: Sequence[Batch], rows: Sequence[int]) -> tuple[list[Batch], list[int]]:
    """The training examples at positions ``rows`` as batches (one per source batch, padding kept) and
    their positions in the order of those batches."""
    wanted = sorted({int(r) for r in rows})
    out, order, start, j = [], [], 0, 0
    for batch in batches:
        size = int(task.batch_size(batch))
        local = []
        while j < len(wanted) and wanted[j] < start + size:
            local.append(wanted[j] - start)
            j += 1
        if local:
            out.append(slice_batch(batch, torch.tensor(local)))
            order.extend(start + i for i in local)
        start += size
    return out, order


def rerank(top: TopK, method, queries: Sequence[Batch], depth: int | None = None) -> TopK:
    """Rescore each query's candidates with an unprojected factored engine and re-sort them.

    Args:
        top: the index's candidates (proponents and opponents, ``k`` each).
        method: a :class:`~influent.factored_influence.FactoredInfluence` over the same training data in
            the same order (its factors are fitted on all of it, or loaded from its cache).
        queries: the query batches the candidates were found for.
        depth: keep this many per side after reranking (default: all ``k``).

    Returns:
        a :class:`TopK` whose scores are the factored engine's, re-sorted; only the candidates are scored.
    """
    rows = torch.cat([top.proponent_rows, top.opponent_rows], 1)
    subset, order = training_subset(method.task, method.train_batches, rows.reshape(-1).tolist())
    exact = pairwise_scores(method.model, method.task, method.factors, list(queries), subset, progress=False,
                            bucket=False)
    where = {r: i for i, r in enumerate(order)}
    k = depth or top.proponent_rows.shape[1]
    pro = exact.gather(1, torch.tensor([[where[int(r)] for r in q] for q in top.proponent_rows.tolist()]))
    opp = exact.gather(1, torch.tensor([[where[int(r)] for r in q] for q in top.opponent_rows.tolist()]))
    best = merge_top(pro, top.proponent_rows, k, largest=True)
    worst = merge_top(opp, top.opponent_rows, k, largest=False)
    return TopK(best[1], best[0], worst[1], worst[0])
