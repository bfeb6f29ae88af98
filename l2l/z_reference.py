"""Plain reference for :mod:`l2l.z`: the same numbers one element at a time.

The integer part in Python ints from SplitMix64's definition, the float part in NumPy float32
scalars with ``frexp`` for the exponent and mantissa, in the order of operations that defines z
(each op one IEEE rounding). Slow (tens of microseconds an element): for tests on a few hundred
elements, which compare :func:`l2l.z.gaussian` against it bit-for-bit.
"""

from __future__ import annotations

import numpy as np

from l2l import z as zdef

_M64 = (1 << 64) - 1
_F = np.float32


def splitmix64(key: int, counter: int) -> int:
    """Output ``counter`` (0-based) of SplitMix64 seeded with ``key``."""
    x = (key + (counter + 1) * zdef.GAMMA) & _M64
    x = ((x ^ (x >> 30)) * zdef.MIX1) & _M64
    x = ((x ^ (x >> 27)) * zdef.MIX2) & _M64
    return x ^ (x >> 31)


def _horner(x: np.float32, coeffs: tuple[float, ...]) -> np.float32:
    acc = x * _F(coeffs[-1])
    for c in reversed(coeffs[1:-1]):
        acc = (acc + _F(c)) * x
    return acc + _F(coeffs[0])


def _minus_2_ln_u(v: np.float32) -> np.float32:
    """-2 ln(v / 2^30) for v in [1, 2^30]: v = 2^e m with m in [sqrt(1/2), sqrt(2))."""
    frac, e = np.frexp(v)  # v = frac 2^e, frac in [1/2, 1)
    if frac < np.array(zdef.SQRT_HALF_BITS, dtype=np.uint32).view(_F):
        frac, e = frac * _F(2), e - 1
    t = frac - _F(1)
    s = t / (t + _F(2))
    two_ln_m = _horner(s * s, zdef.LOG_POLY) * s
    return _F(30 - e) * _F(zdef.TWO_LN2) - two_ln_m


def _sqrt(q: np.float32) -> np.float32:
    """Three Newton steps y <- (y + q / y) / 2 from the exponent-halving guess."""
    bits = np.array(q, dtype=_F).view(np.int32)
    y = np.array((bits >> 1) + zdef.SQRT_GUESS, dtype=np.int32).view(_F)[()]
    for _ in range(3):
        y = (y + q / y) * _F(0.5)
    return y


def gaussian_pair(h: int) -> tuple[np.float32, np.float32]:
    """Box-Muller of 64 bits ``h``: (z[2 G g + q], z[2 G g + G + q])."""
    low, high = h & 0xFFFFFFFF, h >> 32
    radius = _sqrt(_minus_2_ln_u(_F(low & 0x3FFFFFFF) + _F(1)))
    phi = _F(high - (1 << 32) if high >> 31 else high) * _F(zdef.PHI_SCALE)
    p = phi * phi
    sin, cos = _horner(p, zdef.SIN_POLY) * phi, _horner(p, zdef.COS_POLY)
    x, y = (cos - sin) * radius, (cos + sin) * radius
    return (-x if low >> 31 else x), (-y if (low >> 30) & 1 else y)


def element(key: int, i: int) -> np.float32:
    """Element ``i`` of stream ``key``: component ``c`` of pair ``G g + q``, i = 2 G g + G c + q."""
    g, c, q = i // (2 * zdef.GROUP), (i // zdef.GROUP) % 2, i % zdef.GROUP
    return gaussian_pair(splitmix64(key, zdef.GROUP * g + q))[c]


def gaussian(step_seed: int, block: int, start: int, numel: int) -> np.ndarray:
    """Elements ``start .. start + numel - 1`` of block ``block``'s z (float32)."""
    key = zdef.z_key(step_seed, block)
    return np.array([element(key, i) for i in range(start, start + numel)], dtype=np.float32)
