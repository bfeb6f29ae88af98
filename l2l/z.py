"""The random direction z: a pure function of (step seed, block, element), at the root of ``l2l``.

Element ``i`` (row-major position) of block ``b``'s direction at step seed ``s`` is::

    key = mix_seed(s, b)
    g, c, q = i // 2G, (i // G) % 2, i % G      # G = GROUP = 1024
    z[i] = box_muller(splitmix64(key, G g + q))[c]

Pair ``k`` of the stream gets 64 random bits ``h``, output ``k`` of SplitMix64 seeded with
``key`` (Steele, Lea & Flood 2014): ``mix64(key + (k + 1) GAMMA)``. Box-Muller turns them into two
independent N(0, 1): the low 30 bits give the radius ``sqrt(-2 ln u)``, ``u`` in ``(0, 1]``, the
high 32 bits an angle in ``[0, pi/2)``, bits 31 and 30 the two signs (independent reflections make
the angle uniform on the circle). Nothing is stored: the forward passes and the update regenerate
the same numbers, and since element ``i`` depends on ``i`` alone and on no chunking, a block can
be drawn in any pieces.

The same bits on every device: the integer part is int64 arithmetic (which wraps; right shifts are
made logical by masking); the float part uses only float32 operations that IEEE 754 rounds
correctly, ``+ - * /``, each its own torch op (no device can fuse two into an FMA), no
division by a scalar (CUDA turns it into a multiplication by the reciprocal), and constants exact
in float32. ``ln`` and ``sin``/``cos`` are fixed polynomials (their approximation error below
float32's half-ulp) evaluated with those ops, the logarithm's exponent and mantissa read from the
float's bits, and ``sqrt`` is three Newton steps: library transcendentals differ in the last bit
between CPU and CUDA, and torch's CPU ``sqrt`` is not even correctly rounded.
:mod:`l2l.z_reference` computes the same numbers one element at a time; the tests compare the two
bit-for-bit.

On CUDA, when Triton is installed, a draw is one kernel (:mod:`l2l.z_triton`, the same
operations in registers; :data:`KERNEL_DEVICES`), with these torch ops as its reference.

Of ``l2l`` this module imports only :mod:`l2l.z_spec` (and the kernels when a draw needs
them); blocks, shards, the perturber and the methods import it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

# the generator's constants, shared with the kernels
from l2l.z_spec import (
    COS_POLY,
    GAMMA,
    GROUP,
    LOG_BIAS,
    LOG_POLY,
    MIX1,
    MIX2,
    PHI_SCALE,
    SEED_SHIFTS,
    SIN_POLY,
    SQRT_GUESS,
    SQRT_HALF_BITS,
    TWO_LN2,
    group_range,
)

#: Name of the generator defined here; trajectories record it (a different name, different z).
GENERATOR = "l2l-splitmix64-boxmuller-v1"

#: Largest number of elements of one direction chunk on the CPU (16 MiB in float32): z stays
#: in cache-sized pieces and a step's transient memory small. Only how much of z is alive at
#: once: z's values do not depend on it.
CHUNK_ELEMENTS = 1 << 22
#: The same on accelerators: a weight is drawn, perturbed and multiplied whole (one z draw, one
#: copy and one GEMM per weight, not one per 4M-element chunk), up to this size (1 GiB of float32;
#: an LM head of 128k x 2048 is one chunk).
ACCELERATOR_CHUNK_ELEMENTS = 1 << 28
#: Device types that take the accelerator chunking besides every non-CPU device;
#: ``benchmarks/step_ops.py --policy device`` adds ``"cpu"`` to count a GPU step's ops on a CPU.
ACCELERATOR_POLICY: set[str] = set()


def accelerated(device: torch.device | str | None) -> bool:
    """Whether ``device`` takes the accelerator policy (whole weights; None: the CPU's)."""
    if device is None:
        return False
    kind = torch.device(device).type
    return kind != "cpu" or kind in ACCELERATOR_POLICY


_CPU_CUT = [0]  # > 0 inside cpu_cut(): every device cut as the CPU is


def chunk_elements(device: torch.device | str | None = None) -> int:
    """Elements of one direction chunk on ``device`` (None: the CPU's)."""
    if accelerated(device) and not _CPU_CUT[0]:
        return ACCELERATOR_CHUNK_ELEMENTS
    return CHUNK_ELEMENTS


@contextlib.contextmanager
def cpu_cut():
    """Within it, blocks on every device are cut into the CPU's chunks (:data:`CHUNK_ELEMENTS`).

    For the torch-op reference of a fused kernel on an accelerator that has no kernels: over a
    whole weight its elementwise temporaries are each the weight's size, where the kernel has
    none. The values do not change: z, the rounding bits and every position are those of the
    elements, not of the cut."""
    _CPU_CUT[0] += 1
    try:
        yield
    finally:
        _CPU_CUT[0] -= 1


def reference_only(device: torch.device) -> bool:
    """Whether ``device`` takes the accelerator's whole-weight cut without its fused kernels (a
    GPU without Triton, another accelerator); not the CPU, nor a device of
    :data:`ACCELERATOR_POLICY`, where the reference ops stand in for the kernels that they
    count."""
    return (
        device.type != "cpu" and device.type not in ACCELERATOR_POLICY and _kernels(device) is None
    )


#: Device types whose draws run as one Triton kernel each (:mod:`l2l.z_triton`) when Triton
#: imports; elsewhere, and without Triton, the torch ops below. The tests add ``"cpu"`` with
#: ``TRITON_INTERPRET=1`` to compare the kernels with the torch ops.
KERNEL_DEVICES: set[str] = {"cuda"}
_KERNELS: list = []  # [module or None] once the import was tried


def _kernels(device: torch.device):
    """:mod:`l2l.z_triton` when ``device`` takes the kernels and Triton imports, else None."""
    if device.type not in KERNEL_DEVICES:
        return None
    if not _KERNELS:
        try:
            from l2l import z_triton
        except Exception:  # noqa: BLE001 - no Triton, or one that does not import: the torch ops
            z_triton = None
        _KERNELS.append(z_triton)
    return _KERNELS[0]


#: kernels that failed in this process: their torch ops run instead
FAILED_KERNELS: set[str] = set()


def run_kernel(kernels, name: str, *args):
    """``kernels.<name>(*args)``; None when that kernel fails (Triton cannot compile it for
    this GPU, no ``ptxas``, ...) or failed before, after turning it off for the process with a
    warning: the caller then runs its torch ops (the same bits; the tuner's statistics and MLP
    to rounding). Running out of memory is not a kernel failure: it propagates."""
    if name in FAILED_KERNELS:
        return None
    try:
        return getattr(kernels, name)(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the optional kernels
        FAILED_KERNELS.add(name)
        warnings.warn(
            f"l2l's Triton kernel {name!r} failed ({type(err).__name__}: {err}); its torch ops "
            "run from now on (the same results, more kernel launches)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


_MASK64 = (1 << 64) - 1


_SIGN = -(1 << 31)  # int32 with only the sign bit set


def _signed64(v: int) -> int:
    """``v`` mod 2^64 as the int64 with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def mix_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser over the sequence)."""
    h = GAMMA
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * MIX1 & _MASK64
        h = (h ^ (h >> SEED_SHIFTS[0])) * MIX2 & _MASK64
        h ^= h >> SEED_SHIFTS[1]
    return h >> 1


def z_key(step_seed: int, block: int) -> int:
    """The SplitMix64 key of block ``block``'s direction at ``step_seed``. Other random streams of
    a step (e.g. rounding bits) use ``mix_seed(step_seed, block, stream)`` with their own
    ``stream`` so that they never reuse z's bits."""
    return mix_seed(step_seed, block)


def row_chunks(
    shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None
) -> list[tuple[int, int]]:
    """Row ranges ``[(r0, r1), ...]`` cutting a tensor of ``shape`` on ``device`` along dim 0
    (chunks of at most :func:`chunk_elements` elements, or one row)."""
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    step = max(1, chunk_elements(device) // _per_row(shape))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def _per_row(shape: torch.Size | tuple[int, ...]) -> int:
    return max(1, int(torch.Size(shape[1:]).numel()))


def chunk_view(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t if t.ndim == 0 else t[r0:r1]


# ---- the generator in torch ops -------------------------------------------------------------
#: Pairs per pass (a multiple of GROUP): on CPU small enough that the intermediate buffers stay in
#: cache (~7 MiB), elsewhere 2^21 elements a pass (~60 ops each; ~60 MiB): a whole-weight chunk
#: of an accelerator takes numel / 2^21 passes.
CPU_PAIRS = 1 << 17
DEVICE_PAIRS = 1 << 20

_GAMMA = _signed64(GAMMA)


class _Workspace:
    """One device's buffers for the generator's intermediate values, ``pairs`` pairs a pass, and
    its constants as 0-dim tensors of the device (a Python scalar costs a conversion per op)."""

    def __init__(self, device: torch.device) -> None:
        self.pairs = n = CPU_PAIRS if device.type == "cpu" else DEVICE_PAIRS
        with torch.inference_mode(False):  # reusable in and outside inference mode
            i64 = dict(dtype=torch.int64, device=device)
            self.steps = torch.arange(n, **i64).mul_(_GAMMA)  # k GAMMA, wrapping
            self.h, self.tmp = torch.empty(n, **i64), torch.empty(n, **i64)
            self.signs = torch.empty(n // GROUP, 2, GROUP, dtype=torch.int32, device=device)
            self.f = torch.empty(5, n, dtype=torch.float32, device=device)
            self.i = torch.empty(2, n, dtype=torch.int32, device=device)

            def const(value, dtype):
                return torch.tensor(value, dtype=dtype, device=device)

            self.mix = [  # (shift, mask making it logical, multiplier)
                (shift, const((1 << (64 - shift)) - 1, torch.int64), mult)
                for shift, mult in (
                    (30, const(_signed64(MIX1), torch.int64)),
                    (27, const(_signed64(MIX2), torch.int64)),
                    (31, None),
                )
            ]
            ints = (_SIGN, 0x3FFFFFFF, 0x7FFFFF, 0x0FFFFFFF, LOG_BIAS, SQRT_HALF_BITS, SQRT_GUESS)
            self.i32 = {v: const(v, torch.int32) for v in ints}
            floats = (1.0, 2.0, 0.5, TWO_LN2, PHI_SCALE, *LOG_POLY, *SIN_POLY, *COS_POLY)
            self.f32 = {v: const(v, torch.float32) for v in floats}


class _PerDevice:
    """One lazily built object per device (workspaces, scratch buffers)."""

    def __init__(self, build) -> None:
        self._build = build
        self._by_device: dict[torch.device, object] = {}

    def get(self, device: torch.device):
        obj = self._by_device.get(device)
        if obj is None:
            obj = self._by_device[device] = self._build(device)
        return obj


def _scratch(device: torch.device) -> torch.Tensor:
    # spare room: a range that starts or ends inside a group is drawn as whole groups
    with torch.inference_mode(False):
        return torch.empty(CHUNK_ELEMENTS + 4 * GROUP, dtype=torch.float32, device=device)


_WORKSPACES = _PerDevice(_Workspace)
#: One reusable float32 buffer per device for transient z chunks: a fresh 16 MiB allocation per
#: chunk costs page faults on every draw.
_SCRATCH = _PerDevice(_scratch)


def _mix64_(ws: _Workspace, h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64's mix64 in place on int64 ``h`` (``tmp``: a buffer of its shape)."""
    for shift, mask, mult in ws.mix:
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=tmp).bitwise_and_(mask))
        if mult is not None:
            h.mul_(mult)
    return h


def _horner(ws: _Workspace, x: torch.Tensor, coeffs, out: torch.Tensor) -> torch.Tensor:
    """``c0 + x (c1 + x (c2 + ...))`` into ``out``, one rounding per op."""
    c = [ws.f32[v] for v in coeffs]
    torch.mul(x, c[-1], out=out)
    for ck in reversed(c[1:-1]):
        out.add_(ck).mul_(x)
    return out.add_(c[0])


def _sqrt(ws: _Workspace, q: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """sqrt of ``q >= 0`` (float32, within an ulp) by Newton's iteration ``y <- (y + q / y) / 2``
    from the exponent-halving guess (relative error <= 3.6%, so three steps reach float32's
    precision). torch's CPU ``sqrt`` is not correctly rounded, so it is not used; ``bits``,
    ``tmp``: int32 and float32 buffers of ``q``'s shape."""
    y = torch.bitwise_right_shift(q.view(torch.int32), 1, out=bits).add_(ws.i32[SQRT_GUESS])
    y = y.view(torch.float32)
    for _ in range(3):
        y.add_(torch.div(q, y, out=tmp)).mul_(ws.f32[0.5])
    return y


def _box_muller(ws: _Workspace, n: int, out: torch.Tensor) -> None:
    """The pairs of ``ws.h[:n]`` (mixed bits) into ``out`` (n / GROUP, 2, GROUP)."""
    g = n // GROUP
    signs = ws.signs[:g]
    _box_muller_into(ws, ws.h[:n].view(g, GROUP), out[:, 0], out[:, 1], signs[:, 0], signs[:, 1])


def _box_muller_into(ws: _Workspace, h, out0, out1, sign0, sign1) -> None:
    """Box-Muller of the mixed bits ``h`` (int64, any shape) into ``out0``/``out1`` (float32 of
    ``h``'s shape: the pair's first and second output); ``sign0``/``sign1``: int32 buffers of
    that shape. Elementwise, so every layout of the pairs gives the same bits."""
    shape, n = h.shape, h.numel()
    c, k = ws.i32, ws.f32
    f = [ws.f[j, :n].view(shape) for j in range(5)]
    i = [ws.i[j, :n].view(shape) for j in range(2)]
    tmp = ws.tmp[:n].view(shape)
    low = i[0].copy_(h)  # int64 -> int32 keeps the low 32 bits
    # bits 31 and 30 of the low word: signs of z[2Gg + q], z[2Gg + G + q]
    torch.bitwise_and(low, c[_SIGN], out=sign0)
    torch.bitwise_left_shift(low, 1, out=sign1).bitwise_and_(c[_SIGN])
    # angle pi/4 + phi in [0, pi/2), phi from the high word (signed)
    high = i[1].copy_(torch.bitwise_right_shift(h, 32, out=tmp))
    phi = f[4].copy_(high).mul_(k[PHI_SCALE])
    # radius sqrt(-2 ln u), u = v / 2^30, v = (low 30 bits of the low word) + 1 in [1, 2^30]
    v = f[0].copy_(low.bitwise_and_(c[0x3FFFFFFF])).add_(k[1.0])
    ix = torch.sub(v.view(torch.int32), c[LOG_BIAS], out=i[0])  # v = 2^e m, ix >> 23 = e + 1
    m = torch.bitwise_and(ix, c[0x7FFFFF], out=i[1]).add_(c[SQRT_HALF_BITS])
    # 30 - e = (0x0FFFFFFF - ix) >> 23, and 0 <= ix < 2^28 makes the subtraction an xor
    q = f[1].copy_(ix.bitwise_xor_(c[0x0FFFFFFF]).bitwise_right_shift_(23)).mul_(k[TWO_LN2])
    t = torch.sub(m.view(torch.float32), k[1.0], out=f[2])  # m - 1, exact (Sterbenz)
    s = torch.div(t, torch.add(t, k[2.0], out=f[3]), out=f[3])  # (m - 1) / (m + 1)
    two_ln_m = _horner(ws, torch.mul(s, s, out=f[2]), LOG_POLY, f[0]).mul_(s)
    r = _sqrt(ws, q.sub_(two_ln_m), i[1], f[2])  # -2 ln u = 2 ln 2 (30 - e) - 2 ln m
    # (cos, sin)(pi/4 + phi) = (C - S, C + S) with S, C those of phi / sqrt(2)
    p = torch.mul(phi, phi, out=f[2])
    sin = _horner(ws, p, SIN_POLY, f[3]).mul_(phi)
    cos = _horner(ws, p, COS_POLY, f[0])
    torch.mul(torch.sub(cos, sin, out=f[4]), r, out=out0)
    torch.mul(cos.add_(sin), r, out=out1)
    # independent reflections: uniform on the circle
    out0.view(torch.int32).bitwise_xor_(sign0)
    out1.view(torch.int32).bitwise_xor_(sign1)


def _draw_groups(key: int, g0: int, out: torch.Tensor) -> None:
    """Groups ``g0, g0 + 1, ...`` of stream ``key`` into ``out`` (groups, 2, GROUP)."""
    ws = _WORKSPACES.get(out.device)
    per_pass = ws.pairs // GROUP
    for a in range(0, out.shape[0], per_pass):
        g = min(per_pass, out.shape[0] - a)
        n = g * GROUP
        # state of pair k: key + (k + 1) GAMMA
        first = (g0 + a) * GROUP
        torch.add(ws.steps[:n], _signed64(key + (first + 1) * GAMMA), out=ws.h[:n])
        _mix64_(ws, ws.h[:n], ws.tmp[:n])
        _box_muller(ws, n, out[a : a + g])


class _Recent:
    """The last small draws (at most ``SMALL`` elements each, ``BUDGET`` in all, per process).

    A step draws each block's z three times (two forwards and the update), and for a small
    block (a norm's weight, a bias) the generator's fixed cost per op dominates: a repeat is a
    copy. z is a pure function of its key, so a remembered draw is never stale.
    """

    SMALL, BUDGET = 1 << 14, 1 << 22

    def __init__(self) -> None:
        self._draws: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._elements = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        hit = self._draws.get(key)
        if hit is not None:
            self._draws.move_to_end(key)
        return hit

    def put(self, key: tuple, values: torch.Tensor) -> None:
        self._draws[key] = values
        self._elements += values.numel()
        while self._elements > self.BUDGET:
            self._elements -= self._draws.popitem(last=False)[1].numel()


_RECENT = _Recent()


def _draw(key: int, start: int, numel: int, device: torch.device, flat: torch.Tensor | None):
    """Elements ``start .. start + numel - 1`` of stream ``key`` (flat, float32), written into
    ``flat`` (room for the whole groups they span) when given."""
    kernels = _kernels(device)
    if kernels is not None:  # one kernel, exactly the elements asked for
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=torch.float32, device=device)
        done = run_kernel(kernels, "draw", key, start, flat[:numel])
        if done is not None:
            return done
    span = 2 * GROUP  # elements of one group
    g0, groups = group_range(start, numel)
    if flat is None or flat.numel() < groups * span:
        flat = torch.empty(groups * span, dtype=torch.float32, device=device)
    _draw_groups(key, g0, flat[: groups * span].view(groups, 2, GROUP))
    return flat[start - g0 * span :][:numel]


def gaussian(
    step_seed: int,
    block: int,
    start: int,
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str,
    transient: bool = False,
) -> torch.Tensor:
    """Elements ``start, start + 1, ...`` of block ``block``'s z as a float32 tensor of ``shape``.

    ``transient``: write into the device's scratch buffer (``CHUNK_ELEMENTS``; a larger draw, an
    accelerator's whole weight, allocates its own). The result is then
    overwritten by the next transient draw, so use it at once and never keep it (no autograd).
    """
    device = torch.device(device)
    numel = torch.Size(shape).numel()
    key = z_key(step_seed, block)
    scratch = _SCRATCH.get(device) if transient else None
    with torch.profiler.record_function("l2l::z"):
        if numel > _Recent.SMALL:
            return _draw(key, start, numel, device, scratch).view(shape)
        recent = _RECENT.get((device, key, start, numel))
        if recent is None:
            recent = _draw(key, start, numel, device, None).clone()
            _RECENT.put((device, key, start, numel), recent)
        out = recent.clone() if scratch is None else scratch[:numel].copy_(recent)
        return out.view(shape)


def gaussian_many(
    step_seed: int,
    requests: list[tuple[int, int, tuple[int, ...]]],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Several blocks' z in one draw: for each ``(block, start, shape)`` of ``requests``, elements
    ``start, start + 1, ...`` of block ``block``'s z at ``step_seed`` as float32 of ``shape``, the
    bits of :func:`gaussian`. The results are views of one new buffer. Where the kernels run it is
    one kernel for all of them (e.g. LOZO's U of every matrix, a few thousand numbers each, that
    are otherwise a launch each); elsewhere one draw per request. Profiled as one ``l2l::z``."""
    device = torch.device(device)
    sizes = [torch.Size(shape).numel() for _, _, shape in requests]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    with torch.profiler.record_function("l2l::z"):
        kernels = _kernels(device)
        segments = [(block, start, n) for (block, start, _), n in zip(requests, sizes, strict=True)]
        done = None
        if kernels is not None and flat.numel() and 0 <= step_seed < 1 << 63:
            done = run_kernel(kernels, "draw_many", step_seed, segments, flat)
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        if done is None:
            for (block, start, n), o in zip(segments, offsets, strict=False):
                if n:
                    flat[o : o + n].copy_(_draw(z_key(step_seed, block), start, n, device, None))
    return [flat[o : o + n].view(r[2]) for r, o, n in zip(requests, offsets, sizes, strict=False)]


def add_z(
    x: torch.Tensor,
    step_seed: int,
    block: int,
    start: int,
    alpha: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + alpha * z``, z being elements ``start .. start + x.numel() - 1`` of block ``block``'s
    direction (``x``'s shape), computed in float32 and returned in ``x``'s dtype: a perturbed
    copy of a weight chunk, or with ``out=x`` an in-place update.

    float32 ``x``: ``torch.add(x, z, alpha=alpha)`` (one FMA per element on the CPU and on CUDA);
    half precision: ``z.mul(alpha).add_(x.float()).to(x.dtype)``. Where the kernels run
    (:data:`KERNEL_DEVICES`) it is one kernel that never writes z; elsewhere a transient draw and
    those ops, the kernel's reference. Profiled as ``record_function("l2l::add_z")``.
    """
    return _add(x, None, None, step_seed, block, start, alpha, out)


def add_scaled_z(
    x: torch.Tensor,
    h: torch.Tensor,
    root: Callable[[torch.Tensor], torch.Tensor],
    step_seed: int,
    block: int,
    start: int,
    alpha: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`add_z` along ``z / sqrt(h)`` (HiZOO's direction; ``h`` float32 of ``x``'s shape):
    the reference ops divide the draw by ``root(h)``, a correctly rounded square root (the
    kernel's ``sqrt_rn``, which CUDA's ``torch.sqrt`` also is)."""
    return _add(x, h, root, step_seed, block, start, alpha, out)


def _add(x, h, root, step_seed: int, block: int, start: int, alpha: float, out):
    kernels = _kernels(x.device)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with torch.profiler.record_function("l2l::add_z"):
        fused = kernels is not None and x.dtype in _FUSED_DTYPES and out.dtype == x.dtype
        fused = fused and x.is_contiguous() and out.is_contiguous()
        if h is not None:
            fused = fused and h.dtype == torch.float32 and h.is_contiguous()
        if fused:
            key = z_key(step_seed, block)
            done = (
                run_kernel(kernels, "add_z", x, key, start, alpha, out)
                if h is None
                else run_kernel(kernels, "add_scaled_z", x, h, key, start, alpha, out)
            )
            if done is not None:
                return done
        n = x.numel()
        whole = n <= CHUNK_ELEMENTS or not (x.is_contiguous() and out.is_contiguous())
        if whole or (h is not None and not h.is_contiguous()):
            return _add_reference(x, h, root, step_seed, block, start, alpha, out)
        # a whole weight of an accelerator without kernels: the reference in the CPU's chunks
        # (its temporaries a chunk's size, not the weight's; the elements' values the same)
        xs, outs, hs = x.view(-1), out.view(-1), None if h is None else h.view(-1)
        for i in range(0, n, CHUNK_ELEMENTS):
            j = min(i + CHUNK_ELEMENTS, n)
            part = None if hs is None else hs[i:j]
            _add_reference(xs[i:j], part, root, step_seed, block, start + i, alpha, outs[i:j])
        return out


def _add_reference(x, h, root, step_seed: int, block: int, start: int, alpha: float, out):
    """The torch ops of the draw-and-add kernels (:func:`add_z`, :func:`add_scaled_z`)."""
    z = gaussian(step_seed, block, start, x.shape, x.device, transient=True)
    if h is not None:
        z = z.div_(root(h))
    if x.dtype in (torch.float32, torch.float64):
        return torch.add(x, z, alpha=alpha, out=out)
    return out.copy_(z.mul_(alpha).add_(x.float()))


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gaussian_at(step_seed: int, block: int, index: torch.Tensor) -> torch.Tensor:
    """Elements ``index`` (an int64 tensor of positions in the block) of block ``block``'s z, as
    float32 of ``index``'s shape on its device: the same bits as :func:`gaussian` gives at those
    positions, computed for those elements only, with no host synchronisation (e.g. the rows of
    an embedding that a batch looks up)."""
    key, device = z_key(step_seed, block), index.device
    flat = index.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float32, device=device)
    kernels = _kernels(device)
    if kernels is not None:
        with torch.profiler.record_function("l2l::z"):
            done = run_kernel(kernels, "draw_at", key, flat.to(torch.int64).contiguous(), out)
        if done is not None:
            return out.view(index.shape)
    ws = _WORKSPACES.get(device)
    base = _signed64(key + GAMMA)  # pair k's state: k GAMMA + key + GAMMA
    with torch.profiler.record_function("l2l::z"):
        for a in range(0, flat.numel(), ws.pairs):
            n = min(ws.pairs, flat.numel() - a)
            idx, h, tmp = flat[a : a + n], ws.h[:n], ws.tmp[:n]
            # element i is output (i >> 10) & 1 of pair ((i >> 11) << 10) | (i & 1023)
            torch.bitwise_right_shift(idx, 11, out=h).bitwise_left_shift_(10)
            h.bitwise_or_(torch.bitwise_and(idx, GROUP - 1, out=tmp)).mul_(_GAMMA).add_(base)
            _mix64_(ws, h, tmp)
            signs = ws.signs.view(-1)
            second = torch.empty(n, dtype=torch.float32, device=device)
            first = out[a : a + n]
            _box_muller_into(ws, h, first, second, signs[:n], signs[n : 2 * n])
            which = torch.bitwise_right_shift(idx, 10, out=tmp).bitwise_and_(1).bool()
            torch.where(which, second, first, out=first)
    return out.view(index.shape)


def counter_bits(
    key: int, start: int, numel: int, device: torch.device | str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """SplitMix64 outputs ``start .. start + numel - 1`` of stream ``key``: int64, 64 uniform
    bits each, the same on every device (``out``: a contiguous int64 tensor of ``numel``
    elements to fill). Viewed as int32, word ``2 j`` is the low half of output ``j``.
    """
    device = torch.device(device)
    with torch.profiler.record_function("l2l::bits"):
        if out is None:
            out = torch.empty(numel, dtype=torch.int64, device=device)
        kernels = _kernels(device)
        done = None if kernels is None else run_kernel(kernels, "bits", key, start, out.view(-1))
        if done is not None:
            return out
        ws, flat = _WORKSPACES.get(device), out.view(-1)
        for a in range(0, numel, ws.pairs):
            n = min(ws.pairs, numel - a)
            h = torch.add(
                ws.steps[:n], _signed64(key + (start + a + 1) * GAMMA), out=flat[a : a + n]
            )
            _mix64_(ws, h, ws.tmp[:n])
        return out


def chunk_start(
    shape: tuple[int, ...] | torch.Size, chunk: int, device: torch.device | str | None = None
) -> int:
    """Position of the first element of row chunk ``chunk`` in a block on ``device`` whose rows
    have ``shape[1:]`` (the cut of :func:`row_chunks`)."""
    if len(shape) == 0:
        return 0
    per_row = _per_row(shape)
    return chunk * max(1, chunk_elements(device) // per_row) * per_row


def gaussian_chunk(
    step_seed: int,
    block: int,
    chunk: int,
    shape: tuple[int, ...],
    device: torch.device,
    transient: bool = False,
    start: int | None = None,
) -> torch.Tensor:
    """z for row chunk ``chunk`` of a block: float32 of ``shape``, the chunk's own shape.

    The chunk begins at element ``start``; by default where :func:`row_chunks` puts chunk
    ``chunk`` of a block whose rows have ``shape[1:]``. ``transient`` as in :func:`gaussian`.
    """
    start = chunk_start(shape, chunk, device) if start is None else start
    return gaussian(step_seed, block, start, shape, device, transient)


def chunk_shape(param: torch.Tensor, r0: int, r1: int) -> tuple[int, ...]:
    return tuple(param.shape) if param.ndim == 0 else (r1 - r0, *param.shape[1:])


def param_chunk_z(
    step_seed: int, block: int, chunk: int, param: torch.Tensor, transient: bool = False
) -> torch.Tensor:
    """z for chunk ``chunk`` of block ``block`` (whose tensor is ``param``); ``transient`` as in
    :func:`gaussian`."""
    r0, r1 = row_chunks(param.shape, param.device)[chunk]
    start = r0 * _per_row(param.shape)
    return gaussian(step_seed, block, start, chunk_shape(param, r0, r1), param.device, transient)


def gaussian_block(step_seed: int, block: int, param: torch.Tensor) -> torch.Tensor:
    """The whole z of one block (a new tensor of ``param``'s shape). Used by reference code."""
    return gaussian(step_seed, block, 0, tuple(param.shape), param.device)
