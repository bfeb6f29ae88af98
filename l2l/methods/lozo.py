"""LOZO and LOZO-M (Chen et al., "Enhancing Zeroth-Order Fine-Tuning for Language Models with
Low-Rank Structures", ICLR 2025).

For a matrix block W (m x n) the perturbation is Z = U V^T with U (m x r) drawn every step from the
step seed and V (n x r) redrawn every ``nu`` steps (lazy) from its own stream and kept in state;
1-D blocks use plain Gaussian z. With c = [L(W + eps Z) - L(W - eps Z)] / (2 eps):
    LOZO:    W <- W - eta c U V^T / r
    LOZO-M:  N <- beta N + (1 - beta) c U          (N is m x r)
             W <- W - eta N V^T / r
             on a V redraw: N <- N V_old^T V_new / n   (re-projection onto the new subspace)
1-D blocks take the plain ZO-SGD update (no momentum). With a tuner, ``c`` is multiplied by the
block scale ``nf sigma_b`` as the perturbation was.

Choices: the paper's 1/r in the update is kept (the public code drops it, so its lr is r times
ours). V has its own seed stream ``(seed, "V", epoch, block)``, so the update uses exactly the
U V^T that was measured -- the public code draws V and U from one stream on redraw steps and the
update then differs from the measured direction on ~1/nu of the steps.
"""

from __future__ import annotations

import torch

from l2l.methods.base import StepContext, StepRecord, ZOOptimizer
from l2l.perturb import LowRank, PlainZ
from l2l.z import gaussian_chunk, gaussian_many, mix_seed, param_chunk_z, row_chunks

_V_STREAM = 0x56  # "V"


class _LowRankZ(PlainZ):
    """LOZO's direction as its perturbed forwards take it: plain z for the 1-D blocks (a
    perturbed copy is one fused draw-and-add, as MeZO's), ``U V^T`` for the matrices (asked for
    only where a module has no factored forward)."""

    def __init__(self, seed, params, matrices, is_matrix) -> None:
        super().__init__(seed, params)
        self.matrices, self.is_matrix = matrices, is_matrix

    def plain(self, block: int) -> bool:
        return not self.is_matrix(block)

    def __call__(self, block: int, chunk: int) -> torch.Tensor:
        if self.plain(block):
            return super().__call__(block, chunk)
        return self.matrices(block, chunk)


class LOZO(ZOOptimizer):
    """LOZO; ``momentum=beta > 0`` gives LOZO-M. ``rank`` r, ``nu`` steps between V redraws."""

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        rank: int = 2,
        nu: int = 50,
        momentum: float = 0.0,
        **kwargs,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if nu < 1:
            raise ValueError(f"nu must be >= 1, got {nu}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(
            params, lr, eps, weight_decay, rank=rank, nu=nu, momentum=momentum, **kwargs
        )
        self._step_u: dict[tuple[int, int], torch.Tensor] = {}  # this step's U, see _u
        self._step_u_key: tuple[int, int] | None = None  # (seed, rank) of _step_u
        # per block, what is derived from its current V: (V, V / rank, rank, V's copies in the
        # dtypes of half-precision forwards), see _v_derived
        self._v_cache: dict[int, tuple[torch.Tensor, torch.Tensor, int, dict]] = {}
        # this step's (U's first chunk, V, the pair) per block: both forwards share the pair,
        # so a half-precision model casts each factor once per step
        self._step_factors: dict[int, tuple[torch.Tensor, torch.Tensor, LowRank]] = {}

    def _is_matrix(self, block: int) -> bool:
        return self.blocks.params[block].ndim == 2

    def _prepare(self, step: int, seed: int) -> None:
        """Make V current for ``step``: redraw it (and re-project N) when its epoch changed."""
        g = self.group
        epoch = step // g["nu"]
        for b, p in enumerate(self.blocks.params):
            if not self._is_matrix(b):
                continue
            state = self.state[p]
            if state.get("v_epoch") == epoch:
                continue
            v_seed = mix_seed(self.seed, _V_STREAM, epoch)
            v_new = gaussian_chunk(v_seed, b, 0, (p.shape[1], g["rank"]), p.device)  # (n, r)
            if g["momentum"] and "v" in state:
                # N V_old^T V_new / n: (m, r) @ (r, n) @ (n, r)
                state["n"] = state["n"] @ (state["v"].T @ v_new) / p.shape[1]
            state["v"], state["v_epoch"] = v_new, epoch

    def _u(self, seed: int, block: int, chunk: int) -> torch.Tensor:
        """U's rows of the chunk (a matrix block; z for a 1-D block). A step's U is drawn once
        and kept until the next step's seed (both forwards and the update use it; rows x rank
        numbers per matrix), so it is not modified by its users."""
        p = self.blocks.params[block]
        r0, r1 = row_chunks(p.shape, p.device)[chunk]
        if not self._is_matrix(block):
            return param_chunk_z(seed, block, chunk, p)
        key = (seed, self.group["rank"])
        if self._step_u_key != key:
            self._step_u_key, self._step_u, self._step_factors = key, self._draw_u(seed), {}
        u = self._step_u.get((block, chunk))
        if u is None or u.device != p.device:
            rank = self.group["rank"]
            u = gaussian_chunk(seed, block, chunk, (r1 - r0, rank), p.device, start=r0 * rank)
            self._step_u[block, chunk] = u
        return u

    def _draw_u(self, seed: int) -> dict[tuple[int, int], torch.Tensor]:
        """Every matrix chunk's U of step seed ``seed``, one draw per device (one kernel on a
        GPU instead of one per matrix); the same bits as drawing each chunk alone."""
        rank = self.group["rank"]
        by_device: dict[torch.device, list] = {}
        for b, p in enumerate(self.blocks.params):
            if self._is_matrix(b):
                for c, (r0, r1) in enumerate(row_chunks(p.shape, p.device)):
                    request = (b, r0 * rank, (r1 - r0, rank))
                    by_device.setdefault(p.device, []).append(((b, c), request))
        drawn = {}
        for device, items in by_device.items():
            us = gaussian_many(seed, [request for _, request in items], device)
            drawn.update(zip((chunk for chunk, _ in items), us, strict=True))
        return drawn

    def _v_derived(self, block: int) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
        """(V, V / rank, rank, {dtype: V in dtype}) of a matrix block, made once per V (each
        redraw); the copies are filled by the forwards' :class:`LowRank` pairs."""
        v, rank = self.state[self.blocks.params[block]]["v"], self.group["rank"]
        cached = self._v_cache.get(block)
        if cached is None or cached[0] is not v or cached[2] != rank:
            cached = self._v_cache[block] = (v, v / rank, rank, {})
        return cached

    def _v_over_rank(self, block: int) -> torch.Tensor:
        """V / rank of a matrix block, computed once per V (each redraw)."""
        return self._v_derived(block)[1]

    def _direction(self, ctx: StepContext, block: int, chunk: int) -> torch.Tensor:
        u = self._u(ctx.seed, block, chunk)
        if not self._is_matrix(block):
            return u
        return u @ self.state[self.blocks.params[block]]["v"].T  # (rows, r) @ (r, n)

    def _direction_of(self, ctx: StepContext):
        if not self._defined_by(LOZO, "_u", "_direction"):
            return super()._direction_of(ctx)
        matrices = lambda b, c: self._direction(ctx, b, c)  # noqa: E731
        return _LowRankZ(ctx.seed, self.blocks.params, matrices, self._is_matrix)

    def _factors(self, ctx: StepContext, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) of a matrix block: embeddings (and linear layers, when cheaper) run
        ``x W^T + c (x V) U^T``."""
        if not self._is_matrix(block):
            return None
        p = self.blocks.params[block]
        chunks = [self._u(ctx.seed, block, c) for c in range(len(row_chunks(p.shape, p.device)))]
        v = self.state[p]["v"]
        cached = self._step_factors.get(block)  # reset with the step's U (see _u)
        if cached is None or cached[0] is not chunks[0] or cached[1] is not v:
            u = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            v_casts = self._v_derived(block)[3]
            cached = self._step_factors[block] = (chunks[0], v, LowRank(u, v, v_casts))
        return cached[2]

    def _apply(self, record: StepRecord) -> None:
        self._prepare(record.step, record.seed)
        beta = self.group["momentum"]
        if beta:
            self._accumulate_momentum(record, beta)

        def factors(b: int, c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            """Chunk c of the update direction as A B^T: N V^T / r or U V^T / r."""
            if not self._is_matrix(b):
                return None
            state = self.state[self.blocks.params[b]]
            if beta:  # N already carries (1 - beta) c s_b
                p = self.blocks.params[b]
                r0, r1 = row_chunks(p.shape, p.device)[c]
                return state["n"][r0:r1], self._v_over_rank(b)
            return self._u(record.seed, b, c), self._v_over_rank(b)

        def direction(b: int, c: int) -> torch.Tensor:  # the 1-D blocks: plain Gaussian
            return self._u(record.seed, b, c)

        if self._defined_by(LOZO, "_u", "_direction"):  # plain z: fused where there are kernels
            direction = PlainZ(record.seed, self.blocks.params)

        scales = record.scales or [1.0] * len(self.blocks)
        coeffs = [
            record.lr if (beta and self._is_matrix(b)) else record.lr * record.grad * s
            for b, s in enumerate(scales)
        ]
        self._update(record, direction, coeffs, factors)

    def _accumulate_momentum(self, record: StepRecord, beta: float) -> None:
        """N <- beta N + (1 - beta) c s_b U for every matrix block: one multi-tensor scaling of
        every N and one multi-tensor add per distinct coefficient (one without a tuner), the
        same ops per tensor as ``n.mul_(beta).add_(u, alpha=...)``."""
        by_alpha: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for b, p in enumerate(self.blocks.params):
            if not self._is_matrix(b):
                continue
            state = self.state[p]
            scale = 1.0 if record.scales is None else record.scales[b]
            if "n" not in state:
                state["n"] = torch.zeros(p.shape[0], self.group["rank"], device=p.device)
            ns, us = by_alpha.setdefault((1.0 - beta) * record.grad * scale, ([], []))
            for c, (r0, r1) in enumerate(row_chunks(p.shape, p.device)):
                ns.append(state["n"][r0:r1])  # (rows, r)
                us.append(self._u(record.seed, b, c))
        if by_alpha:
            torch._foreach_mul_([n for ns, _ in by_alpha.values() for n in ns], beta)
        for alpha, (ns, us) in by_alpha.items():
            torch._foreach_add_(ns, us, alpha=alpha)
