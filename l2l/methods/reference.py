"""MeZO written plainly from the paper (Malladi et al. 2023, Algorithm 1), for testing only.

Four in-place passes per step, each re-generating z parameter by parameter from the step seed:
+eps z, -2 eps z, +eps z (restore), then the update. It is slow and, in half precision, the
restore drifts; :class:`l2l.ZOSGD` must follow the same trajectory (allclose) in float32.
z_b is :func:`l2l.z.gaussian_block` so both draw the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from l2l.blocks import ParamBlocks, is_no_decay
from l2l.z import gaussian_block


def _perturb_parameters(blocks: ParamBlocks, seed: int, scale: float) -> None:
    for b, p in enumerate(blocks.params):
        z = gaussian_block(seed, b, p)  # re-generated from the seed for every pass
        p.data.add_(z.to(p.dtype), alpha=scale)


@torch.no_grad()
def mezo_reference_step(
    blocks: ParamBlocks,
    closure: Callable[[], torch.Tensor],
    seed: int,
    lr: float,
    eps: float,
    weight_decay: float = 0.0,
) -> tuple[float, float]:
    """One MeZO step; returns (projected_grad, loss_plus)."""
    _perturb_parameters(blocks, seed, eps)
    loss_plus = float(closure())
    _perturb_parameters(blocks, seed, -2 * eps)
    loss_minus = float(closure())
    _perturb_parameters(blocks, seed, eps)
    projected_grad = (loss_plus - loss_minus) / (2 * eps)
    for b, (name, p) in enumerate(zip(blocks.names, blocks.params, strict=True)):
        z = gaussian_block(seed, b, p)
        decay = 0.0 if is_no_decay(name, p) else weight_decay
        p.data.sub_(lr * (projected_grad * z.to(p.dtype) + decay * p.data))
    return projected_grad, loss_plus
