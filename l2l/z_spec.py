"""The constants that define :mod:`l2l.z`'s generator, shared by its torch ops and its Triton
kernels (:mod:`l2l.z_triton`), and those of the fused kernels' other ops. A leaf: it imports
nothing."""

# SplitMix64's increment and mix64's multipliers (Steele, Lea & Flood 2014).
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
#: ``mix_seed``'s fold (``l2l.z.mix_seed``, a z key is ``mix_seed(step_seed, block)``): from
#: ``h = GAMMA``, per value ``h = (h ^ v) MIX1``, ``h = (h ^ h >> SEED_SHIFTS[0]) MIX2``,
#: ``h ^= h >> SEED_SHIFTS[1]``; the seed is ``h >> 1``.
SEED_SHIFTS = (31, 29)

# Float32-exact constants of the float part (see l2l.z_reference for the maths, tests/l2l/test_z.py
# for their accuracy). Polynomials are lowest order first, minimax fits of the relative error.
#: 2 ln m = s P(s^2), s = (m - 1) / (m + 1), m in [sqrt(1/2), sqrt(2)): 4 atanh(s) / s.
LOG_POLY = (4.0, 1.333336353302002, 0.7994948625564575, 0.5985410213470459)
#: sin(phi) / sqrt(2) = phi S(phi^2) on [-pi/4, pi/4].
SIN_POLY = (0.7071067690849304, -0.11785101145505905, 0.005891625303775072, -0.00013789845979772508)
#: cos(phi) / sqrt(2) = C(phi^2) on [-pi/4, pi/4].
COS_POLY = (0.7071067690849304, -0.35355228185653687, 0.029454121366143227, -0.0009602066711522639)
TWO_LN2 = 1.3862943649291992  # float32(2 ln 2)
#: phi = float32(w) PHI_SCALE in [-pi/4, pi/4] for a signed 32-bit w.
PHI_SCALE = float.fromhex("0x1.921fb6p-32")  # float32(pi) / 2^33
SQRT_HALF_BITS = 0x3F3504F3  # float32(sqrt(1/2)) as int32 bits
#: bits(v) - LOG_BIAS = (e + 1) 2^23 + (bits(m) - SQRT_HALF_BITS) for v = 2^e m.
LOG_BIAS = SQRT_HALF_BITS - (1 << 23)
SQRT_GUESS = 0x1FBB67AE  # bits(sqrt(x)) ~ (bits(x) >> 1) + SQRT_GUESS, within 3.6%

#: Box-Muller's two outputs of pair ``G g + q`` (q < G) are elements ``2 G g + q`` and
#: ``2 G g + G + q``: every op of the generator then reads and writes runs of G contiguous values.
GROUP = 1 << 10


def group_range(start: int, numel: int) -> tuple[int, int]:
    """(first group, number of groups) that elements ``start .. start + numel - 1`` span."""
    span = 2 * GROUP
    first = start // span
    return first, (-(-(start + numel) // span) - first if numel else 0)


#: HiZOO's lower bound on its curvature H, so that Sigma^{1/2} = H^{-1/2} stays finite.
H_FLOOR = 1e-12
