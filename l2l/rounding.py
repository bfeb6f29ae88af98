"""Rounding a higher-precision result into a tensor's storage dtype, exact in expectation.

A ZO update (``lr * g ~ 1e-6``) is far below the spacing of bfloat16 weights (~1.2e-4 at
``|w| ~ 0.02``): rounded to nearest, almost all of it is lost. Stochastic rounding picks one of
the two representable neighbours of ``x`` with probability proportional to closeness, so
``E[round(x)] = x`` and updates add up over steps as they would in float32.

The random bits are a pure function of ``(key, element position)``: the key mixes the step seed,
the block and a salt (:func:`rounding_key`), positions count a block's elements row-major (as
z's do, so the bits do not depend on how a block is cut into chunks), and the bits come from
z's counter-based generator (:func:`l2l.z.counter_bits`): a trajectory replayed or a run resumed
draws exactly the same bits, on any device. The salts keep these bits independent of z and of
each other (:data:`SALT_UPDATE`, :data:`SALT_HESSIAN`, :data:`SALT_SHIFT`).

Targets and inputs: bfloat16 and float16 from float32, float32 from float64. Per element:

* a representable ``x`` (``+-0`` and ``+-inf`` included) is returned unchanged, NaN as NaN;
* otherwise the result is the neighbour toward zero ``lo`` or away from zero ``hi`` with
  ``P(hi) = (|x| - |lo|) / (|hi| - |lo|)``, the sign of ``x`` kept (subnormals included);
* beyond the largest finite value ``M`` the next value is ``inf`` at distance one ulp, i.e. as if
  the exponent range went on (IEEE-754 style stochastic rounding): ``M < |x| < 2^(emax+1)`` gives
  ``M`` or ``inf``, larger ``|x|`` gives ``inf``; a finite ``x`` never becomes NaN.

The rounding adds random low bits to the input's bit pattern and truncates them (16 bits for
bfloat16, 13 for float16, 29 for float32 from float64; the carry does the rest): about ten
elementwise torch ops besides the bits, no host synchronisation.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from l2l import z as zdef
from l2l.z import mix_seed

#: ``"stochastic"``: unbiased rounding into half-precision storage; ``"nearest"``: IEEE round to
#: nearest even (what every public ZO code does; kept to compare against).
ROUNDINGS = ("stochastic", "nearest")

#: Salts of the three streams of rounding bits (the parameter update, HiZOO's curvature EMA, the
#: meta-training look-ahead shift).
SALT_UPDATE = 0x5255_5044  # "RUPD"
SALT_HESSIAN = 0x5248_4553  # "RHES"
SALT_SHIFT = 0x5253_4846  # "RSHF"

#: storage dtype -> (input dtype, integer view of the input, input mantissa bits the storage
#: lacks, the storage's smallest normal value or None when its exponent range is the input's)
_TARGETS = {
    torch.bfloat16: (torch.float32, torch.int32, 16, None),
    torch.float16: (torch.float32, torch.int32, 13, 2.0**-14),
    torch.float32: (torch.float64, torch.int64, 29, 2.0**-126),
}
#: integer view -> (bits of the sign, of inf, of a quiet NaN) of the float of that width
_PATTERNS = {
    torch.int32: (-(1 << 31), 0x7F80_0000, 0x7FC0_0000),
    torch.int64: (-(1 << 63), 0x7FF0_0000_0000_0000, 0x7FF8_0000_0000_0000),
}


@functools.cache
def _pattern(value: float, idt: torch.dtype) -> int:
    """The bit pattern of ``value`` as an integer (a host constant: computed once)."""
    fdt = torch.float32 if idt == torch.int32 else torch.float64
    return int(torch.tensor(value, dtype=fdt).view(idt))


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``dtype`` copy of ``t``: the input :func:`round_into` takes."""
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)


def sqrt_rn(t: torch.Tensor, transient: bool = False) -> torch.Tensor:
    """Correctly rounded ``sqrt`` of a float32 tensor, the same bits on every device.

    torch's CPU float32 ``sqrt`` is not correctly rounded (about 0.6% of inputs come out one ulp
    off; CUDA's is IEEE ``sqrt.rn``), so a curvature ``H`` measured on a GPU would give a CPU
    replay other directions ``z / sqrt(H)``. On the CPU the root is taken in float64 and rounded
    once to float32, which is correctly rounded for ``sqrt`` (53 >= 2 * 24 + 2 bits); elsewhere
    it is the device's own single-op ``sqrt``. ``transient``: on the CPU the result is a scratch
    buffer, overwritten by the next transient call (use it at once); the float64 temporary always
    is one (fresh chunk-sized allocations cost page faults, more than the root).
    """
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return torch.sqrt(t)
    n = t.numel()
    wide = _SCRATCH.get(3, n, torch.float64, t.device)
    torch.sqrt(wide.copy_(t.reshape(-1)), out=wide)
    out = (
        _SCRATCH.get(4, n, torch.float32, t.device)
        if transient
        else torch.empty(n, dtype=torch.float32, device=t.device)
    )
    return out.copy_(wide).view(t.shape)


def rounding_key(step_seed: int, block: int, salt: int) -> int:
    """The key of block ``block``'s rounding bits at ``step_seed`` (``salt``: which stream)."""
    return mix_seed(step_seed, block, salt)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


class _Scratch:
    """Reusable buffers per (device, slot), grown on demand: a fresh chunk-sized allocation per
    call costs page faults on CPU. Slot 0 holds the bits, 1 and 2 the temporaries, 3 and 4
    :func:`sqrt_rn`'s."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, int], torch.Tensor] = {}

    def get(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = self._bufs.get((device, slot))
        if buf is None or buf.numel() < nbytes:
            with torch.inference_mode(False):  # reusable in and outside inference mode
                buf = torch.empty(max(nbytes, 8), dtype=torch.uint8, device=device)
            self._bufs[device, slot] = buf
        return buf[:nbytes].view(dtype)


_SCRATCH = _Scratch()


def position_bits(key: int, start: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """(numel,) int32: 32 uniform bits for each position ``start .. start + numel - 1``.

    Position ``i`` takes word ``i`` of :func:`l2l.z.counter_bits`'s stream ``key`` viewed as
    int32 (the low then the high half of each 64-bit output): a pure function of ``(key, i)``,
    the same on every device. A scratch buffer, overwritten by the next call: use it at once.
    """
    device = torch.device(device)
    first, stop = start // 2, (start + numel + 1) // 2
    out = _SCRATCH.get(0, stop - first, torch.int64, device)
    words = zdef.counter_bits(key, first, stop - first, device, out=out).view(torch.int32)
    return words[start - 2 * first : start - 2 * first + numel]


def _below_(m: torch.Tensor, bound: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` = all ones where the non-negative integers ``m`` are below ``bound``, else 0."""
    torch.sub(m, bound, out=out)
    return out.bitwise_right_shift_(8 * out.element_size() - 1)  # arithmetic: the sign


def _round_bits(dest: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, complement: bool):
    """Add ``drop`` random bits to ``|x|``'s bit pattern and truncate them; ``x`` is overwritten.

    In a binade the storage's values are the inputs whose low ``drop`` bits are zero, and the
    pattern is linear in the value: truncating ``pattern + r`` rounds ``|x|`` up with
    probability (low bits) / 2^drop. The carry crosses binades and reaches inf's pattern past
    the largest finite value. Below the storage's smallest normal value ``tiny`` its spacing is
    fixed: there ``|x| + tiny`` (one binade up, the same spacing) is rounded, and ``tiny`` taken
    off. In-place integer ops on scratch buffers throughout (masks from sign bits).
    """
    _, idt, drop, tiny = _TARGETS[dest.dtype]
    sign_bit, inf, qnan = _PATTERNS[idt]
    mask = (1 << drop) - 1
    r = bits.bitwise_and_(mask)
    if complement:
        r.bitwise_xor_(mask)
    m = x.view(idt).view(-1)
    sign, t = (_SCRATCH.get(slot, m.numel(), idt, m.device) for slot in (1, 2))
    torch.bitwise_and(m, sign_bit, out=sign)
    m.bitwise_xor_(sign)  # |x|
    # NaN (above inf's pattern) -> the quiet NaN: the added bits cannot carry it out of NaN
    m.bitwise_or_(_below_(m, inf + 1, t).bitwise_not_().bitwise_and_(qnan)).clamp_(max=qnan)
    if tiny is not None:
        tiny_bits = _pattern(tiny, idt)
        offset = _below_(m, tiny_bits, t).bitwise_and_(tiny_bits).view(x.dtype)
        # rounded to the input's precision: off by at most 2^-14 (float16) or 2^-30 (float32)
        # of the subnormal spacing
        x.view(-1).add_(offset)
    m.add_(r).bitwise_and_(~mask)
    if tiny is not None:
        x.view(-1).sub_(offset)  # exact (Sterbenz)
    m.bitwise_or_(sign)
    dest.copy_(x.view(dest.shape))  # exact: a value of the storage dtype (or beyond: inf)


def round_into(
    dest: torch.Tensor,
    x: torch.Tensor,
    key: int,
    *,
    start: int = 0,
    rounding: str = "stochastic",
    complement: bool = False,
) -> None:
    """Write ``x`` rounded to ``dest``'s dtype into ``dest`` (same shape); ``x`` is overwritten.

    ``x`` is float32 for a bfloat16/float16 ``dest`` and float64 for a float32 one, contiguous.
    Its element ``i`` (row-major) uses the bits of position ``start + i`` under ``key``: with
    ``start`` the position of ``x``'s first element in its block, any piece of a block rounds as
    it would in the whole.
    ``complement`` uses the complement of every element's random bits: if ``t1 = round(t0 + d)``,
    rounding ``t1 - d`` with the same key and ``complement`` gives back ``t0`` exactly whenever
    ``t0``, ``t0 + d``, ``t1`` and ``t1 - d`` share a binade (the meta-training undo builds on
    it).
    """
    if dest.shape != x.shape:
        raise ValueError(f"shapes differ: dest {tuple(dest.shape)}, x {tuple(x.shape)}")
    if rounding == "nearest":
        dest.copy_(x)
        return
    check_rounding(rounding)
    if dest.dtype not in _TARGETS:
        raise TypeError(
            f"stochastic rounding targets bfloat16, float16 or float32, not {dest.dtype}"
        )
    wanted = _TARGETS[dest.dtype][0]
    if x.dtype != wanted or not x.is_contiguous():
        raise TypeError(
            f"stochastic rounding into {dest.dtype} takes a contiguous {wanted} input, got a "
            f"{'' if x.is_contiguous() else 'non-contiguous '}{x.dtype} tensor"
        )
    # bfloat16 and float32 targets are one kernel where there are kernels; elsewhere these
    # ops, its reference, profiled as that kernel
    fused = dest.dtype in (torch.bfloat16, torch.float32) and dest.is_contiguous()
    with torch.profiler.record_function("l2l::round") if fused else contextlib.nullcontext():
        kernels = zdef._kernels(x.device) if fused else None
        if kernels is not None:
            args = (dest.view(-1), x.view(-1), key, start, complement)
            if zdef.run_kernel(kernels, "round_into", *args) is not None:
                return
        _round_bits(dest, x, position_bits(key, start, x.numel(), x.device), complement)


def lowrank_update_(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: float,
    factor: float,
    key: int,
    *,
    start: int = 0,
    rounding: str = "stochastic",
) -> None:
    """A bfloat16 chunk ``w`` (rows, cols) along a low-rank direction, in place:
    ``w <- round(factor w + alpha a b^T)`` (``a``: (rows, r), ``b``: (cols, r), float32), computed
    in float32 and rounded as :func:`round_into` does with ``key`` and ``start``.

    ``a b^T`` is summed left to right over the rank with every product and sum rounded, and
    ``alpha`` is applied in the same FMA as torch's ``add(x, t, alpha=alpha)``: elementwise ops
    only, so every device computes the same bits (a GEMM's rounding depends on its library).
    Where the kernels run it is one kernel that never writes ``a b^T``; elsewhere these torch
    ops, its reference, profiled as that kernel (``l2l::lowrank``).
    """
    check_rounding(rounding)
    if w.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"lowrank_update_ takes 2-D w, a, b, got {w.dim()}, {a.dim()}, {b.dim()}")
    (rows, cols), rank = w.shape, a.shape[1]
    if a.shape[0] != rows or tuple(b.shape) != (cols, rank) or rank < 1:
        raise ValueError(
            f"lowrank_update_: w {tuple(w.shape)} needs a (rows, r) and b (cols, r), got a "
            f"{tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.device != w.device or b.device != w.device:
        raise ValueError(
            f"lowrank_update_: w, a and b must be on one device, got {w.device}, {a.device}, "
            f"{b.device}"
        )
    a, b = a.float().contiguous(), b.float().contiguous()
    with torch.profiler.record_function("l2l::lowrank"):
        kernels = zdef._kernels(w.device)
        if kernels is not None and w.dtype == torch.bfloat16 and w.is_contiguous():
            args = (w, a, b, key, start, alpha, factor, rounding == "stochastic")
            if zdef.run_kernel(kernels, "lowrank_update", *args) is not None:
                return
        # elementwise, so row slices give the bits of the whole: three float32 buffers of a
        # slice, not of a whole weight
        step = max(1, zdef.CHUNK_ELEMENTS // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            view, left = w[r0:r1], a[r0:r1]
            t = torch.mul(left[:, :1], b[:, 0])
            if rank > 1:
                term = torch.empty_like(t)
                for k in range(1, rank):
                    t.add_(torch.mul(left[:, k : k + 1], b[:, k], out=term))
            new = upcast(view, torch.float32)
            if factor != 1.0:
                new.mul_(factor)
            new.add_(t, alpha=alpha)
            round_into(view, new, key, start=start + r0 * cols, rounding=rounding)
