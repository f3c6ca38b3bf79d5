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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influent import distributed, store
from influent.curvature.linear_grads import captured_passes, select_linear_modules
from influent.errors import CacheCorruptError, UserError
from influent.factored_influence import pairwise_scores, self_scores
from influent.index import precondition as pre
from influent.index import shards
from influent.index.projection import projections
from influent.rankings import inverse_norm
from influent.task import Batch, Task, slice_batch

BLOCK_ROWS = 16384  # rows of a shard multiplied at once (bounds the float32 copy of the mapped rows)


@dataclass
class TopK:
    """The k best (proponents) and k worst (opponents) training examples per query under a ranking.

    ``*_rows`` ``[Q, k]`` int64 are training positions, ``*_scores`` ``[Q, k]`` float64 their raw influence
    scores and ``*_values`` the ranking's values that ordered them (:mod:`influent.rankings`: the score
    itself for ``influence``, same sign as the score for ``relatif`` and ``cosine``; default: the scores);
    proponents in descending order of value, opponents ascending (most negative first). Ties: smaller row
    first.
    """

    proponent_rows: torch.Tensor
    proponent_scores: torch.Tensor
    opponent_rows: torch.Tensor
    opponent_scores: torch.Tensor
    proponent_values: torch.Tensor | None = None
    opponent_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.proponent_values is None:
            self.proponent_values = self.proponent_scores
        if self.opponent_values is None:
            self.opponent_values = self.opponent_scores


def merge_top(values: torch.Tensor, rows: torch.Tensor, k: int, largest: bool, *carried: torch.Tensor):
    """The ``k`` best of candidate ``values`` ``[Q, m]`` with their ``rows`` ``[Q, m]`` (ties: smaller row),
    and the same columns of each ``carried`` ``[Q, m]`` tensor: ``(values, rows, *carried)``, each ``[Q, k]``."""
    by_row = torch.argsort(rows, dim=1, stable=True)
    v, r = values.gather(1, by_row), rows.gather(1, by_row)
    order = torch.argsort(v, dim=1, descending=largest, stable=True)[:, :k]
    return (v.gather(1, order), r.gather(1, order), *(c.gather(1, by_row).gather(1, order) for c in carried))


def block_candidates(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Column indices ``[Q, c]`` of one block's candidates: for every query all columns whose value ties or
    beats its k-th best (``torch.topk`` per block, so the block is never fully sorted; exact under ties)."""
    m = values.shape[1]
    if m <= k:
        return torch.arange(m).expand(values.shape[0], -1)
    kth = torch.topk(values, k, dim=1, largest=largest, sorted=False).values
    edge = kth.amin(1, keepdim=True) if largest else kth.amax(1, keepdim=True)
    count = int(((values >= edge) if largest else (values <= edge)).sum(1).max())
    return torch.topk(values, count, dim=1, largest=largest, sorted=False).indices


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
    def storage_dtype(self) -> torch.dtype:
        """The rows' type on disk (float32, or bfloat16 with ``storage="bfloat16"``)."""
        return shards.STORAGE[self.manifest["config"].get("storage", "float32")][2]

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
        return self.precondition(self.projected_queries(model, task, query_batches))

    def projected_queries(self, model: nn.Module, task: Task, query_batches: Sequence[Batch]) -> torch.Tensor:
        """Projected (not preconditioned) query gradients ``[Q, width]`` (float64), one backward pass per batch."""
        self.check_model(model)
        linear = select_linear_modules(model, "all")
        modules = {m: linear[m] for m in self.modules}
        out = []
        for _, captured in captured_passes(model, task, modules, query_batches, measurement=True):
            parts = {}
            for name, a, g in captured:
                with torch.no_grad():
                    parts[name] = self.projections[name].project(a, g).double().cpu()
            out.append(torch.cat([parts[m] for m in self.modules], dim=1))
        return torch.cat(out)

    def precondition(self, rows: torch.Tensor) -> torch.Tensor:
        """The projected EK-FAC applied to projected gradients ``[Q, width]`` module by module (float64;
        unchanged under ``identity``)."""
        if self.pre is None:
            return rows.double()
        parts, start = [], 0
        for name in self.modules:
            p = self.projections[name]
            k_out, k_in = p.p_out.shape[0], p.p_in.shape[0]
            grads = rows[:, start: start + k_out * k_in].double().reshape(-1, k_out, k_in)
            out = pre.precondition(grads, self.pre[f"q_a/{name}"], self.pre[f"q_s/{name}"],
                                   self.pre[f"lambda/{name}"], self.manifest["damping_per_module"][name])
            parts.append(out.reshape(rows.shape[0], -1))
            start += k_out * k_in
        return torch.cat(parts, dim=1)

    def self_influence(self) -> torch.Tensor:
        """Each indexed example's self-influence ``<precondition(G'_i), G'_i>`` (``[n]`` float64, >= 0), stored
        at build time (the denominators of RelatIF and the cosine).

        Raises:
            UserError: (field ``index``) an index built before the self-influence was stored.
        """
        path = self.folder / shards.SELF_INFLUENCE
        if not path.exists():
            raise UserError(f"index {str(self.folder)!r} stores no self-influence (built by an older influent); "
                            "build it again to rank by relatif or cosine", field="index")
        return store.read_tensors(path)["self"]

    def shard_blocks(self, shard_ids: Sequence[int] | None = None):
        """Yield ``(rows [m] int64, grads [m, width] float32 or bfloat16)`` blocks of the shards,
        memory-mapped (the ``grads`` tensors are views of read-only pages: do not write to them)."""
        entries = self.manifest["shards"]
        for s in range(len(entries)) if shard_ids is None else shard_ids:
            grads, rows = shards.open_shard(self.folder / entries[s]["file"])
            if grads.shape[0] != entries[s]["rows"]:
                raise CacheCorruptError(f"index shard {entries[s]['file']} has {grads.shape[0]} rows, "
                                        f"manifest says {entries[s]['rows']}")
            for lo in range(0, grads.shape[0], BLOCK_ROWS):
                hi = min(grads.shape[0], lo + BLOCK_ROWS)
                yield torch.from_numpy(rows[lo:hi]), shards.as_tensor(grads[lo:hi])

    def pairwise_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """The full ``[Q, n]`` score matrix (float64) for query vectors (small n: tests, benchmarks)."""
        out = torch.zeros(vectors.shape[0], self.n, dtype=torch.float64)
        q = vectors.to(self.storage_dtype)
        for rows, grads in self.shard_blocks():
            out[:, rows] = (q @ grads.T).double()
        return out

    def top_k(self, vectors: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> TopK:
        """Top-``k`` proponents and opponents per query by a streaming partial sort over the shards.

        Args:
            vectors: preconditioned query vectors ``[Q, width]`` (:meth:`query_vectors`).
            k: examples per side.
            weights: ``[n]`` non-negative per-example factors of the ranking value (``score * weights[row]``:
                ``1 / sqrt(self-influence)`` for RelatIF); None ranks by the score.

        Each shard block's ``[Q, rows]`` scores are reduced to their candidates (:func:`block_candidates`)
        and merged with the running lists, so neither the ``[Q, n]`` matrix nor a sort of a whole block is
        formed. Under torch.distributed each rank scores the shards it owns and the lists are merged; every
        rank returns the same :class:`TopK`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"top must be an integer >= 1, got {k!r}", field="top")
        q = vectors.to(self.storage_dtype)  # bfloat16 rows: a bfloat16 product (float32 accumulation)
        n_q = vectors.shape[0]
        empty = tuple(torch.empty(n_q, 0, dtype=d) for d in (torch.float64, torch.long, torch.float64))
        sides = {True: empty, False: empty}
        buffer = torch.empty(n_q * BLOCK_ROWS, dtype=q.dtype)  # one block's scores, reused
        for rows, grads in self.shard_blocks(distributed.owned(len(self.manifest["shards"]))):
            scores = torch.matmul(q, grads.T, out=buffer[: n_q * grads.shape[0]].view(n_q, grads.shape[0]))
            values = scores if weights is None else scores.double() * weights[rows].double()
            for largest, (v, r, s) in sides.items():
                cols = block_candidates(values, k, largest)
                sides[largest] = merge_top(torch.cat([v, values.gather(1, cols).double()], 1),
                                           torch.cat([r, rows[cols]], 1), k, largest,
                                           torch.cat([s, scores.gather(1, cols).double()], 1))
        if distributed.active():
            sides = {largest: _merge_ranks(side, k, largest) for largest, side in sides.items()}
        (bv, br, bs), (wv, wr, ws) = sides[True], sides[False]
        return TopK(br, bs, wr, ws, bv, wv)


def _merge_ranks(side, k: int, largest: bool):
    """Every rank's ``(values, rows, scores)`` lists gathered and merged (the same on every rank)."""
    parts = distributed.all_gather_objects([t.tolist() for t in side])
    n_q = side[0].shape[0]
    cat = [torch.cat([torch.tensor(p[i], dtype=d).reshape(n_q, -1) for p in parts], 1)
           for i, d in enumerate((torch.float64, torch.long, torch.float64))]
    return merge_top(cat[0], cat[1], k, largest, cat[2])


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


def rerank(top: TopK, method, queries: Sequence[Batch], depth: int | None = None, rank: str = "influence") -> TopK:
    """Rescore each query's candidates with an unprojected factored engine and re-sort them.

    Args:
        top: the index's candidates (proponents and opponents, ``k`` each).
        method: a :class:`~influent.factored_influence.FactoredInfluence` over the same training data in
            the same order (its factors are fitted on all of it, or loaded from its cache).
        queries: the query batches the candidates were found for.
        depth: keep this many per side after reranking (default: all ``k``).
        rank: ``influence``, ``relatif`` or ``cosine`` (:mod:`influent.rankings`): the exact ranking value,
            with the candidates' exact self-influence (and the queries', for the cosine).

    Returns:
        a :class:`TopK` whose scores and values are the factored engine's, re-sorted by value; only the
        candidates are passed through the model.
    """
    rows = torch.cat([top.proponent_rows, top.opponent_rows], 1)
    subset, order = training_subset(method.task, method.train_batches, rows.reshape(-1).tolist())
    exact = pairwise_scores(method.model, method.task, method.factors, list(queries), subset, progress=False,
                            bucket=False)
    values = exact
    if rank != "influence":
        own = self_scores(method.model, method.task, method.factors, subset, progress=False, bucket=False)
        values = exact * inverse_norm(own)[None, :]
        if rank == "cosine":
            values = values * inverse_norm(method.query_self_scores(list(queries)))[:, None]
    where = {r: i for i, r in enumerate(order)}
    k = depth or top.proponent_rows.shape[1]
    sides = []
    for found, largest in ((top.proponent_rows, True), (top.opponent_rows, False)):
        cols = torch.tensor([[where[int(r)] for r in q] for q in found.tolist()])
        sides.append(merge_top(values.gather(1, cols), found, k, largest, exact.gather(1, cols)))
    (bv, br, bs), (wv, wr, ws) = sides
    return TopK(br, bs, wr, ws, bv, wv)
