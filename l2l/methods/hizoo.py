"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed
Zeroth-Order Optimizer", ICLR 2025).

State: ``H = Sigma^{-1}``, a diagonal inverse-covariance (curvature) estimate, one float32 tensor
per parameter whatever the model dtype, ``H_0 = 1``. The EMA is computed in float64 and rounded
stochastically into H (``rounding="stochastic"``), so that even ``alpha = 1e-8`` moves H in
expectation (rounded to nearest, ``H (1 - 1e-8)`` is H again). Each step takes 3 forwards:
    L0 = L(theta),  L+- = L(theta +- mu u),  u = Sigma^{1/2} z = z / sqrt(H)   (times nf sigma_b)
    g = (L+ - L-) / (2 mu);            theta <- theta - eta (g u + lambda theta)
    H <- (1 - alpha) H + alpha |h_hat|,   h_hat = (L+ + L- - 2 L0) / (2 mu^2) * H (z^2 - 1) / s^2
where ``s = nf sigma_b`` is the tuner's block scale (1 without a tuner).

Formula choice (documented, tested): we use the paper's estimator with the ``-1`` term. For a
quadratic with Hessian A and perturbation covariance D = s^2 Sigma it is unbiased,
E[h_hat] = diag(A) (see :func:`hessian_diag_estimate`). The public code drops the ``-1``, keeps H
in the weights' dtype (so in fp16 with alpha = 1e-8 the EMA underflows and H stays 1) and runs a
fourth forward for logging; we do neither. The update uses the H that was measured with; H is
refreshed afterwards.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from l2l.methods.base import StepContext, StepRecord, ZOOptimizer, _loss_scalar
from l2l.perturb import ScaledZ
from l2l.rounding import SALT_HESSIAN, SALT_UPDATE, round_into, rounding_key, sqrt_rn, upcast
from l2l.z import (
    _kernels,
    chunk_start,
    chunk_view,
    cpu_cut,
    gaussian_at,
    param_chunk_z,
    reference_only,
    row_chunks,
    run_kernel,
    z_key,
)
from l2l.z_spec import H_FLOOR

_FLOAT32_MAX = torch.finfo(torch.float32).max
#: How sqrt(H) is taken: "rn" correctly rounded on every device (:func:`l2l.rounding.sqrt_rn`),
#: "torch" the device's ``torch.sqrt`` (not correctly rounded on the CPU; trajectories recorded
#: before ``sqrt`` was a setting replay with it).
SQRTS = ("rn", "torch")


def hessian_diag_estimate(
    delta_loss: float | torch.Tensor,
    z: torch.Tensor,
    hessian: torch.Tensor,
    mu: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """h_hat = (L+ + L- - 2 L0) / (2 mu^2) * H (z^2 - 1) / scale^2  (elementwise, unbiased)."""
    return estimate_coef(delta_loss, mu, scale) * hessian * (z.square() - 1.0)


def estimate_coef(delta_loss, mu: float, scale: float = 1.0):
    """The scalar factor of :func:`hessian_diag_estimate`: (L+ + L- - 2 L0) / (2 mu^2 scale^2)."""
    return delta_loss / (2.0 * mu * mu * scale * scale)


class HiZOO(ZOOptimizer):
    """HiZOO. ``hessian_smooth`` is the EMA rate alpha (paper: 1e-8 .. 1e-6 for LLMs)."""

    forwards_per_step = 3

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        hessian_smooth: float = 1e-8,
        sqrt: str = "rn",
        **kwargs,
    ) -> None:
        if not 0.0 <= hessian_smooth <= 1.0:
            raise ValueError(f"hessian_smooth must be in [0, 1], got {hessian_smooth}")
        if sqrt not in SQRTS:
            raise ValueError(f"sqrt must be one of {SQRTS}, got {sqrt!r}")
        super().__init__(
            params, lr, eps, weight_decay, hessian_smooth=hessian_smooth, sqrt=sqrt, **kwargs
        )
        for p in self.blocks.params:
            self.state[p]["hessian"] = torch.ones_like(p, dtype=torch.float32)

    def _z(self, seed: int, block: int, chunk: int):
        # transient: every caller consumes the chunk before drawing the next one
        return param_chunk_z(seed, block, chunk, self.blocks.params[block], transient=True)

    def _hessian(self, block: int, chunk: int) -> torch.Tensor:
        p = self.blocks.params[block]
        r0, r1 = row_chunks(p.shape, p.device)[chunk]
        return chunk_view(self.state[p]["hessian"], r0, r1)

    def _root(self, h: torch.Tensor) -> torch.Tensor:
        """sqrt(H) of a chunk, used at once (a scratch buffer on the CPU)."""
        return sqrt_rn(h, transient=True) if self.group["sqrt"] == "rn" else h.sqrt()

    def _direction(self, ctx: StepContext, block: int, chunk: int):
        return self._z(ctx.seed, block, chunk).div_(self._root(self._hessian(block, chunk)))

    def _direction_at(self, ctx: StepContext, block: int, index):
        hessian = self.state[self.blocks.params[block]]["hessian"].view(-1)
        return gaussian_at(ctx.seed, block, index).div_(self._root(hessian[index]))

    def _losses(self, ctx, closure):
        l0 = _loss_scalar(closure())
        return [l0, *super()._losses(ctx, closure)]

    def _report_loss(self, losses):
        return torch.tensor(losses[0], dtype=torch.float32)

    def _make_record(self, ctx, losses):
        record = super()._make_record(ctx, losses)
        l0, lp, lm = losses
        record.extra["delta_loss"] = lp + lm - 2.0 * l0
        return record

    def _hessians(self) -> list[torch.Tensor]:
        return [self.state[p]["hessian"] for p in self.blocks.params]

    def _own_direction(self) -> bool:
        """Whether the direction is HiZOO's own ``z / sqrt(H)`` with a correctly rounded root:
        then perturbed copies and updates take the fused kernels where there are kernels. A
        subclass that overrides how it is made keeps its own (and the torch ops), as do the
        trajectories recorded with ``sqrt="torch"``."""
        own = self._defined_by(HiZOO, "_direction", "_z", "_root", "_hessian")
        return own and self.group["sqrt"] == "rn"

    def _direction_of(self, ctx: StepContext):
        if self._own_direction():
            return ScaledZ(ctx.seed, self.blocks.params, self._hessians(), self._root)
        return super()._direction_of(ctx)

    def _apply(self, record: StepRecord) -> None:
        """theta <- theta - lr (g s_b u + lambda theta) along the H that was measured with, then
        H's EMA, chunk by chunk: one kernel per chunk where there are kernels."""
        own = self._own_direction()
        direction = (
            ScaledZ(record.seed, self.blocks.params, self._hessians(), self._root)
            if own
            else lambda b, c: self._z(record.seed, b, c).div_(self._root(self._hessian(b, c)))
        )
        scales = record.scales or [1.0] * len(self.blocks)
        alpha = self.group["hessian_smooth"]
        for b, p in enumerate(self.blocks.params):
            coeff, decay = record.lr * record.grad * scales[b], self._decay(record, b)
            # no kernels to fuse into: the reference ops in the CPU's chunks, not over whole
            # weights (a dozen temporaries of the weight's size)
            with cpu_cut() if reference_only(p.device) else nullcontext():
                for c in range(len(row_chunks(p.shape, p.device))):
                    fused = self._fused_args(record, b, c, coeff, decay, scales[b]) if own else None
                    if fused is not None and self._run_fused(fused):
                        continue
                    # where there are kernels this chunk is one: its reference ops profiled as one
                    with torch.profiler.record_function("l2l::hizoo") if fused else nullcontext():
                        if coeff or decay:
                            self._update_chunk(record, b, c, direction, coeff, decay)
                        if alpha:
                            self._refresh_chunk(record, b, c, scales[b])

    def _fused_args(self, record, b: int, c: int, coeff: float, decay: float, scale: float):
        """The arguments of chunk ``c`` of block ``b``'s fused kernel (``hizoo_update``), or
        None where it has none: contiguous float32 or bfloat16 weights, a float32 H, a nonzero
        update and a float32-finite estimate coefficient."""
        p = self.blocks.params[b]
        if coeff == 0.0 or p.dtype not in (torch.float32, torch.bfloat16):
            return None
        r0, r1 = row_chunks(p.shape, p.device)[c]
        w, h = chunk_view(p.data, r0, r1), self._hessian(b, c)
        if h.dtype != torch.float32 or not (w.is_contiguous() and h.is_contiguous()):
            return None
        coef = estimate_coef(record.extra["delta_loss"], self.group["eps"], scale)
        if not abs(coef) <= _FLOAT32_MAX:
            return None
        rounding, alpha = self.group["rounding"], self.group["hessian_smooth"]
        w_mode = 1 if p.dtype == torch.float32 else (2 if rounding == "stochastic" else 3)
        h_mode = 0 if alpha == 0.0 else (2 if rounding == "stochastic" else 1)
        keys = (
            z_key(record.seed, b),
            rounding_key(record.seed, b, SALT_UPDATE),
            rounding_key(record.seed, b, SALT_HESSIAN),
        )
        start = chunk_start(p.shape, c, p.device)
        return (w, h, *keys, start, -coeff, 1.0 - decay, coef, alpha, w_mode, h_mode)

    def _run_fused(self, args: tuple) -> bool:
        """The chunk's weight update and H refresh in one kernel; False (nothing written) where
        there are no kernels."""
        kernels = _kernels(args[0].device)
        if kernels is None:
            return False
        with torch.profiler.record_function("l2l::hizoo"):
            return run_kernel(kernels, "hizoo_update", *args) is not None

    def _refresh_chunk(self, record: StepRecord, b: int, c: int, scale: float) -> None:
        """H <- (1 - alpha) H + alpha |h_hat| on chunk ``c`` of block ``b``, floored."""
        p = self.blocks.params[b]
        alpha, rounding = self.group["hessian_smooth"], self.group["rounding"]
        h, z = self._hessian(b, c), self._z(record.seed, b, c)
        est = hessian_diag_estimate(record.extra["delta_loss"], z, h, self.group["eps"], scale)
        est.abs_()
        if rounding == "nearest":
            h.mul_(1.0 - alpha).add_(est, alpha=alpha).clamp_(min=H_FLOOR)
            return
        # in float64, rounded stochastically into float32: a step alpha |h_hat - H| far below
        # H's spacing (alpha = 1e-8 against 6e-8 at H = 1) moves H in expectation
        h64 = upcast(h, torch.float64).mul_(1.0 - alpha).add_(est.double(), alpha=alpha)
        key = rounding_key(record.seed, b, SALT_HESSIAN)
        round_into(h, h64.clamp_(min=H_FLOOR), key, start=chunk_start(p.shape, c, p.device))
