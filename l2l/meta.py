"""Meta-training of a block-scale tuner (ZO Fine-tuner's learning-to-learn step), plain PyTorch.

One meta-step on a minibatch (Section 3 of ZO Fine-tuner):
  1. sigma_b = tuner(x_b) with autograd on; nf = sqrt(sum n_b) / sqrt(sum n_b sigma_b^2) (constant);
  2. L+, L- at theta0 +- eps nf sigma_b z_b (seeded, on the fly), g = (L+ - L-) / (2 eps);
  3. look-ahead theta1 = theta0 - lr_update g nf sigma_b(omega) z_b   (g, z, nf constant);
  4. meta-loss L(theta1) on the same minibatch; its gradient w.r.t. omega goes into the tuner.

Implementation: theta1 is applied in place (no second copy of the model) and undone bit for bit
(:func:`_shift`, :func:`_unshift`), one backward at theta1
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
from l2l.rounding import SALT_SHIFT, check_rounding, round_into, rounding_key, upcast
from l2l.scales import block_features, normalisation
from l2l.shards import all_reduce_sum, is_sharded, local_chunks, shard_group
from l2l.z import chunk_start, param_chunk_z


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
    anchor_loss: float = 0.0  # anchor x scale_anchor(sigma, anchor_to); 0 when off


def scale_anchor(sigma: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``sum_b (d_b)^2`` with ``d = log sigma - log reference``, each centred on its mean over the
    blocks: how far the profile of the block scales is from ``reference``'s, with their overall
    size removed (as the normalisation ``nf`` removes it). Differentiable in ``sigma``."""
    log_s = sigma.log()
    log_r = reference.to(device=sigma.device, dtype=sigma.dtype).log()
    return ((log_s - log_s.mean()) - (log_r - log_r.mean())).square().sum()


def _z(blocks: ParamBlocks, seed: int, b: int, c: int) -> torch.Tensor:
    return param_chunk_z(seed, b, c, blocks.params[b])


class Directions:
    """Chunk ``c`` of block ``b``'s z for one meta-step's ``seed`` (called as ``z(b, c)``).

    A meta-step uses every chunk five times: the two perturbed forwards, the look-ahead shift,
    <dL/dtheta1, z> and the undo. With ``keep`` each chunk is drawn once and kept until the step
    ends (one float32 copy of the model's size), which saves four draws of the whole model; on
    a CPU a draw costs more than the forwards. The values are the same either way."""

    def __init__(self, blocks: ParamBlocks, seed: int, keep: bool) -> None:
        self.blocks, self.seed = blocks, seed
        self.kept: dict[tuple[int, int], torch.Tensor] | None = {} if keep else None

    def __call__(self, b: int, c: int) -> torch.Tensor:
        if self.kept is None:
            return _z(self.blocks, self.seed, b, c)
        z = self.kept.get((b, c))
        if z is None:
            z = self.kept[b, c] = _z(self.blocks, self.seed, b, c)
        return z


def keeps_z(blocks: ParamBlocks) -> bool:
    """The default of ``meta_step(keep_z=None)``: keep z when every block is on the CPU (whose
    draws are many ops per element; a CUDA draw is one kernel, and memory is scarcer there)."""
    return all(p.device.type == "cpu" for p in blocks.params)


#: bit patterns compared as integers (NaN == NaN, -0 != +0)
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

#: (block, chunk) -> (positions in the chunk's rows held here, theta0 at those positions), or
#: (None, theta0 of all those rows) when that is smaller
Saved = dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]]


def _moved(
    t: torch.Tensor, z: torch.Tensor, coeff: float, key: int, start: int, rounding: str, back: bool
) -> torch.Tensor:
    """``round(t + coeff z)``, or with ``back`` ``round(t - coeff z)`` on the complement bits:
    a new tensor of ``t``'s dtype. float32/float64 round to nearest; half precision computes in
    float32 and rounds as ``rounding`` says (``t`` starts at position ``start`` of its block)."""
    alpha = -coeff if back else coeff
    if t.dtype in (torch.float32, torch.float64):
        return torch.add(t, z.to(t.dtype), alpha=alpha)
    out = torch.empty_like(t)
    round_into(
        out,
        upcast(t, torch.float32).add_(z, alpha=alpha),
        key,
        start=start,
        rounding=rounding,
        complement=back,
    )
    return out


def _chunks(blocks: ParamBlocks, seed: int, coeffs: torch.Tensor, z: Directions | None = None):
    """(b, c, view of chunk c's rows held here, their z, coeff_b, rounding key, the rows'
    first position in block b) for every chunk (z from ``z``, else drawn from ``seed``)."""
    z = z or Directions(blocks, seed, keep=False)
    for b, p in enumerate(blocks.params):
        per_row = max(1, int(torch.Size(p.shape[1:]).numel()))
        key = rounding_key(seed, b, SALT_SHIFT)
        for c, view, rows in local_chunks(p):
            start = chunk_start(p.shape, c, p.device) + (
                0 if rows is Ellipsis else rows.start * per_row
            )
            yield b, c, view, z(b, c)[rows], float(coeffs[b]), key, start


@torch.no_grad()
def _shift(
    blocks: ParamBlocks,
    seed: int,
    coeffs: torch.Tensor,
    rounding: str = "stochastic",
    z: Directions | None = None,
) -> Saved:
    """theta_b <- round(theta_b + coeffs[b] z_b) in place (a sharded block: the rows held here).

    Returns what :func:`_unshift` needs besides the seed to restore theta0 bit for bit: rounding
    ``theta1 - coeffs[b] z_b`` with the complement bits inverts the shift wherever theta0, the
    sum, theta1 and theta1 minus the shift share a binade; the few other elements (next to a power of two, or far
    smaller than the shift: ~0.1% of a model at lr_update g ~ 1e-6) keep their theta0 here.
    Memory: one chunk's temporaries, plus those (at most one chunk's worth per chunk).
    """
    saved: Saved = {}
    for b, c, view, zc, coeff, key, start in _chunks(blocks, seed, coeffs, z):
        shifted = _moved(view, zc, coeff, key, start, rounding, back=False)
        undone = _moved(shifted, zc, coeff, key, start, rounding, back=True)
        bits = _BITS[view.dtype]
        miss = (undone.view(bits) != view.view(bits)).reshape(-1).nonzero().squeeze(1)
        if 3 * miss.numel() > view.numel():  # a shift of many ulps: the whole chunk is smaller
            saved[b, c] = (None, view.clone())
        elif miss.numel():
            saved[b, c] = (miss.int(), view.reshape(-1)[miss].clone())
        view.copy_(shifted)
    return saved


@torch.no_grad()
def _unshift(
    blocks: ParamBlocks,
    seed: int,
    coeffs: torch.Tensor,
    saved: Saved,
    rounding: str = "stochastic",
    z: Directions | None = None,
) -> None:
    """Undo ``_shift(blocks, seed, coeffs, rounding)`` (which returned ``saved``) exactly."""
    for b, c, view, zc, coeff, key, start in _chunks(blocks, seed, coeffs, z):
        miss, theta0 = saved.get((b, c), (None, None))
        if theta0 is not None and miss is None:  # all of these rows were kept
            view.copy_(theta0)
            continue
        undone = _moved(view, zc, coeff, key, start, rounding, back=True)
        if theta0 is not None:
            undone.view(-1)[miss] = theta0
        view.copy_(undone)


@torch.no_grad()
def _grad_dot_z(blocks: ParamBlocks, seed: int, z: Directions | None = None) -> torch.Tensor:
    """(B,) float64 <dL/dtheta_b, z_b>; sharded blocks sum their rows' parts over the ranks."""
    z = z or Directions(blocks, seed, keep=False)
    sums: dict[int, torch.Tensor] = {}  # block -> float64 sum on the block's device (no sync)
    sharded = torch.zeros(len(blocks), dtype=torch.bool)
    for b, p in enumerate(blocks.params):
        if p.grad is None:
            continue
        sharded[b] = is_sharded(p.grad)
        for c, grad, rows in local_chunks(p.grad):
            part = (grad.float() * z(b, c)[rows]).sum(dtype=torch.float64)
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
    rounding: str = "stochastic",
    keep_z: bool | None = None,
    anchor: float = 0.0,
    anchor_to: torch.Tensor | None = None,
) -> MetaStepOutput:
    """Run one meta-step; leaves tuner grads in ``tuner`` and dL/dtheta1 in ``p.grad``.

    The model's parameters are back at theta0, bit for bit, on return. In half precision the
    look-ahead theta1 is rounded as ``rounding`` says (``"stochastic"``: theta1 carries the shift
    in expectation; ``"nearest"`` loses most of it), with bits from ``seed``. ``backward`` lets
    a trainer (Lightning's ``manual_backward``) own the backward passes; ``loss_reduce`` (e.g. an
    all-reduce mean across data-parallel ranks) is applied to the stacked (L+, L-) before use.
    ``keep_z`` draws each chunk of z once per step and keeps it (:class:`Directions`; none:
    :func:`keeps_z`); the result is the same. ``anchor > 0`` adds
    ``anchor * scale_anchor(sigma, anchor_to)`` to the tuner's objective (``anchor_to``: (B,)
    positive reference scales, e.g. the tuner's initial ones): a pull that keeps the learned
    profile near a known-good one while the one-step look-ahead reshapes it.
    """
    check_rounding(rounding)
    if anchor and anchor_to is None:
        raise ValueError("meta_step(anchor > 0) needs anchor_to, the (B,) reference scales")
    numels = blocks.numels
    sigma_prev = state.sigma if state.sigma is not None else torch.ones(len(blocks))
    features = block_features(blocks, (state.loss_plus, state.loss_minus), sigma_prev)
    device = next(tuner.parameters()).device
    sigma = tuner(features.to(device)).reshape(-1)  # (B,), autograd into the tuner
    sigma64 = sigma.detach().cpu().double()
    nf = normalisation(sigma64, numels) if normalize else torch.tensor(1.0, dtype=torch.float64)
    scales = sigma64 * nf  # (B,) float64

    perturber = Perturber(blocks, model)
    direction = Directions(blocks, seed, keeps_z(blocks) if keep_z is None else keep_z)
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
    saved = _shift(blocks, seed, coeffs, rounding, direction)
    try:
        for p in blocks.params:
            p.grad = None
        meta_loss = loss_fn()
        backward(meta_loss)
        # dL/dsigma_b = -lr_update g nf <grad_b, z_b>
        dsigma = _grad_dot_z(blocks, seed, direction) * (-lr_update * g * float(nf))
    finally:
        _unshift(blocks, seed, coeffs, saved, rounding, direction)
        direction.kept = None  # free the kept z (a model's size) before the tuner's backward
    surrogate = (sigma * dsigma.to(sigma.device, sigma.dtype)).sum()
    anchor_loss = 0.0
    if anchor:
        pull = anchor * scale_anchor(sigma, anchor_to)
        anchor_loss = float(pull.detach())
        surrogate = surrogate + pull
    backward(surrogate)
    return MetaStepOutput(
        meta_loss.detach(), lp, lm, g, sigma64.float(), scales.float(), float(nf), anchor_loss
    )


def advance_state(state: MetaState, out: MetaStepOutput) -> MetaState:
    return MetaState(out.loss_plus, out.loss_minus, out.sigma)
