"""Rank body for tests/test_shards.py (importable by the spawned processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def build() -> nn.Module:
    """Odd row counts (7 and 3): shards of unequal size, chunks straddling the shard boundary."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3))


def loss_of(model: nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    return model(x).square().mean()


def results(model: nn.Module, blocks) -> dict[str, torch.Tensor]:
    from l2l.meta import _grad_dot_z, _shift
    from l2l.shards import is_sharded

    mean, var = blocks.statistics()
    loss_of(model).backward()
    dots = _grad_dot_z(blocks, seed=11)
    _shift(blocks, seed=11, coeffs=torch.linspace(0.5, 1.5, len(blocks)).double())
    shifted = [p.full_tensor() if is_sharded(p) else p for p in blocks.params]
    return dict(
        mean=mean, var=var, dots=dots, shifted=torch.cat([p.detach().reshape(-1) for p in shifted])
    )


def run(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import l2l.z
        from l2l.blocks import ParamBlocks

        l2l.z.CHUNK_ELEMENTS = 8  # several z chunks per block, cut across the shards
        reference = build()
        expected = results(reference, ParamBlocks.from_module(reference))
        sharded = build()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(sharded[0], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        got = results(sharded, ParamBlocks.from_module(sharded))
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)
        queue.put((rank, "ok"))
    except Exception as e:  # reported to the test, which fails with it
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()
