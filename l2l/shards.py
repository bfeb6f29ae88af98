"""Blocks held as row shards: FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` replaces each parameter by a ``DTensor`` sharded along dim 0 over a 1-D device
mesh: rank ``r`` of ``W`` ranks holds rows ``[r k, (r + 1) k)`` with ``k = ceil(rows / W)``
(``torch.chunk``'s split). Those are the same rows :func:`l2l.z.row_chunks` cuts ``z``
along, so a rank perturbs, shifts and dots its own rows with the matching rows of the seeded
chunks and never needs the rest of the tensor; only chunks that overlap its rows are drawn.
Everything else (names, shapes, element counts, the fingerprint) uses the global shape, so a
tuner meta-trained sharded is the same artifact as one trained on one device.

Inside a sharded module's forward, FSDP2 swaps the full (all-gathered) tensors in, so the
:class:`l2l.perturb.Perturber`'s on-the-fly forward needs no change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import EllipsisType

import torch
import torch.distributed as dist

from l2l.z import row_chunks

try:  # torch >= 2.5 public path; 2.4 keeps it under _tensor
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - old torch
    from torch.distributed._tensor import DTensor, Shard


def is_sharded(t: torch.Tensor | None) -> bool:
    return isinstance(t, DTensor)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows of t held here, index of the first)``: a writable view sharing ``t``'s storage.

    A plain tensor is all rows from 0. A ``DTensor`` must be sharded along dim 0 on a 1-D mesh
    with ``torch.chunk``'s split (what ``fully_shard`` does); anything else is refused.
    """
    if not isinstance(t, DTensor):
        return t.detach(), 0
    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.ndim == 0:
        raise NotImplementedError(
            "l2l handles parameters sharded along dim 0 on a 1-D device mesh (FSDP2's "
            f"fully_shard); got placements {tuple(t.placements)} on a {mesh.ndim}-D mesh for a "
            f"tensor of shape {tuple(t.shape)}"
        )
    local = t.to_local().detach()
    rows, world, rank = t.shape[0], mesh.size(), mesh.get_local_rank()
    per = -(-rows // world)
    start = min(rank * per, rows)
    if local.shape[0] != min(per, rows - start):
        raise NotImplementedError(
            f"unexpected shard of a {tuple(t.shape)} tensor on rank {rank} of {world}: "
            f"{local.shape[0]} rows, expected torch.chunk's {min(per, rows - start)}"
        )
    return local, start


def local_chunks(t: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, slice | EllipsisType]]:
    """For each direction chunk ``c`` of ``t`` that overlaps the rows held here:
    ``(c, view of those rows of t, index of the same rows in chunk c's z)``."""

    local, start = local_rows(t)
    if t.ndim == 0:
        yield 0, local, ...
        return
    stop = start + local.shape[0]
    for c, (r0, r1) in enumerate(row_chunks(t.shape, t.device)):
        a, b = max(r0, start), min(r1, stop)
        if a < b:
            yield c, local[a - start : b - start], slice(a - r0, b - r0)


def shard_group(params: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the sharded tensors among ``params`` are split over (``None``: none is)."""
    groups = {id(p.device_mesh): p.device_mesh for p in params if isinstance(p, DTensor)}
    if not groups:
        return None
    if len(groups) > 1:
        raise NotImplementedError("parameters sharded over different device meshes")
    return next(iter(groups.values())).get_group()


def all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup, device: torch.device):
    """Sum of ``values`` over ``group``, computed on ``device`` (NCCL needs CUDA tensors)."""
    work = values.to(device, copy=True)
    dist.all_reduce(work, group=group)
    return work.to(values.device)


def all_gather(values: torch.Tensor, group: dist.ProcessGroup, device: torch.device):
    """``(world, *values.shape)``: every rank's ``values``, rank order."""
    work = values.to(device).contiguous()
    out = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, work, group=group)
    return torch.stack(out).to(values.device)
