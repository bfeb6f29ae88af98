"""ZO-SGD / MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", 2023).

Two-point SPSA with a per-step seed:
    g = [L(theta + eps u) - L(theta - eps u)] / (2 eps),   u = z ~ N(0, I)  (times nf sigma_b)
    theta <- theta - eta (g u + lambda theta)              (no decay on biases / norm weights)
z is regenerated from the step seed for each forward and for the update, never stored.
"""

from __future__ import annotations

from l2l.methods.base import StepContext, StepRecord, ZOOptimizer
from l2l.perturb import PlainZ
from l2l.z import gaussian_at, param_chunk_z


class ZOSGD(ZOOptimizer):
    """MeZO. See :class:`l2l.methods.base.ZOOptimizer` for the arguments."""

    _direction_is_z = True

    def _z(self, seed: int, block: int, chunk: int):
        # transient: every caller consumes the chunk before drawing the next one
        return param_chunk_z(seed, block, chunk, self.blocks.params[block], transient=True)

    def _direction(self, ctx: StepContext, block: int, chunk: int):
        return self._z(ctx.seed, block, chunk)

    def _direction_at(self, ctx: StepContext, block: int, index):
        return gaussian_at(ctx.seed, block, index)

    def _apply(self, record: StepRecord) -> None:
        plain = self._plain_z()
        self._sgd_update(
            record,
            PlainZ(record.seed, self.blocks.params)
            if plain
            else lambda b, c: self._z(record.seed, b, c),
        )
