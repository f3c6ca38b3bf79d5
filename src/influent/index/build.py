"""``build_index``: one pass over the training data writing every example's projected gradient to disk.

Per training example and tracked ``nn.Linear`` module the gradient of ``task.per_example_loss`` is
projected through the module's Kronecker structure (:mod:`influent.index.projection`) and the rows are
written in shards of about ``shard_size`` examples (whole batches; :mod:`influent.index.shards`). Each shard
also keeps its examples' projected token covariances, so a build killed part-way resumes with the
finished shards (same build key) kept and only the rest computed, and the EK-FAC preconditioner in the
projected space (:mod:`influent.index.precondition`) is fitted at the end from the shards alone.

Under torch.distributed (``torchrun``) rank ``r`` computes shards ``r, r + world, ...``; covariances and
eigenvalue corrections are summed over ranks by all-reduce, and rank 0 writes the preconditioner and the
manifest. The result is the same index as one process writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from influent import distributed, store
from influent.curvature.fingerprints import data_fingerprint, model_fingerprint
from influent.curvature.linear_grads import captured_passes, module_shapes, select_linear_modules
from influent.errors import UserError
from influent.index import precondition as pre
from influent.index import shards
from influent.index.projection import KINDS, ModuleProjection, projections
from influent.progress import progress_bar
from influent.task import Batch, Task

FORMAT_VERSION = 2  # 2: the self-influence of every example is stored (RelatIF, cosine)


@dataclass(frozen=True)
class IndexConfig:
    """Settings of a gradient index (all in its build key).

    Attributes:
        rank: ``k_in = k_out`` of every module's projection (capped at the module's widths); bytes per
            example = 4 (2 with ``bfloat16`` storage) x sum over modules of ``k_out * k_in``.
        seed: seed of the projection matrices.
        modules: tracked modules (``all``, ``trainable``, ``mlp`` or a regex; ``select_linear_modules``).
        projection: ``gaussian`` (LoGra) or ``orthogonal`` (rows orthonormal).
        strategy: ``ekfac`` (preconditioner fitted in the projected space) or ``identity`` (dot products).
        damping: absolute damping, or None for ``damping_fraction`` x the module's mean eigenvalue
            (unprojected scale: ``sum(lambda) / (d_out d_in)``; :func:`~influent.index.precondition.heuristic_damping`).
        damping_fraction: the heuristic's fraction.
        shard_size: examples per shard (rounded up to whole batches).
        storage: ``float32`` or ``bfloat16`` rows (half the bytes and a bfloat16 product at query time; 8
            significant bits per entry). The preconditioner and self-influence come from the stored rows.
    """

    rank: int = 16
    seed: int = 0
    modules: str = "trainable"
    projection: str = "gaussian"
    strategy: str = "ekfac"
    damping: float | None = None
    damping_fraction: float = 0.1
    shard_size: int = 4096
    storage: str = "float32"

    def validate(self) -> None:
        """Raise :class:`~influent.errors.UserError` naming the field of the first bad setting."""
        for name, value in (("rank", self.rank), ("shard_size", self.shard_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}", field=name)
        if self.projection not in KINDS:
            raise UserError(f"projection: expected one of {', '.join(KINDS)}", field="projection")
        if self.storage not in shards.STORAGE:
            raise UserError(f"storage: expected one of {', '.join(shards.STORAGE)}, got {self.storage!r}",
                            field="storage")
        if self.strategy not in pre.STRATEGIES:
            raise UserError(f"strategy: the index supports {', '.join(pre.STRATEGIES)}, got {self.strategy!r}",
                            field="strategy")
        if self.damping is not None and not (self.damping >= 0 and self.damping < float("inf")):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}", field="damping")


def shard_plan(sizes: Sequence[int], shard_size: int) -> list[list[int]]:
    """Consecutive batch indices grouped into shards of at least ``shard_size`` examples (the last may be short)."""
    plan, current, count = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        count += size
        if count >= shard_size:
            plan.append(current)
            current, count = [], 0
    if current:
        plan.append(current)
    return plan


def build_index(
    model: nn.Module,
    task: Task,
    batches: Sequence[Batch],
    folder: str | Path,
    config: IndexConfig | None = None,
    *,
    progress: bool = True,
    data_id: str | None = None,
) -> dict:
    """Build (or finish, or find complete) the index of ``batches`` in ``folder``; returns its manifest.

    Args:
        model: the trained model (eval mode during the pass; its device is used for the batches).
        task: ``per_example_loss`` is differentiated per training example.
        batches: the training data in a fixed order (row ``j`` of the index is the j-th example).
        folder: the index folder (created; a folder holding another build's index is refused).
        config: :class:`IndexConfig` (None: defaults).
        progress: show a progress bar (rank 0).
        data_id: fingerprint of the training data; default: the hash of every tensor in ``batches``.

    Raises:
        UserError: (field ``index``) when ``folder`` holds the complete index of a different build.
    """
    config = config or IndexConfig()
    config.validate()
    folder = Path(folder)
    batches = list(batches)
    modules = select_linear_modules(model, config.modules)
    shapes = module_shapes(modules)
    proj = projections(shapes, config.rank, config.seed, config.projection)
    sizes = [int(task.batch_size(b)) for b in batches]
    n = sum(sizes)
    if n == 0:
        raise UserError("no training examples to index", field="data")
    key = store.fingerprint(FORMAT_VERSION, asdict(config), list(shapes.items()), data_id or data_fingerprint(batches),
                            model_fingerprint(model), float(task.l2 or 0.0), n)
    existing = folder / shards.MANIFEST
    if existing.exists():
        manifest = store.read_json(existing)
        if manifest.get("key") == key:
            return {**manifest, "shards_built_this_run": 0}
        raise UserError(f"index {str(folder)!r} holds another build's index (key {manifest.get('key')}); "
                        "give a new folder", field="index")
    plan = shard_plan(sizes, config.shard_size)
    starts = [sum(sizes[: b[0]]) for b in plan]
    started = time.perf_counter()
    mine = distributed.owned(len(plan))
    todo = [s for s in mine if shards.shard_key(shards.shard_path(folder, s)) != key]
    bar = progress_bar(total=sum(sizes[b] for s in todo for b in plan[s]), desc="index build",
                       enabled=progress and distributed.rank() == 0, unit="example")
    for s in todo:
        grads, covs = _project_batches(model, task, [batches[b] for b in plan[s]], modules, proj, bar)
        rows = torch.arange(starts[s], starts[s] + grads.shape[0])
        _write(folder, s, grads, rows, covs, key, config.storage)
    bar.close()
    seconds = time.perf_counter() - started
    distributed.barrier()
    fitted = _fit_preconditioner(folder, mine, proj, config, float(task.l2 or 0.0), n)
    own = {s: _self_influence(folder, s, proj, fitted).tolist() for s in mine}
    parts = distributed.all_gather_objects(({s: shards.file_sha256(shards.shard_path(folder, s)) for s in mine},
                                             len(todo), seconds, own))
    manifest = _manifest(config, key, model, modules, proj, plan, starts, sizes, [p[0] for p in parts], fitted, n,
                         data_id, batches, max(p[2] for p in parts), sum(p[1] for p in parts))
    if distributed.rank() == 0:
        if fitted is not None:
            store.write_tensors(folder / shards.PRECONDITIONER, fitted[0])
        by_shard = {int(s): v for part in parts for s, v in part[3].items()}
        selfs = torch.tensor([x for s in range(len(plan)) for x in by_shard[s]], dtype=torch.float64)
        store.write_tensors(folder / shards.SELF_INFLUENCE, {"self": selfs})
        store.write_json(existing, manifest)
    distributed.barrier()
    return manifest


def _project_batches(model, task, batches, modules, proj: dict[str, ModuleProjection], bar):
    """Projected per-example gradients ``[rows, width]`` (float32) and the covariance sums of ``batches``."""
    device = next(iter(modules.values())).weight.device
    covs = pre.CovarianceSums({n: (p.p_out.shape[0], p.p_in.shape[0]) for n, p in proj.items()}, device)
    out = []
    for loss, captured in captured_passes(model, task, modules, batches):
        parts = []
        for name, a, g in captured:
            with torch.no_grad():
                pa, pg = proj[name].project_tokens(a, g)
                covs.add(name, pa, pg)
                parts.append(torch.bmm(pg.transpose(1, 2), pa).reshape(a.shape[0], -1))
        out.append(torch.cat(parts, dim=1).float().cpu())
        bar.update(int(loss.shape[0]))
    return torch.cat(out), covs


def _write(folder: Path, index: int, grads, rows, covs: pre.CovarianceSums, key: str, storage: str) -> None:
    """One shard: its gradients (as ``storage``), rows and covariance sums (``cov_a/<module>``, ``cov_s/<module>``)."""
    path = shards.shard_path(folder, index)
    tensors = {shards.GRADS: grads.to(shards.STORAGE[storage][2]), shards.ROWS: rows.long()}
    for name in covs.a:
        tensors[f"cov_a/{name}"] = covs.a[name].cpu()
        tensors[f"cov_s/{name}"] = covs.s[name].cpu()
    store.write_tensors(path, tensors, metadata={"key": key, "shard": index})


def module_slices(proj: dict[str, ModuleProjection]) -> dict[str, tuple[int, int]]:
    """``{module: (start, end)}`` columns of each module's projected gradient in an index row."""
    out, start = {}, 0
    for name, p in proj.items():
        out[name] = (start, start + p.width)
        start += p.width
    return out


def _fit_preconditioner(folder, mine, proj, config: IndexConfig, l2: float, n: int):
    """``(tensors, damping per module)`` of the projected EK-FAC from the shards (None for identity)."""
    if config.strategy == "identity":
        return None
    covs = pre.CovarianceSums({m: (p.p_out.shape[0], p.p_in.shape[0]) for m, p in proj.items()})
    for s in mine:
        with safe_open(str(shards.shard_path(folder, s)), framework="pt") as fh:
            for name in proj:
                covs.a[name] += fh.get_tensor(f"cov_a/{name}")
                covs.s[name] += fh.get_tensor(f"cov_s/{name}")
    covs.all_reduce()
    bases = covs.eigenbases()
    slices = module_slices(proj)
    lam = {m: torch.zeros(p.p_out.shape[0], p.p_in.shape[0], dtype=torch.float64) for m, p in proj.items()}
    for s in mine:
        grads, _ = shards.open_shard(shards.shard_path(folder, s))
        for name, (lo, hi) in slices.items():
            k_out, k_in = lam[name].shape
            block = shards.as_tensor(grads[:, lo:hi]).double().reshape(-1, k_out, k_in)
            lam[name] += pre.rotate(block, *bases[name]).square().sum(0)
    tensors, damping = {}, {}
    for name in proj:
        distributed.all_reduce_sum(lam[name])
        lam[name] /= n
        full = proj[name].p_out.shape[1] * proj[name].p_in.shape[1]
        damping[name] = pre.heuristic_damping(lam[name], config.damping, config.damping_fraction, l2, full)
        tensors[f"q_a/{name}"], tensors[f"q_s/{name}"] = bases[name]
        tensors[f"lambda/{name}"] = lam[name]
    return tensors, damping


def _self_influence(folder: Path, shard: int, proj: dict[str, ModuleProjection], fitted) -> torch.Tensor:
    """``<precondition(G'_i), G'_i>`` of each row of one shard (``[rows]`` float64; ``|G'_i|^2`` for identity):
    ``sum (Q_S^T G' Q_A)^2 / (lambda + damping)`` over the modules."""
    grads, _ = shards.open_shard(shards.shard_path(folder, shard))
    total = torch.zeros(grads.shape[0], dtype=torch.float64)
    for name, (lo, hi) in module_slices(proj).items():
        block = shards.as_tensor(grads[:, lo:hi]).double()
        if fitted is None:
            total += block.square().sum(1)
            continue
        tensors, damping = fitted
        k_out, k_in = proj[name].p_out.shape[0], proj[name].p_in.shape[0]
        rotated = pre.rotate(block.reshape(-1, k_out, k_in), tensors[f"q_a/{name}"], tensors[f"q_s/{name}"])
        total += (rotated.square() / (tensors[f"lambda/{name}"] + damping[name])).sum((1, 2))
    return total


def _manifest(config, key, model, modules, proj, plan, starts, sizes, checks, fitted, n, data_id, batches,
              seconds, built) -> dict:
    sums = {int(s): c for part in checks for s, c in part.items()}
    width = sum(p.width for p in proj.values())
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "config": asdict(config),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_id or data_fingerprint(batches),
        "n_examples": n,
        "modules": {m: {"shape": list(p.p_out.shape[1:]) + list(p.p_in.shape[1:]),
                        "projected": [p.p_out.shape[0], p.p_in.shape[0]], "columns": list(module_slices(proj)[m])}
                    for m, p in proj.items()},
        "width": width,
        "bytes_per_example": torch.finfo(shards.STORAGE[config.storage][2]).bits // 8 * width,
        "damping_per_module": None if fitted is None else fitted[1],
        "self_influence": shards.SELF_INFLUENCE,
        "shards": [{"file": shards.shard_path(Path("."), s).name, "start": starts[s],
                    "rows": sum(sizes[b] for b in plan[s]), "sha256": sums[s]} for s in range(len(plan))],
        "world_size": distributed.world_size(),
        "build_seconds": seconds,  # the slowest rank's pass (without the preconditioner's fit)
        "shards_built_this_run": built,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
