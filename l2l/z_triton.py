"""z in one GPU kernel: :mod:`l2l.z`'s generator written in Triton.

:func:`l2l.z.gaussian` and :func:`l2l.z.gaussian_at` run these kernels on CUDA when Triton is
installed; the torch-op generator of :mod:`l2l.z` (about 60 ops per pass) is their reference and
the CPU's path. Each program of :func:`draw` takes one group of ``GROUP`` pairs: SplitMix64 of
the pair's counter in registers, Box-Muller with the same float32 operations in the same order,
and both outputs stored, so a draw is one kernel and one write of z.

The same bits as the reference, by construction:

* the integer part is uint64 arithmetic (wrapping multiply, logical shifts): the reference's
  int64 ops with its masks;
* every float32 operation is one IEEE-rounded op of the reference, in its order: kernels are
  compiled with ``enable_fp_fusion=False`` (no multiply-add contracted into an FMA) and divide
  with ``div_rn`` (Triton's ``/`` may lower to an approximate division);
* conversions int32 -> float32 round to nearest, as torch's ``copy_`` does.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors with NumPy, which rounds each of these
operations as IEEE does: the tests compare them with the reference bit for bit there.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from l2l import z_spec as zdef


def _bits64(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits32(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


_GAMMA = tl.constexpr(zdef.GAMMA)
_MIX1 = tl.constexpr(zdef.MIX1)
_MIX2 = tl.constexpr(zdef.MIX2)
_SIGN = tl.constexpr(-(1 << 31))
_LOG_BIAS = tl.constexpr(zdef.LOG_BIAS)
_SQRT_HALF_BITS = tl.constexpr(zdef.SQRT_HALF_BITS)
_SQRT_GUESS = tl.constexpr(zdef.SQRT_GUESS)
_TWO_LN2 = tl.constexpr(zdef.TWO_LN2)
_PHI_SCALE = tl.constexpr(zdef.PHI_SCALE)
_L0, _L1, _L2, _L3 = (tl.constexpr(c) for c in zdef.LOG_POLY)
_S0, _S1, _S2, _S3 = (tl.constexpr(c) for c in zdef.SIN_POLY)
_C0, _C1, _C2, _C3 = (tl.constexpr(c) for c in zdef.COS_POLY)
_G = tl.constexpr(zdef.GROUP)
_SEED_SHIFT0, _SEED_SHIFT1 = (tl.constexpr(v) for v in zdef.SEED_SHIFTS)
_SIGN64 = tl.constexpr(-(1 << 63))
_INF64_BITS = tl.constexpr(0x7FF0_0000_0000_0000)
_QNAN64_BITS = tl.constexpr(0x7FF8_0000_0000_0000)
_TINY32_BITS = tl.constexpr(_bits64(2.0**-126))
_H_FLOOR32_BITS = tl.constexpr(_bits32(zdef.H_FLOOR))
_H_FLOOR64_BITS = tl.constexpr(_bits64(zdef.H_FLOOR))
#: Launch options of every kernel here: no contracted FMAs (see the module docstring).
_OPTIONS = dict(enable_fp_fusion=False, num_warps=4)

assert all(len(p) == 4 for p in (zdef.LOG_POLY, zdef.SIN_POLY, zdef.COS_POLY))


@triton.jit
def _pair_bits(key, k):
    """SplitMix64 output ``k`` (int64 tensor) of stream ``key``: ``mix64(key + (k + 1) GAMMA)``."""
    # key may arrive as int32 (small values) or int64: widened through k's int64 first
    h = (tl.zeros_like(k) + key).to(tl.uint64, bitcast=True)
    h = h + (k + 1).to(tl.uint64, bitcast=True) * _GAMMA
    h = (h ^ (h >> 30)) * _MIX1
    h = (h ^ (h >> 27)) * _MIX2
    return h ^ (h >> 31)


@triton.jit
def _horner4(x, c0, c1, c2, c3):
    out = x * c3
    out = (out + c2) * x
    out = (out + c1) * x
    return out + c0


@triton.jit
def _box_muller(h):
    """The two float32 outputs of the pair whose mixed bits are ``h`` (uint64): the reference's
    ``_box_muller_into``, op for op."""
    low = h.to(tl.uint32).to(tl.int32, bitcast=True)
    sign0 = low & _SIGN
    sign1 = (low << 1) & _SIGN
    high = (h >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
    phi = high.to(tl.float32) * _PHI_SCALE
    v = (low & 0x3FFFFFFF).to(tl.float32) + 1.0
    ix = v.to(tl.int32, bitcast=True) - _LOG_BIAS
    m = (ix & 0x7FFFFF) + _SQRT_HALF_BITS
    q = ((ix ^ 0x0FFFFFFF) >> 23).to(tl.float32) * _TWO_LN2
    t = m.to(tl.float32, bitcast=True) - 1.0
    s = tl.div_rn(t, t + 2.0)
    q = q - _horner4(s * s, _L0, _L1, _L2, _L3) * s
    # sqrt by three Newton steps from the exponent-halving guess
    r = ((q.to(tl.int32, bitcast=True) >> 1) + _SQRT_GUESS).to(tl.float32, bitcast=True)
    r = (r + tl.div_rn(q, r)) * 0.5
    r = (r + tl.div_rn(q, r)) * 0.5
    r = (r + tl.div_rn(q, r)) * 0.5
    p = phi * phi
    sin = _horner4(p, _S0, _S1, _S2, _S3) * phi
    cos = _horner4(p, _C0, _C1, _C2, _C3)
    out0 = ((cos - sin) * r).to(tl.int32, bitcast=True) ^ sign0
    out1 = ((cos + sin) * r).to(tl.int32, bitcast=True) ^ sign1
    return out0.to(tl.float32, bitcast=True), out1.to(tl.float32, bitcast=True)


@triton.jit
def _draw_kernel(out_ptr, key, start, numel, first_group):
    """Program ``j``: group ``first_group + j`` of the stream (see :func:`_draw_group`)."""
    q = tl.arange(0, _G).to(tl.int64)
    _draw_group(out_ptr, key, first_group + tl.program_id(0).to(tl.int64), q, start, numel)


@triton.jit
def _draw_group(out_ptr, key, g, q, start, numel):
    """Group ``g``, i.e. elements ``2 G g + q`` and ``2 G g + G + q`` of stream ``key`` (``q``:
    ``0 .. G - 1``), stored at ``out_ptr[element - start]`` when inside ``[start, start + numel)``."""
    out0, out1 = _box_muller(_pair_bits(key, g * _G + q))
    first = 2 * _G * g + q - start
    tl.store(out_ptr + first, out0, mask=(first >= 0) & (first < numel))
    second = first + _G
    tl.store(out_ptr + second, out1, mask=(second >= 0) & (second < numel))


@triton.jit
def _seed_key(seed, block, like):
    """``l2l.z.z_key(seed, block)`` (``mix_seed`` of the two) as an int64 tensor of ``like``'s
    shape: the fold of :data:`l2l.z_spec.SEED_SHIFTS` in uint64."""
    # the values widened through an int64 tensor first (a scalar may arrive as int32, and the
    # interpreter holds an int from 2^31 to 2^32 as uint32)
    wide = tl.zeros_like(like).to(tl.int64)
    h = wide.to(tl.uint64, bitcast=True) + _GAMMA
    h = (h ^ (wide + seed).to(tl.uint64, bitcast=True)) * _MIX1
    h = (h ^ (h >> _SEED_SHIFT0)) * _MIX2
    h = h ^ (h >> _SEED_SHIFT1)
    h = (h ^ (wide + block).to(tl.uint64, bitcast=True)) * _MIX1
    h = (h ^ (h >> _SEED_SHIFT0)) * _MIX2
    h = h ^ (h >> _SEED_SHIFT1)
    return (h >> 1).to(tl.int64, bitcast=True)


@triton.jit(do_not_specialize=["seed"])
def _draw_many_kernel(out_ptr, seed, table_ptr, segments):
    """Program ``j`` of :func:`draw_many`: one group of one segment. ``table`` (int64) holds per
    segment its block, start, element count and offset in ``out`` (four rows of ``segments``),
    then per program its segment and group."""
    j = tl.program_id(0).to(tl.int64)
    programs = table_ptr + 4 * segments
    seg = tl.load(programs + 2 * j)
    g = tl.load(programs + 2 * j + 1)
    block = tl.load(table_ptr + seg)
    start = tl.load(table_ptr + segments + seg)
    numel = tl.load(table_ptr + 2 * segments + seg)
    offset = tl.load(table_ptr + 3 * segments + seg)
    q = tl.arange(0, _G).to(tl.int64)
    _draw_group(out_ptr + offset, _seed_key(seed, block, q), g, q, start, numel)


@triton.jit
def _at_kernel(out_ptr, index_ptr, key, n, BLOCK: tl.constexpr):
    """``out[j]`` = element ``index[j]`` of the stream (output ``(i >> 10) & 1`` of pair
    ``((i >> 11) << 10) | (i & 1023)``)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    i = tl.load(index_ptr + j, mask=mask, other=0)
    out0, out1 = _box_muller(_pair_bits(key, ((i >> 11) << 10) | (i & (_G - 1))))
    tl.store(out_ptr + j, tl.where(((i >> 10) & 1) == 1, out1, out0), mask=mask)


@triton.jit
def _add_z_kernel(
    out_ptr,
    x_ptr,
    h_ptr,
    key,
    start,
    numel,
    first_group,
    alpha,
    FMA: tl.constexpr,
    SCALED: tl.constexpr,
):
    """``out = x + alpha u`` over elements ``[start, start + numel)`` of the stream, the groups of
    :func:`_draw_kernel`, with ``u = z`` or with ``SCALED`` HiZOO's ``u = z / sqrt(h)``
    (``div_rn``, ``sqrt_rn``; ``h`` float32, aligned with ``x``): float32 ``x`` as one FMA
    (torch's ``add(x, u, alpha=alpha)``), half precision ``x`` as ``u alpha + float(x)`` rounded
    twice, then to ``out``'s dtype (torch's ``u.mul(alpha).add_(x.float()).to(x.dtype)``)."""
    g = first_group + tl.program_id(0).to(tl.int64)
    q = tl.arange(0, _G).to(tl.int64)
    out0, out1 = _box_muller(_pair_bits(key, g * _G + q))
    first = 2 * _G * g + q - start
    _add_store(out_ptr, x_ptr, h_ptr, first, numel, out0, alpha, FMA, SCALED)
    _add_store(out_ptr, x_ptr, h_ptr, first + _G, numel, out1, alpha, FMA, SCALED)


@triton.jit
def _add_store(
    out_ptr, x_ptr, h_ptr, pos, numel, z, alpha, FMA: tl.constexpr, SCALED: tl.constexpr
):
    mask = (pos >= 0) & (pos < numel)
    x = tl.load(x_ptr + pos, mask=mask, other=0.0)
    if SCALED:
        z = tl.div_rn(z, tl.sqrt_rn(tl.load(h_ptr + pos, mask=mask, other=1.0)))
    if FMA:
        y = tl.fma(z, alpha, x)
    else:
        y = z * alpha + x.to(tl.float32)
    tl.store(out_ptr + pos, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(w_ptr, zkey, rkey, start, numel, first_group, alpha, factor, SR: tl.constexpr):
    """bfloat16 ``w <- round(fma(z, alpha, float(w) factor))`` in place over elements
    ``[start, start + numel)`` (the groups of :func:`_draw_kernel`): the update of
    ``l2l.methods.base`` (upcast, decay, ``add_(z, alpha)``, :func:`l2l.rounding.round_into`)
    in one pass. ``SR``: stochastic rounding with word ``i`` of stream ``rkey`` for element ``i``
    (the low half of SplitMix64 output ``i // 2`` for even ``i``, the high half for odd), else
    round to nearest even."""
    g = first_group + tl.program_id(0).to(tl.int64)
    q = tl.arange(0, _G).to(tl.int64)
    z0, z1 = _box_muller(_pair_bits(zkey, g * _G + q))
    first = 2 * _G * g + q
    _update_store(w_ptr, rkey, first, start, numel, z0, alpha, factor, SR)
    _update_store(w_ptr, rkey, first + _G, start, numel, z1, alpha, factor, SR)


@triton.jit
def _word(rkey, element):
    """Random word ``element`` of stream ``rkey`` (:func:`l2l.rounding.position_bits`): the low
    half of SplitMix64 output ``element // 2`` for even ``element``, the high half for odd."""
    word = _pair_bits(rkey, element >> 1)
    word = tl.where((element & 1) == 1, word >> 32, word & 0xFFFFFFFF)
    return word.to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _round_bf16(x, rkey, element, flip=0):
    """float32 ``x`` stochastically rounded to a bfloat16 value (still float32), with word
    ``element`` of stream ``rkey`` (its dropped bits xor ``flip``): :func:`l2l.rounding.round_into`'s
    rule."""
    r = (_word(rkey, element) & 0xFFFF) ^ flip
    m = x.to(tl.int32, bitcast=True)
    sign = m & _SIGN
    m = m ^ sign
    m = tl.where(m > 0x7F800000, 0x7FC00000, m)  # NaN -> the quiet NaN
    m = ((m + r) & -65536) | sign  # drop the low 16 bits after adding random ones
    return m.to(tl.float32, bitcast=True)  # a bfloat16 value (or inf): converts exactly


@triton.jit
def _round_f32(x, rkey, element, flip=0):
    """float64 ``x`` stochastically rounded to float32 (the rule of :func:`_round_bf16` on 29
    dropped bits; below float32's smallest normal value ``x + tiny`` is rounded and ``tiny`` taken
    off, as :func:`l2l.rounding.round_into` does)."""
    r = ((_word(rkey, element) & 0x1FFFFFFF) ^ flip).to(tl.int64)
    tiny = tl.full(x.shape, _TINY32_BITS, tl.int64).to(tl.float64, bitcast=True)
    m = x.to(tl.int64, bitcast=True)
    sign = m & _SIGN64
    m = m ^ sign
    m = tl.where(m > _INF64_BITS, _QNAN64_BITS, m)
    offset = tl.where(m < _TINY32_BITS, tiny, tl.zeros_like(tiny))
    m = (m.to(tl.float64, bitcast=True) + offset).to(tl.int64, bitcast=True)
    m = ((m + r) & -(1 << 29)).to(tl.float64, bitcast=True) - offset
    m = m.to(tl.int64, bitcast=True) | sign
    return m.to(tl.float64, bitcast=True).to(tl.float32)  # exact: a float32 value (or inf)


@triton.jit
def _update_store(w_ptr, rkey, element, start, numel, z, alpha, factor, SR: tl.constexpr):
    pos = element - start
    _update_at(w_ptr, rkey, element, pos, (pos >= 0) & (pos < numel), z, alpha, factor, SR)


@triton.jit
def _lowrank_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    rkey,
    start,
    rows,
    cols,
    alpha,
    factor,
    RANK: tl.constexpr,
    SR: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """bfloat16 ``w <- round(fma(t, alpha, float(w) factor))`` in place for a (rows, cols) tile
    of a chunk whose first element is element ``start`` of its block, with ``t = a b^T`` (``a``
    (rows, RANK), ``b`` (cols, RANK), contiguous float32) summed left to right over the rank,
    every product and sum rounded: :func:`l2l.rounding.lowrank_update_`'s ops; rounding as
    :func:`_update_kernel`. The direction is never written to memory."""
    i = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    mi, mj = i < rows, j < cols
    t = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.static_range(RANK):
        ak = tl.load(a_ptr + i * RANK + k, mask=mi, other=0.0)
        bk = tl.load(b_ptr + j * RANK + k, mask=mj, other=0.0)
        if k == 0:
            t = ak[:, None] * bk[None, :]
        else:
            t = t + ak[:, None] * bk[None, :]
    pos = i[:, None] * cols + j[None, :]
    mask = mi[:, None] & mj[None, :]
    _update_at(w_ptr, rkey, start + pos, pos, mask, t, alpha, factor, SR)


@triton.jit
def _update_at(w_ptr, rkey, element, pos, mask, z, alpha, factor, SR: tl.constexpr):
    """``w[pos] <- round(fma(z, alpha, float(w[pos]) factor))`` where ``mask``, the rounding bits
    those of ``element`` (the position in the block)."""
    x = tl.load(w_ptr + pos, mask=mask, other=0.0).to(tl.float32) * factor
    x = tl.fma(z, alpha, x)
    if SR:
        x = _round_bf16(x, rkey, element)
    tl.store(w_ptr + pos, x.to(tl.bfloat16), mask=mask)


@triton.jit(do_not_specialize=["keep_hi", "keep_lo", "rate_hi", "rate_lo"])
def _hizoo_kernel(
    w_ptr,
    h_ptr,
    zkey,
    wkey,
    hkey,
    start,
    numel,
    first_group,
    alpha,
    factor,
    coef,
    keep,
    rate,
    keep_hi,
    keep_lo,
    rate_hi,
    rate_lo,
    W: tl.constexpr,
    H: tl.constexpr,
):
    """HiZOO's update of one chunk, in place and in one pass (see :func:`_hizoo_store`)."""
    g = first_group + tl.program_id(0).to(tl.int64)
    q = tl.arange(0, _G).to(tl.int64)
    z0, z1 = _box_muller(_pair_bits(zkey, g * _G + q))
    keep64 = _f64(keep_hi, keep_lo)
    rate64 = _f64(rate_hi, rate_lo)
    first = 2 * _G * g + q
    args = (alpha, factor, coef, keep, rate, keep64, rate64)
    _hizoo_store(w_ptr, h_ptr, wkey, hkey, first, start, numel, z0, *args, W, H)
    _hizoo_store(w_ptr, h_ptr, wkey, hkey, first + _G, start, numel, z1, *args, W, H)


@triton.jit
def _f64(hi, lo):
    """The float64 whose bit pattern has 32-bit halves ``hi`` and ``lo`` (Triton passes Python
    floats as float32)."""
    bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _hizoo_store(
    w_ptr,
    h_ptr,
    wkey,
    hkey,
    element,
    start,
    numel,
    z,
    alpha,
    factor,
    coef,
    keep,
    rate,
    keep64,
    rate64,
    W: tl.constexpr,
    H: tl.constexpr,
):
    """With ``u = z / sqrt(h)`` at the chunk's H (``h``, float32):

    * ``W``: 1 float32 ``w <- fma(u, alpha, w factor)``; 2 (3) bfloat16, the same in float32
      rounded stochastically with stream ``wkey`` (to nearest even); 0 ``w`` untouched;
    * ``H``: the EMA ``h <- (1 - a) h + a |coef h (z^2 - 1)|`` floored at ``_H_FLOOR``: 1 in
      float32 (``keep``, ``rate`` = 1 - a, a), 2 in float64 (``keep64``, ``rate64``) rounded
      stochastically into float32 with stream ``hkey``; 0 ``h`` untouched.

    These are the float32/float64 ops of :meth:`l2l.methods.hizoo.HiZOO._apply`, in its order."""
    pos = element - start
    mask = (pos >= 0) & (pos < numel)
    h = tl.load(h_ptr + pos, mask=mask, other=1.0)
    if W != 0:
        u = tl.div_rn(z, tl.sqrt_rn(h))
        x = tl.load(w_ptr + pos, mask=mask, other=0.0).to(tl.float32) * factor
        x = tl.fma(u, alpha, x)
        if W == 2:
            x = _round_bf16(x, wkey, element)
        tl.store(w_ptr + pos, x.to(w_ptr.dtype.element_ty), mask=mask)
    if H != 0:
        est = tl.abs((coef * h) * (z * z - 1.0))
        if H == 1:
            new = tl.fma(est, rate, h * keep)
            floor = tl.full(h.shape, _H_FLOOR32_BITS, tl.int32).to(tl.float32, bitcast=True)
        else:
            new = tl.fma(est.to(tl.float64), rate64, h.to(tl.float64) * keep64)
            floor = tl.full(h.shape, _H_FLOOR64_BITS, tl.int64).to(tl.float64, bitcast=True)
        new = tl.where(new < floor, floor, new)  # clamp(min=floor); NaN stays NaN
        if H == 2:
            new = _round_f32(new, hkey, element)
        tl.store(h_ptr + pos, new, mask=mask)


_AT_BLOCK = 1024


@triton.jit
def _round_kernel(dest_ptr, x_ptr, rkey, start, flip, n, BLOCK: tl.constexpr):
    """``dest[j]`` = ``x[j]`` (float32 into bfloat16, float64 into float32) rounded
    stochastically with word ``start + j`` of stream ``rkey``, its dropped bits xor ``flip``."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    x = tl.load(x_ptr + j, mask=mask, other=0.0)
    if dest_ptr.dtype.element_ty == tl.float32:
        y = _round_f32(x, rkey, start + j, flip)
    else:
        y = _round_bf16(x, rkey, start + j, flip)
    tl.store(dest_ptr + j, y.to(dest_ptr.dtype.element_ty), mask=mask)


def _flat_launch(kernel, out: torch.Tensor, *args) -> torch.Tensor:
    """``kernel(out, *args, n, BLOCK)`` over the ``n = out.numel()`` elements of ``out``, one
    program per ``_AT_BLOCK`` of them."""
    n = out.numel()
    if n:
        with _on(out):
            kernel[(triton.cdiv(n, _AT_BLOCK),)](out, *args, n, BLOCK=_AT_BLOCK, **_OPTIONS)
    return out


def _on(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device, which a model split over
    several GPUs does not keep at the tensor's)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def draw(key: int, start: int, out: torch.Tensor) -> torch.Tensor:
    """Elements ``start .. start + out.numel() - 1`` of stream ``key`` into ``out`` (contiguous
    float32), in one kernel."""
    numel = out.numel()
    g0, groups = zdef.group_range(start, numel)
    if numel:
        with _on(out):
            _draw_kernel[(groups,)](out, key, start, numel, g0, **_OPTIONS)
    return out


class _Layouts:
    """Launch tables of :func:`draw_many` per (device, segments), uploaded once (one
    host-to-device copy) and reused: a method draws the same layout every step."""

    def __init__(self, size: int = 8) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, int]] = {}
        self.size = size

    def get(self, segments: tuple, device: torch.device) -> tuple[torch.Tensor, int]:
        key = (device, segments)
        hit = self._cache.get(key)
        if hit is None:
            columns: list[list[int]] = [[], [], [], []]
            programs: list[int] = []
            offset = 0
            for s, (block, start, numel) in enumerate(segments):
                for column, value in zip(columns, (block, start, numel, offset), strict=True):
                    column.append(value)
                g0, groups = zdef.group_range(start, numel)
                programs.extend(v for g in range(g0, g0 + groups) for v in (s, g))
                offset += numel
            host = [v for column in columns for v in column] + programs
            hit = (torch.tensor(host, dtype=torch.int64).to(device), len(programs) // 2)
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit


_LAYOUTS = _Layouts()


def draw_many(seed: int, segments: list[tuple[int, int, int]], out: torch.Tensor) -> torch.Tensor:
    """For each ``(block, start, numel)`` of ``segments``, elements ``start .. start + numel - 1``
    of block ``block``'s z at step seed ``seed`` (``0 <= seed < 2^63``), one after another in
    ``out`` (contiguous float32 of their total size), in one kernel: the keys are derived in the
    kernel, so a new seed uploads nothing."""
    table, programs = _LAYOUTS.get(tuple(segments), out.device)
    if programs:
        with _on(out):
            _draw_many_kernel[(programs,)](out, seed, table, len(segments), **_OPTIONS)
    return out


def add_z(x: torch.Tensor, key: int, start: int, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """``out = x + alpha z`` for elements ``start .. start + x.numel() - 1`` of stream ``key``
    (contiguous ``x`` and ``out`` of one dtype: float32, bfloat16 or float16; ``out`` may be
    ``x``), in one kernel: z is never written to memory."""
    return add_scaled_z(x, None, key, start, alpha, out)


def add_scaled_z(
    x: torch.Tensor, h: torch.Tensor | None, key: int, start: int, alpha: float, out: torch.Tensor
) -> torch.Tensor:
    """:func:`add_z` along HiZOO's ``z / sqrt(h)`` (``h``: contiguous float32 of ``x``'s shape),
    or along z when ``h`` is None."""
    numel = x.numel()
    g0, groups = zdef.group_range(start, numel)
    if numel:
        fma = x.dtype == torch.float32
        args = (out, x, x if h is None else h, key, start, numel, g0, alpha)
        with _on(out):
            _add_z_kernel[(groups,)](*args, FMA=fma, SCALED=h is not None, **_OPTIONS)
    return out


def hizoo_update(
    w: torch.Tensor,
    h: torch.Tensor,
    zkey: int,
    wkey: int,
    hkey: int,
    start: int,
    alpha: float,
    factor: float,
    coef: float,
    rate: float,
    w_mode: int,
    h_mode: int,
) -> torch.Tensor:
    """HiZOO's update of a contiguous chunk ``w`` (float32 or bfloat16) and its float32 H chunk
    ``h``, whose first element is element ``start`` of the block, in one kernel: the weights
    along ``u = z / sqrt(h)`` and then H's EMA at rate ``rate`` with the estimate
    ``|coef h (z^2 - 1)|`` (modes: see :func:`_hizoo_store`)."""
    numel = w.numel()
    g0, groups = zdef.group_range(start, numel)
    if numel:
        keep = 1.0 - rate
        halves = [v for x in (keep, rate) for v in divmod(_bits64(x), 1 << 32)]
        halves = [v - (1 << 32) if v >= 1 << 31 else v for v in halves]  # int32 arguments
        args = (w, h, zkey, wkey, hkey, start, numel, g0, alpha, factor, coef, keep, rate)
        with _on(w):
            _hizoo_kernel[(groups,)](*args, *halves, W=w_mode, H=h_mode, **_OPTIONS)
    return w


def update_bf16(
    w: torch.Tensor, zkey: int, rkey: int, start: int, alpha: float, factor: float, sr: bool
) -> torch.Tensor:
    """In-place update of a contiguous bfloat16 chunk ``w`` whose first element is element
    ``start`` of its block: ``w <- round(fma(z, alpha, float(w) * factor))`` (see
    :func:`_update_kernel`), in one kernel."""
    numel = w.numel()
    g0, groups = zdef.group_range(start, numel)
    if numel:
        args = (w, zkey, rkey, start, numel, g0, alpha, factor)
        with _on(w):
            _update_kernel[(groups,)](*args, SR=sr, **_OPTIONS)
    return w


#: rows x columns of w per program of _lowrank_kernel (with stochastic rounding a 32 x 128 tile
#: needs ~210 registers a thread on sm_90, which caps occupancy for a memory-bound kernel)
_LOWRANK_TILE = (16, 128)


def lowrank_update(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    rkey: int,
    start: int,
    alpha: float,
    factor: float,
    sr: bool,
) -> torch.Tensor:
    """In-place update of a contiguous bfloat16 (rows, cols) chunk ``w`` whose first element is
    element ``start`` of its block along ``a b^T`` (contiguous float32 (rows, r) and (cols, r)):
    ``w <- round(fma(a b^T, alpha, float(w) factor))`` (see :func:`_lowrank_kernel`), in one
    kernel."""
    rows, cols = w.shape
    if w.numel():
        bm, bn = _LOWRANK_TILE
        grid = (triton.cdiv(rows, bm), triton.cdiv(cols, bn))
        args = (w, a, b, rkey, start, rows, cols, alpha, factor)
        with _on(w):
            _lowrank_kernel[grid](*args, RANK=a.shape[1], SR=sr, BM=bm, BN=bn, **_OPTIONS)
    return w


def round_into(dest: torch.Tensor, x: torch.Tensor, key: int, start: int, complement: bool):
    """:func:`l2l.rounding.round_into` (stochastic) of a contiguous float32 ``x`` into a
    contiguous bfloat16 ``dest``, or float64 into float32, in one kernel."""
    flip = ((1 << 29) - 1 if dest.dtype == torch.float32 else 0xFFFF) if complement else 0
    return _flat_launch(_round_kernel, dest, x, key, start, flip)


def draw_at(key: int, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Elements ``index`` (contiguous int64) of stream ``key`` into ``out`` (float32, as many),
    in one kernel."""
    return _flat_launch(_at_kernel, out, index, key)


@triton.jit
def _bits_kernel(out_ptr, key, start, n, BLOCK: tl.constexpr):
    """``out[j]`` = SplitMix64 output ``start + j`` of stream ``key`` (int64 bits)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    h = _pair_bits(key, start + j)
    tl.store(out_ptr + j, h.to(tl.int64, bitcast=True), mask=j < n)


def bits(key: int, start: int, out: torch.Tensor) -> torch.Tensor:
    """SplitMix64 outputs ``start ..`` of stream ``key`` into ``out`` (contiguous int64)."""
    return _flat_launch(_bits_kernel, out, key, start)


# ---- block moments: the tuner's statistics of every block in two kernels ----------------------

_MOMENT_TILE, _MOMENT_ITERS, _COMBINE = 2048, 32, 1024
#: elements one program of :func:`_moments_kernel` reduces
MOMENT_SPAN = _MOMENT_TILE * _MOMENT_ITERS
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@triton.jit
def _moments_kernel(
    addr_ptr,
    numel_ptr,
    prog_block_ptr,
    prog_start_ptr,
    partial_ptr,
    DTYPE: tl.constexpr,
    TILE: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Program ``p``: the float64 sum and sum of squares of elements ``[s, s + TILE ITERS)`` of
    block ``prog_block[p]`` (``s = prog_start[p]``), whose data starts at address ``addr[b]``;
    a fixed reduction tree, so the same inputs give the same bits."""
    p = tl.program_id(0)
    b = tl.load(prog_block_ptr + p)
    start = tl.load(prog_start_ptr + p)
    n = tl.load(numel_ptr + b)
    base = tl.load(addr_ptr + b).to(tl.pointer_type(DTYPE))
    acc = tl.zeros((TILE,), tl.float64)
    acc2 = tl.zeros((TILE,), tl.float64)
    for it in range(ITERS):
        i = start + it * TILE + tl.arange(0, TILE).to(tl.int64)
        x = tl.load(base + i, mask=i < n, other=0.0).to(tl.float64)
        acc += x
        acc2 += x * x
    tl.store(partial_ptr + 2 * p, tl.sum(acc, axis=0))
    tl.store(partial_ptr + 2 * p + 1, tl.sum(acc2, axis=0))


@triton.jit
def _combine_kernel(
    partial_ptr,
    first_ptr,
    numel_ptr,
    row_ptr,
    out_ptr,
    total,
    ROUNDS: tl.constexpr,
    CH: tl.constexpr,
):
    """Program ``b``: the sums of block ``b``'s programs ``first[b] .. first[b + 1] - 1``, in a
    fixed order, as the block's float64 mean and population variance ``E[x^2] - E[x]^2``
    (floored at 0) in column ``row[b]`` of ``out`` (2, total)."""
    b = tl.program_id(0)
    t0 = tl.load(first_ptr + b)
    t1 = tl.load(first_ptr + b + 1)
    acc = tl.zeros((CH,), tl.float64)
    acc2 = tl.zeros((CH,), tl.float64)
    for k in range(ROUNDS):  # every block's programs, CH at a time (a constant per model)
        j = t0 + k * CH + tl.arange(0, CH).to(tl.int64)
        acc += tl.load(partial_ptr + 2 * j, mask=j < t1, other=0.0)
        acc2 += tl.load(partial_ptr + 2 * j + 1, mask=j < t1, other=0.0)
    n = tl.load(numel_ptr + b).to(tl.float64)
    mean = tl.sum(acc, axis=0) / n  # float64 division and sqrt are IEEE (div_rn is float32's)
    var = tl.sum(acc2, axis=0) / n - mean * mean
    row = tl.load(row_ptr + b)
    tl.store(out_ptr + row, mean)
    tl.store(out_ptr + total + row, tl.where(var < 0.0, 0.0, var))


class _Tables:
    """Per (device, blocks' addresses, sizes and dtypes): the launch tables of
    :func:`block_moments`, uploaded once (one host-to-device copy) and reused every step."""

    def __init__(self, size: int = 4) -> None:
        self._cache: dict[tuple, list] = {}
        self.size = size

    def get(self, flats: list[torch.Tensor], device: torch.device) -> list:
        key = (device, tuple((f.data_ptr(), f.numel(), f.dtype) for f in flats))
        tables = self._cache.get(key)
        if tables is None:
            tables = self._build(flats, device)
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tables
        return tables

    @staticmethod
    def _build(flats: list[torch.Tensor], device: torch.device) -> list:
        groups: dict[torch.dtype, list[int]] = {}
        for b, f in enumerate(flats):
            groups.setdefault(f.dtype, []).append(b)
        host, layout = [], []
        for dtype, rows in groups.items():
            progs = [-(-flats[b].numel() // MOMENT_SPAN) for b in rows]
            first = [0]
            for k in progs:
                first.append(first[-1] + k)
            block = [i for i, k in enumerate(progs) for _ in range(k)]
            start = [s * MOMENT_SPAN for k in progs for s in range(k)]
            parts = [
                [flats[b].data_ptr() for b in rows],
                [flats[b].numel() for b in rows],
                block,
                start,
                first,
                rows,
            ]
            offsets = []
            for part in parts:
                offsets.append((len(host), len(part)))
                host.extend(part)
            rounds = -(-max(progs, default=0) // _COMBINE)
            layout.append((dtype, first[-1], len(rows), rounds, offsets))
        table = torch.tensor(host, dtype=torch.int64).to(device)
        return [
            (dtype, programs, nrows, rounds, [table[o : o + n] for o, n in offsets])
            for dtype, programs, nrows, rounds, offsets in layout
        ]


_TABLES = _Tables()


def block_var_mean(flats: list[torch.Tensor]) -> torch.Tensor:
    """(2, B) float64: the mean (row 0) and variance (row 1) of each contiguous tensor of
    ``flats`` (one device; float32, bfloat16, float16 or float64), in two kernels per dtype:
    programs that sum ``MOMENT_SPAN`` elements and their squares, then one fixed-order sum per
    block. Deterministic: the same weights give the same bits."""
    device = flats[0].device
    out = torch.empty(2, len(flats), dtype=torch.float64, device=device)  # all written
    with _on(out):
        for dtype, programs, nrows, rounds, tables in _TABLES.get(flats, device):
            addr, numel, block, start, first, rows = tables
            partial = torch.empty(max(programs, 1), 2, dtype=torch.float64, device=device)
            if programs:
                _moments_kernel[(programs,)](
                    addr,
                    numel,
                    block,
                    start,
                    partial,
                    DTYPE=_TL_DTYPES[dtype],
                    TILE=_MOMENT_TILE,
                    ITERS=_MOMENT_ITERS,
                    **_OPTIONS,
                )
            args = (partial, first, numel, rows, out, len(flats))
            _combine_kernel[(nrows,)](*args, ROUNDS=rounds, CH=_COMBINE, **_OPTIONS)
    return out


# ---- the tuner: features and every block's MLP in one kernel ---------------------------------


@triton.jit
def _asinh64(t):
    a = tl.abs(t)
    r = tl.log(a + tl.sqrt(a * a + 1.0))
    return tl.where(t < 0, -r, r)


@triton.jit
def _tuner_kernel(
    mean_ptr,
    var_ptr,
    prev_ptr,
    lp,
    lm,
    scale_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    out_ptr,
    floor,
    H: tl.constexpr,
    ASINH: tl.constexpr,
):
    """Program ``b``: block ``b``'s features ``[mean, var, L+ prev, L- prev, sigma prev]``
    (float32, as :func:`l2l.scales.block_features` makes them), scaled as
    :func:`l2l.scales.scale_features` does (the quotient in float32, asinh in float64), through
    ``Linear(5, H) -> tanh -> Linear(H, 1)`` in float64 and ``sigma = max(|out|, floor)`` stored
    as float32: :meth:`l2l.tuner.model.Tuner.forward` to float32 rounding."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, 8)
    x = tl.where(i == 0, tl.load(mean_ptr + b).to(tl.float32), 0.0)
    x = tl.where(i == 1, tl.load(var_ptr + b).to(tl.float32), x)
    x = tl.where(i == 2, lp, x)
    x = tl.where(i == 3, lm, x)
    x = tl.where(i == 4, tl.load(prev_ptr + b), x)
    x64 = x.to(tl.float64)
    if ASINH:
        s = tl.load(scale_ptr + i, mask=i < 5, other=1.0)
        x64 = _asinh64(tl.div_rn(x, s).to(tl.float64))
    h = tl.arange(0, H)
    w1 = tl.load(w1_ptr + b * H * 5 + h[:, None] * 5 + i[None, :], mask=i[None, :] < 5, other=0.0)
    pre = tl.sum(w1.to(tl.float64) * x64[None, :], axis=1) + tl.load(b1_ptr + b * H + h)
    hidden = 1.0 - 2.0 / (tl.exp(2.0 * pre) + 1.0)  # tanh
    out = tl.sum(tl.load(w2_ptr + b * H + h).to(tl.float64) * hidden, axis=0)
    out = tl.abs(out + tl.load(b2_ptr + b))
    tl.store(out_ptr + b, tl.where(out < floor, floor, out).to(tl.float32))


def tuner_sigma(mean, var, prev, lp: float, lm: float, scales, w1, b1, w2, b2, floor: float):
    """(B,) float32 sigma of a tuner with weights ``w1`` (B, H, 5), ``b1`` (B, H), ``w2``
    (B, H), ``b2`` (B,) (contiguous float32, H a power of two) from the blocks' float64 ``mean``
    and ``var``, their previous float32 sigma ``prev`` and the previous losses, in one kernel;
    ``scales`` (5,) float32 for asinh feature scaling, None for raw features."""
    n, hidden = w1.shape[0], w1.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=w1.device)
    asinh = scales is not None
    args = (mean, var, prev, lp, lm, scales if asinh else w1, w1, b1, w2, b2, out, floor)
    with _on(out):
        _tuner_kernel[(n,)](*args, H=hidden, ASINH=asinh, **_OPTIONS)
    return out
