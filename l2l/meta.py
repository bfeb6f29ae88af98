"""Meta-training of a block-scale tuner (ZO Fine-tuner's learning-to-learn step), plain PyTorch.

One meta-step on a minibatch (Section 3 of ZO Fine-tuner):
  1. sigma_b = tuner(x_b) with autograd on; nf = sqrt(sum n_b) / sqrt(sum n_b sigma_b^2) (constant);
  2. L+, L- at theta0 +- eps nf sigma_b z_b (seeded, on the fly), g = (L+ - L-) / (2 eps);
  3. look-ahead theta1 = theta0 - lr_update g nf sigma_b(omega) z_b   (g, z, nf constant);
  4. meta-loss L(theta1) on the same minibatch; its gradient w.r.t. omega goes into the tuner.

Implementation: theta1 is applied in place (no second copy of the model), one backward at theta1
gives dL/dtheta1, and the chain rule through the scalar block coefficient
c_b = lr_update g nf sigma_b gives dL/dsigma_b = -lr_update g nf <dL/dtheta1_b, z_b>. Backpropagating
sum_b sigma_b * stopgrad(dL/dsigma_b) into the tuner is exactly the autograd meta-gradient, without
keeping a graph through the model twice. The same dL/dtheta1 is returned for the base model's own
first-order inner step (it differs from dL/dtheta0 by O(lr_update), ~1e-6), which saves a backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from l2l.blocks import ParamBlocks
from l2l.perturb import Perturber
from l2l.scales import block_features, normalisation
from l2l.shards import all_reduce_sum, is_sharded, local_chunks, shard_group
from l2l.z import param_chunk_z


@dataclass
class MetaState:
    """Tuner inputs carried between steps (ZO Fine-tuner starts at sigma = 1, losses 0)."""

    loss_plus: float = 0.0
    loss_minus: float = 0.0
    sigma: torch.Tensor | None = None


@dataclass
class MetaStepOutput:
    meta_loss: torch.Tensor  # L(theta1), detached
    loss_plus: float
    loss_minus: float
    projected_grad: float
    sigma: torch.Tensor  # (B,) raw tuner output, detached
    scales: torch.Tensor  # (B,) nf * sigma, detached
    nf: float = 1.0


def _z(blocks: ParamBlocks, seed: int, b: int, c: int) -> torch.Tensor:
    return param_chunk_z(seed, b, c, blocks.params[b])


@torch.no_grad()
def _shift(blocks: ParamBlocks, seed: int, coeffs: torch.Tensor) -> None:
    """theta_b += coeffs[b] z_b in place (a sharded block: the rows held here)."""
    for b, p in enumerate(blocks.params):
        for c, view, rows in local_chunks(p):
            view.add_(_z(blocks, seed, b, c)[rows].to(view.dtype), alpha=float(coeffs[b]))


@torch.no_grad()
def _grad_dot_z(blocks: ParamBlocks, seed: int) -> torch.Tensor:
    """(B,) float64 <dL/dtheta_b, z_b>; sharded blocks sum their rows' parts over the ranks."""
    sums: dict[int, torch.Tensor] = {}  # block -> float64 sum on the block's device (no sync)
    sharded = torch.zeros(len(blocks), dtype=torch.bool)
    for b, p in enumerate(blocks.params):
        if p.grad is None:
            continue
        sharded[b] = is_sharded(p.grad)
        for c, grad, rows in local_chunks(p.grad):
            part = (grad.float() * _z(blocks, seed, b, c)[rows]).sum(dtype=torch.float64)
            sums[b] = part if b not in sums else sums[b] + part
    dots = torch.zeros(len(blocks), dtype=torch.float64)
    if sums:  # one transfer to the host for all blocks
        home = next(iter(sums.values())).device
        dots[list(sums)] = torch.stack([v.to(home) for v in sums.values()]).cpu()
    if bool(sharded.any()):
        first = blocks.params[int(sharded.nonzero()[0])]
        total = all_reduce_sum(dots * sharded, shard_group(blocks.params), first.device)
        dots = torch.where(sharded, total, dots)
    return dots


def meta_step(
    model: nn.Module,
    blocks: ParamBlocks,
    tuner: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    state: MetaState,
    *,
    seed: int,
    eps: float = 1e-3,
    lr_update: float = 1e-6,
    normalize: bool = True,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    loss_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MetaStepOutput:
    """Run one meta-step; leaves tuner grads in ``tuner`` and dL/dtheta1 in ``p.grad``.

    The model's parameters are back at theta0 (up to float rounding) on return. ``backward`` lets
    a trainer (Lightning's ``manual_backward``) own the backward passes; ``loss_reduce`` (e.g. an
    all-reduce mean across data-parallel ranks) is applied to the stacked (L+, L-) before use.
    """
    numels = blocks.numels
    sigma_prev = state.sigma if state.sigma is not None else torch.ones(len(blocks))
    features = block_features(blocks, (state.loss_plus, state.loss_minus), sigma_prev)
    device = next(tuner.parameters()).device
    sigma = tuner(features.to(device)).reshape(-1)  # (B,), autograd into the tuner
    sigma64 = sigma.detach().cpu().double()
    nf = normalisation(sigma64, numels) if normalize else torch.tensor(1.0, dtype=torch.float64)
    scales = sigma64 * nf  # (B,) float64

    perturber = Perturber(blocks, model)

    def direction(b: int, c: int) -> torch.Tensor:
        return _z(blocks, seed, b, c)

    with torch.no_grad():
        with perturber((eps * scales).tolist(), direction):
            lp = loss_fn().detach()
        with perturber((-eps * scales).tolist(), direction):
            lm = loss_fn().detach()
        pair = torch.stack([lp, lm]).double()
        if loss_reduce is not None:
            pair = loss_reduce(pair)  # data parallel: the same g on every rank
    lp, lm = float(pair[0]), float(pair[1])
    g = (lp - lm) / (2 * eps)

    coeffs = -lr_update * g * scales  # theta1 = theta0 + coeffs_b z_b
    _shift(blocks, seed, coeffs)
    try:
        for p in blocks.params:
            p.grad = None
        meta_loss = loss_fn()
        backward(meta_loss)
        # dL/dsigma_b = -lr_update g nf <grad_b, z_b>
        dsigma = _grad_dot_z(blocks, seed) * (-lr_update * g * float(nf))
    finally:
        _shift(blocks, seed, -coeffs)
    surrogate = (sigma * dsigma.to(sigma.device, sigma.dtype)).sum()
    backward(surrogate)
    return MetaStepOutput(meta_loss.detach(), lp, lm, g, sigma64.float(), scales.float(), float(nf))


def advance_state(state: MetaState, out: MetaStepOutput) -> MetaState:
    return MetaState(out.loss_plus, out.loss_minus, out.sigma)
