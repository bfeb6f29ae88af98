"""Perturbed forwards: the model evaluated at ``theta + c z`` without writing to ``theta``.

z itself is defined in :mod:`l2l.z` (a pure function of step seed, block and chunk).

The perturbed forward never writes to the parameters. With a module, every module that owns a
block runs its forward with a perturbed *copy* of its own parameters (only one module's copy is
alive at a time; large ``nn.Linear``/``nn.Embedding`` weights are perturbed one row chunk at a
time). With bare tensors, each ``param.data`` is swapped for a perturbed copy for the duration of
the forward. Either way the original storage is untouched, so the parameters are bit-for-bit
restored in every dtype -- unlike the reference ``+eps, -2eps, +eps`` in-place trick, which drifts
in half precision. A direction with a low-rank form ``z = U V^T`` (LOZO) is applied to
``nn.Embedding`` weights in factored form and never materialised; an ``nn.Linear`` runs in factored
form or with a transient ``W + c U V^T``, whichever is cheaper for the batch
(:func:`factored_is_cheaper`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from l2l import z as zdef
from l2l.blocks import ParamBlocks
from l2l.z import row_chunks

#: On the CPU a chunked ``nn.Linear`` (e.g. a 49k-row LM head) multiplies at most this many output
#: elements at a time, so its transient memory is one z chunk plus a few MiB, not a chunk-wide
#: product; on accelerators each chunk is one GEMM.
#: Not part of z's definition (only of how the perturbed product is computed).
MATMUL_ELEMENTS = 1 << 20

# direction(block, chunk) -> float32 tensor of the chunk's shape (unscaled; the perturber
# multiplies block b by coeffs[b], which folds eps, the sign and the block scale into one scalar).
Direction = Callable[[int, int], torch.Tensor]

# factors(block) -> (U (m, r), V (n, r)) float32 with z_b = U V^T, or None when block b's direction
# has no low-rank form (LOZO's matrices have one). A perturbed nn.Linear/nn.Embedding then need not
# materialise z: x (W + c U V^T)^T = x W^T + c (x V) U^T costs O(tokens (m + n) r).
Factors = Callable[[int], "tuple[torch.Tensor, torch.Tensor] | None"]


class LowRank(tuple):
    """A factor pair ``(U, V)`` that converts itself to a forward's dtype once.

    A half-precision factored forward multiplies ``x`` by ``V`` and accumulates ``U`` in the
    layer's dtype; as a plain tuple each forward casts both factors again (two kernels per layer
    and forward). A method that hands the same pair to a step's forwards (LOZO) returns one
    ``LowRank``, so each dtype's copies are made once per step; ``v_casts`` (a dict the method
    keeps beside V) shares V's copies with the pairs of later steps while V is unchanged. The
    factors must not change while their copies are in use.
    """

    def __new__(cls, u: torch.Tensor, v: torch.Tensor, v_casts: dict | None = None) -> LowRank:
        pair = super().__new__(cls, (u, v))
        pair._u_casts, pair._v_casts = {}, {} if v_casts is None else v_casts
        return pair

    def to(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype`` (each factor itself where it already is)."""
        return _cast(self[0], dtype, self._u_casts), _cast(self[1], dtype, self._v_casts)


def _cast(t: torch.Tensor, dtype: torch.dtype, casts: dict) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    if dtype not in casts:
        casts[dtype] = t.to(dtype)
    return casts[dtype]


def _in_dtype(factors: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
    if isinstance(factors, LowRank):
        return factors.to(dtype)
    return tuple(t.to(dtype) for t in factors)


# direction_at(block, index) -> float32 tensor of ``index``'s shape: the unscaled direction of
# block b at the element positions ``index`` (int64). An ``nn.Embedding`` then perturbs only the
# rows a batch looks up, with no host synchronisation.
DirectionAt = Callable[[int, torch.Tensor], torch.Tensor]


def perturbed_chunk(value: torch.Tensor, u: torch.Tensor, coeff: float) -> torch.Tensor:
    """``value + coeff * u`` computed in (at least) float32, returned in ``value``'s dtype (a new
    tensor)."""
    if value.dtype in (torch.float32, torch.float64):
        return torch.add(value, u, alpha=coeff)
    return u.mul(coeff).add_(value.float()).to(value.dtype)


class PlainZ:
    """The direction that is z itself: chunk ``c`` of block ``b`` is :mod:`l2l.z`'s draw of
    ``(seed, b)`` at the chunk's positions (MeZO's, with or without block scales).

    Called as a :data:`Direction` it returns the chunk of z; perturbers and updates that know it
    is plain z call :meth:`add` instead, which draws and adds in one kernel where
    :func:`l2l.z.add_z` has one (CUDA) and is exactly the draw plus :func:`perturbed_chunk`'s ops
    elsewhere."""

    def __init__(self, seed: int, params: Sequence[torch.Tensor]) -> None:
        self.seed, self.params = seed, params

    def __call__(self, block: int, chunk: int) -> torch.Tensor:
        return zdef.param_chunk_z(self.seed, block, chunk, self.params[block], transient=True)

    def plain(self, block: int) -> bool:
        """Whether block ``block``'s direction is z (so :meth:`add` applies to it)."""
        return True

    def add(self, x: torch.Tensor, block: int, start: int, coeff: float, out=None):
        """``x + coeff * z`` for the elements of block ``block`` from ``start`` (x's shape)."""
        return zdef.add_z(x, self.seed, block, start, coeff, out=out)

    def update_(self, w, block: int, start: int, coeff: float, decay: float, key: int, rounding):
        """``w <- round((1 - decay) w - coeff z)`` in place in one kernel, for a bfloat16 chunk
        ``w`` of block ``block`` from element ``start`` on a device with the kernels (``key``:
        its rounding bits' key, ``rounding``: "stochastic" or "nearest"); False, with ``w``
        untouched, where there is none: the caller's ops (the kernel's reference) then run."""
        kernels = zdef._kernels(w.device)
        if kernels is None or w.dtype != torch.bfloat16 or not w.is_contiguous():
            return False
        with torch.profiler.record_function("l2l::add_z"):
            args = (w, zdef.z_key(self.seed, block), key, start, -coeff, 1 - decay)
            return (
                zdef.run_kernel(kernels, "update_bf16", *args, rounding == "stochastic") is not None
            )


class ScaledZ(PlainZ):
    """HiZOO's direction ``z / sqrt(H)`` (``hessians[b]``: block ``b``'s float32 H), with
    :class:`PlainZ`'s fused ops: a perturbed copy is one kernel where :func:`l2l.z.add_scaled_z`
    has one, and ``root`` (a correctly rounded square root) divides the draw elsewhere."""

    def __init__(self, seed, params, hessians: Sequence[torch.Tensor], root) -> None:
        super().__init__(seed, params)
        self.hessians, self.root = hessians, root

    def __call__(self, block: int, chunk: int) -> torch.Tensor:
        r0, r1 = row_chunks(self.params[block].shape, self.params[block].device)[chunk]
        h = zdef.chunk_view(self.hessians[block], r0, r1)
        return super().__call__(block, chunk).div_(self.root(h))

    def hessian(self, block: int, start: int, like: torch.Tensor) -> torch.Tensor:
        """H of block ``block`` at elements ``start .. start + like.numel() - 1``, shaped as
        ``like``."""
        flat = self.hessians[block].reshape(-1)
        return flat[start : start + like.numel()].view(like.shape)

    def add(self, x: torch.Tensor, block: int, start: int, coeff: float, out=None):
        h = self.hessian(block, start, x)
        return zdef.add_scaled_z(x, h, self.root, self.seed, block, start, coeff, out=out)

    def update_(self, *args) -> bool:
        return False  # HiZOO's update is its own fused kernel (l2l.methods.hizoo)


def perturbed_block(
    param: torch.Tensor, block: int, direction: Direction, coeff: float
) -> torch.Tensor:
    chunks = row_chunks(param.shape, param.device)

    def chunk(c: int, r0: int, r1: int) -> torch.Tensor:
        value = zdef.chunk_view(param.detach(), r0, r1)
        if isinstance(direction, PlainZ) and direction.plain(block):
            start = zdef.chunk_start(param.shape, c, param.device)
            return direction.add(value, block, start, coeff)
        return perturbed_chunk(value, direction(block, c), coeff)

    if len(chunks) == 1:
        return chunk(0, *chunks[0])
    out = torch.empty_like(param)
    for c, (r0, r1) in enumerate(chunks):
        out[r0:r1] = chunk(c, r0, r1)
    return out


class Perturber:
    """Runs forwards at ``theta_b + coeffs[b] * u_b`` without modifying ``theta``.

    Args:
        blocks: the parameter blocks being optimised.
        model: the module that owns them (memory ~ one forward + one chunk), or ``None`` to swap
            ``param.data`` for perturbed copies (memory ~ one extra copy of the parameters; fine for
            small models and tests).
    """

    def __init__(self, blocks: ParamBlocks, model: nn.Module | None = None) -> None:
        self.blocks = blocks
        self.model = model
        self._owners: list[tuple[nn.Module, list[tuple[str, int]]]] = []
        self._warned_unused = False
        if model is not None:
            index = {id(p): b for b, p in enumerate(blocks.params)}
            for module in model.modules():
                entries = [
                    (name, index[id(p)])
                    for name, p in module._parameters.items()
                    if p is not None and id(p) in index
                ]
                if entries:
                    self._owners.append((module, entries))

    @contextmanager
    def __call__(
        self,
        coeffs: Sequence[float],
        direction: Direction,
        factors: Factors | None = None,
        direction_at: DirectionAt | None = None,
    ) -> Iterator[None]:
        if self.model is None:
            with self._swap_data(coeffs, direction):
                yield
            return
        used: set[int] = set()
        patched = []
        try:
            for module, entries in self._owners:
                previous = module.__dict__.get("forward")
                module.forward = self._wrap(
                    module, entries, coeffs, direction, used, factors, direction_at
                )
                patched.append((module, previous))
            yield
        finally:
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
        self._check_used(used)

    @contextmanager
    def _swap_data(self, coeffs: Sequence[float], direction: Direction) -> Iterator[None]:
        originals = []
        try:
            for b, p in enumerate(self.blocks.params):
                originals.append(p.data)
                p.data = perturbed_block(p, b, direction, coeffs[b])
            yield
        finally:
            for p, data in zip(self.blocks.params, originals, strict=False):
                p.data = data

    def _wrap(self, module, entries, coeffs, direction, used, factors=None, direction_at=None):
        forward = type(module).forward.__get__(module)
        if module.__dict__.get("forward") is not None:
            forward = module.__dict__["forward"]
        names = {name for name, _ in entries}
        # an embedding whose forward only reads rows: its paths look up the unperturbed rows and
        # perturb those (with max_norm the lookup renormalises rows in place, so it must run on
        # a perturbed copy, never on theta: the generic path below)
        lookup = type(module) is nn.Embedding and names == {"weight"} and module.max_norm is None
        lowrank = None  # only the modules with a factored forward ask for (U, V)
        if factors is not None and "weight" in names and type(module) in (nn.Linear, nn.Embedding):
            lowrank = factors(dict(entries)["weight"])
        if lowrank is not None and type(module) is nn.Linear:
            return _LowRankLinear(module, dict(entries), coeffs, direction, used, lowrank)
        if lowrank is not None and lookup:
            return _LowRankEmbedding(module, entries[0][1], coeffs, used, lowrank, forward)
        if direction_at is not None and lookup:
            return _GatherEmbedding(module, entries[0][1], coeffs, direction_at, used, forward)
        big = "weight" in names and module.weight.numel() > zdef.chunk_elements(
            module.weight.device
        )
        if big and type(module) is nn.Linear:
            return _ChunkedLinear(module, dict(entries), coeffs, direction, used)
        if big and lookup:
            return _ChunkedEmbedding(module, entries[0][1], coeffs, direction, used, forward)

        def run(*args, **kwargs):
            saved = {}
            try:
                for name, b in entries:
                    saved[name] = module._parameters[name]
                    value = perturbed_block(saved[name], b, direction, coeffs[b])
                    module._parameters[name] = nn.Parameter(value, requires_grad=False)
                    used.add(b)
                return forward(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        return run

    def _check_used(self, used: set[int]) -> None:
        missing = [self.blocks.names[b] for b in range(len(self.blocks)) if b not in used]
        if missing and not self._warned_unused:
            self._warned_unused = True
            warnings.warn(
                f"{len(missing)} parameter block(s) were not perturbed because the forward of the "
                f"module owning them never ran (first: {missing[0]!r}). If the model reads these "
                "weights outside their module, pass model.parameters() instead of the model so "
                "the optimizer swaps the tensors themselves.",
                stacklevel=4,
            )


class _ChunkedLinear:
    """``nn.Linear`` forward at perturbed weights, one row chunk of the weight at a time."""

    def __init__(self, module, entries, coeffs, direction, used):
        self.m, self.entries, self.coeffs, self.direction = module, entries, coeffs, direction
        used.update(entries.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.m.weight, self.m.bias
        x = x.to(w.device)  # a model split over devices (device_map) hands over activations
        wb, bb = self.entries["weight"], self.entries.get("bias")
        if bias is not None and bb is not None:
            bias = perturbed_block(bias, bb, self.direction, self.coeffs[bb])
        out = x.new_empty(*x.shape[:-1], w.shape[0])  # (..., out_features)
        # rows of W perturbed and multiplied at once: on the CPU bounds the perturbed copy and
        # the product; an accelerator multiplies a chunk in one GEMM
        step = (
            w.shape[0]
            if zdef.accelerated(w.device)
            else max(1, MATMUL_ELEMENTS // max(1, out[..., 0].numel()))
        )
        for c, (r0, r1) in enumerate(row_chunks(w.shape, w.device)):
            plain = isinstance(self.direction, PlainZ) and self.direction.plain(wb)
            if plain and step >= r1 - r0:  # one fused copy
                start = zdef.chunk_start(w.shape, c, w.device)
                wc = self.direction.add(w.detach()[r0:r1], wb, start, self.coeffs[wb])
                out[..., r0:r1] = F.linear(x, wc, None if bias is None else bias[r0:r1])
                continue
            z = self.direction(wb, c)
            for a in range(r0, r1, step):
                b = min(a + step, r1)
                wc = perturbed_chunk(w.detach()[a:b], z[a - r0 : b - r0], self.coeffs[wb])
                out[..., a:b] = F.linear(x, wc, None if bias is None else bias[a:b])
        return out


class _ChunkedEmbedding:
    """``nn.Embedding`` forward at perturbed weights: only the looked-up rows are perturbed."""

    def __init__(self, module, block, coeffs, direction, used, forward):
        self.m, self.block, self.coeffs, self.direction, self.forward = (
            module,
            block,
            coeffs,
            direction,
            forward,
        )
        used.add(block)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.m.weight.detach()
        out = self.forward(ids)  # (..., dim), unperturbed rows, same dtype as w
        ids = ids.to(w.device)
        for c, (r0, r1) in enumerate(row_chunks(w.shape, w.device)):
            mask = (ids >= r0) & (ids < r1)
            if not bool(mask.any()):
                continue
            rows = ids[mask] - r0
            u = self.direction(self.block, c)[rows]
            out[mask] = perturbed_chunk(w[r0:r1][rows], u, self.coeffs[self.block])
        return out


class _GatherEmbedding:
    """``nn.Embedding`` forward at perturbed weights, perturbing the looked-up rows only: the
    direction is evaluated at their element positions (``direction_at``), so a batch of T tokens
    draws T x dim numbers, not the vocabulary's, and nothing waits on the host (no masks, no
    data-dependent shapes). The values are those of the whole-weight path, bit for bit."""

    def __init__(self, module, block, coeffs, direction_at, used, forward):
        self.m, self.block, self.coeffs, self.forward = module, block, coeffs, forward
        self.direction_at = direction_at
        used.add(block)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.m.weight
        rows = self.forward(ids)  # (..., dim): the looked-up rows, unperturbed, w's dtype
        ids = ids.to(w.device, torch.int64)  # int32 ids: id * dim overflows past 2^31 elements
        dim = w.shape[1]
        index = ids.unsqueeze(-1) * dim + torch.arange(dim, device=w.device)
        u = self.direction_at(self.block, index)
        out = perturbed_chunk(rows.to(w.device), u, self.coeffs[self.block])
        return out.to(rows.device)


def _add_lowrank(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, coeff: float):
    """``out += coeff * left @ right^T`` in place: one GEMM that accumulates into ``out`` (e.g.
    (tokens, vocab) logits), so no temporary of ``out``'s size. The factors are cast to
    ``out``'s dtype: float32 models keep a float32 term, half-precision ones compute it at the
    precision of the layer's own product (a float32 term would cost two float32 copies of
    ``out``: 2 x 16.8 GB for Llama-3.2-1B's head at 16 x 2048 tokens)."""
    flat, dtype = out.view(-1, out.shape[-1]), out.dtype
    flat.addmm_(left.reshape(-1, left.shape[-1]).to(dtype), right.to(dtype).T, alpha=coeff)
    return out


#: On an accelerator a kernel launch costs about the time of moving this many bytes (~4 us at an
#: H200's ~4.8 TB/s): :func:`factored_is_cheaper` charges it per launch. The CPU launches nothing.
LAUNCH_BYTES = 16 << 20


def factored_is_cheaper(
    tokens: int, rows: int, cols: int, element_size: int = 4, launch_bytes: int = 0
) -> bool:
    """Whether ``x W^T + c (x V) U^T`` beats ``x (W + c U V^T)^T`` for a (rows, cols) weight.

    Both share the product with a (rows, cols) matrix. The factored form adds two rank-r products
    that read all of ``x`` and an add over (tokens, rows); the materialised one adds a
    (rows, cols) copy of W. With r small both are memory bound, so on memory alone the factored
    form is cheaper only when ``tokens (rows + cols) < rows cols``: wide layers and few tokens.
    The factored form is also one launch more (three kernels against two), which on a GPU
    outweighs the copy of a small weight: ``launch_bytes`` (:data:`LAUNCH_BYTES` there) is what
    a launch costs in bytes moved.
    """
    return tokens * (rows + cols) * element_size + launch_bytes < rows * cols * element_size


def lowrank_perturbed(w: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor], coeff: float):
    """``w + coeff U V^T`` in ``w``'s dtype, a new tensor, in one ``addmm``: float32 factors for a
    float32 ``w``; for a half-precision one the factors in its dtype (cast once per step for a
    :class:`LowRank` pair), the precision at which the factored form computes the same term (the
    measured direction is then the rounded factors' product, about 2^-8 from the float32 one
    that the update takes, as in the factored form)."""
    u, v = _in_dtype(factors, w.dtype)
    return torch.addmm(w, u, v.T, alpha=coeff)


class _LowRankLinear:
    """``nn.Linear`` at ``W + c U V^T``: as ``x W^T + c (x V) U^T`` when that is cheaper (see
    :func:`factored_is_cheaper`), else with a transient perturbed copy of W (one module's weight,
    at most ``chunk_elements(device)``, like the Gaussian path)."""

    def __init__(self, module, entries, coeffs, direction, used, factors):
        self.m, self.entries, self.coeffs, self.direction = module, entries, coeffs, direction
        self.factors = factors
        self.u, self.v = factors
        used.update(entries.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias, bb = self.m.bias, self.entries.get("bias")
        if bias is not None and bb is not None:
            bias = perturbed_block(bias, bb, self.direction, self.coeffs[bb])
        bias = None if bias is None else bias.detach()
        x = x.to(self.v.device)
        w, coeff = self.m.weight.detach(), self.coeffs[self.entries["weight"]]
        launch = LAUNCH_BYTES if zdef.accelerated(w.device) else 0
        if w.numel() <= zdef.chunk_elements(w.device) and not factored_is_cheaper(
            x[..., 0].numel(), *w.shape, w.element_size(), launch
        ):
            return F.linear(x, lowrank_perturbed(w, self.factors, coeff), bias)
        out = F.linear(x, w, bias)
        xv = x @ _in_dtype(self.factors, x.dtype)[1]  # (..., r), at the layer's precision
        return _add_lowrank(out, xv, _in_dtype(self.factors, out.dtype)[0], coeff)


class _LowRankEmbedding:
    """``nn.Embedding`` at ``W + c U V^T``: looked-up rows plus ``c U[ids] V^T``."""

    def __init__(self, module, block, coeffs, used, factors, forward):
        self.block, self.coeffs, self.forward = block, coeffs, forward
        self.factors = factors
        used.add(block)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.forward(ids)
        u, v = _in_dtype(self.factors, out.dtype)
        return _add_lowrank(out, u[ids.to(u.device)], v, self.coeffs[self.block])
