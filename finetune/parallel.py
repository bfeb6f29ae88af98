"""Data-parallel ZO across Fabric ranks: the loss all-reduce and a check that ranks agree.

Every rank takes the same step seed and runs the forwards on its shard of the global batch; the
2 (HiZOO: 3) float64 losses of a step are all-reduced (:class:`LossAllReduce`), so every rank
applies the identical update and no weight or gradient is ever communicated.
"""

from __future__ import annotations

from typing import Any

import torch


class LossAllReduce:
    """``loss_reduce`` for data parallel ZO: the all-reduce mean of a step's loss scalars.

    It also counts what it sends: one all-reduce of 2 (HiZOO: 3) float64 values per step.
    """

    def __init__(self, fabric) -> None:
        self.fabric = fabric
        self.calls = 0
        self.payload_bytes = 0

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.payload_bytes += losses.numel() * losses.element_size()
        return self.fabric.all_reduce(losses.to(self.fabric.device), reduce_op="mean").cpu()

    def report(self, world_size: int) -> dict[str, Any]:
        per_step = self.payload_bytes / self.calls if self.calls else 0
        return dict(
            world_size=world_size,
            all_reduces_per_step=1,
            payload_bytes_per_step=per_step,
            dtype="float64",
            note="loss scalars only; evaluation adds one small all-reduce per evaluation",
        )


def replicas_identical(fabric, params: list[torch.Tensor]) -> bool:
    """Whether every rank holds the same ``params``: float64 sum and sum of squares of each
    tensor, whose all-reduce max and min agree only when every rank has the same values."""
    local = torch.stack(
        [torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]
    ).to(fabric.device)  # (P, 2)
    high = fabric.all_reduce(local.clone(), reduce_op="max")
    low = fabric.all_reduce(local.clone(), reduce_op="min")
    return bool(torch.equal(high, low))
