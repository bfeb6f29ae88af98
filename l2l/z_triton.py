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

import torch
import triton
import triton.language as tl

from l2l import z_spec as zdef

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
    """Program ``j``: group ``first_group + j``, i.e. elements ``2 G g + q`` and ``2 G g + G + q``
    of the stream, stored at ``out_ptr[element - start]`` when inside ``[start, start + numel)``."""
    g = first_group + tl.program_id(0).to(tl.int64)
    q = tl.arange(0, _G).to(tl.int64)
    out0, out1 = _box_muller(_pair_bits(key, g * _G + q))
    first = 2 * _G * g + q - start
    tl.store(out_ptr + first, out0, mask=(first >= 0) & (first < numel))
    second = first + _G
    tl.store(out_ptr + second, out1, mask=(second >= 0) & (second < numel))


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
def _add_z_kernel(out_ptr, x_ptr, key, start, numel, first_group, alpha, FMA: tl.constexpr):
    """``out = x + alpha z`` over elements ``[start, start + numel)`` of the stream, the groups of
    :func:`_draw_kernel`: float32 ``x`` as one FMA (torch's ``add(x, z, alpha=alpha)``), half
    precision ``x`` as ``z alpha + float(x)`` rounded twice, then to ``out``'s dtype (torch's
    ``z.mul(alpha).add_(x.float()).to(x.dtype)``)."""
    g = first_group + tl.program_id(0).to(tl.int64)
    q = tl.arange(0, _G).to(tl.int64)
    out0, out1 = _box_muller(_pair_bits(key, g * _G + q))
    first = 2 * _G * g + q - start
    _add_store(out_ptr, x_ptr, first, numel, out0, alpha, FMA)
    _add_store(out_ptr, x_ptr, first + _G, numel, out1, alpha, FMA)


@triton.jit
def _add_store(out_ptr, x_ptr, pos, numel, z, alpha, FMA: tl.constexpr):
    mask = (pos >= 0) & (pos < numel)
    x = tl.load(x_ptr + pos, mask=mask, other=0.0)
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
def _update_store(w_ptr, rkey, element, start, numel, z, alpha, factor, SR: tl.constexpr):
    pos = element - start
    mask = (pos >= 0) & (pos < numel)
    x = tl.load(w_ptr + pos, mask=mask, other=0.0).to(tl.float32) * factor
    x = tl.fma(z, alpha, x)
    if SR:
        word = _pair_bits(rkey, element >> 1)
        word = tl.where((element & 1) == 1, word >> 32, word & 0xFFFFFFFF)
        r = word.to(tl.uint32).to(tl.int32, bitcast=True) & 0xFFFF
        m = x.to(tl.int32, bitcast=True)
        sign = m & _SIGN
        m = m ^ sign
        m = tl.where(m > 0x7F800000, 0x7FC00000, m)  # NaN -> the quiet NaN
        m = ((m + r) & -65536) | sign  # drop the low 16 bits after adding random ones
        x = m.to(tl.float32, bitcast=True)  # a bfloat16 value (or inf): converts exactly
    tl.store(w_ptr + pos, x.to(tl.bfloat16), mask=mask)


_AT_BLOCK = 1024


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


def add_z(x: torch.Tensor, key: int, start: int, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """``out = x + alpha z`` for elements ``start .. start + x.numel() - 1`` of stream ``key``
    (contiguous ``x`` and ``out`` of one dtype: float32, bfloat16 or float16; ``out`` may be
    ``x``), in one kernel: z is never written to memory."""
    numel = x.numel()
    g0, groups = zdef.group_range(start, numel)
    if numel:
        fma = x.dtype == torch.float32
        with _on(out):
            _add_z_kernel[(groups,)](out, x, key, start, numel, g0, alpha, FMA=fma, **_OPTIONS)
    return out


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
