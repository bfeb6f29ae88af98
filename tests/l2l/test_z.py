"""z is a pure function of (step seed, block, element): the torch generator against its plain
reference bit-for-bit, independence from chunking and device, and the distribution."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from l2l import z as zdef
from l2l import z_reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (step seed, block, start, numel): group and pair boundaries, odd starts, a far position
RANGES = [(0, 0, 0, 300), (7, 3, 1, 257), (2**62 + 5, 11, 2040, 20), (123, 2, 3000, 64)]
RANGES += [(5, 1, 7, 1), (9, 4, 2**33 + 1023, 4)]


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    return np.asarray(a, dtype=np.float32).view(np.int32)


def test_splitmix64_is_the_published_generator():
    # SplitMix64 (Steele, Lea & Flood 2014) seeded with 1234567 and with 0
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    expected += [4593380528125082431, 16408922859458223821]
    assert [ref.splitmix64(1234567, k) for k in range(5)] == expected
    assert ref.splitmix64(0, 0) == 0xE220A8397B1DCDAF
    words = zdef.counter_bits(1234567, 0, 5, "cpu")
    assert words.dtype == torch.int64
    assert [v & (2**64 - 1) for v in words.tolist()] == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,block,start,numel", RANGES)
def test_gaussian_matches_reference_bit_for_bit(seed, block, start, numel, device):
    got = zdef.gaussian(seed, block, start, (numel,), device)
    assert got.dtype == torch.float32 and got.device.type == device
    np.testing.assert_array_equal(bits(got), bits(ref.gaussian(seed, block, start, numel)))


@pytest.mark.parametrize("device", DEVICES)
def test_counter_bits_match_reference(device, monkeypatch):
    monkeypatch.setattr(zdef, "CPU_PAIRS", zdef.GROUP)  # several passes
    monkeypatch.setattr(zdef, "DEVICE_PAIRS", zdef.GROUP)
    monkeypatch.setattr(zdef, "_WORKSPACES", zdef._PerDevice(zdef._Workspace))
    got = zdef.counter_bits(99, 2**40 + 3, 2 * zdef.GROUP + 5, device).tolist()
    picks = [0, 1, zdef.GROUP, 2 * zdef.GROUP + 4]
    assert [got[j] for j in picks] == [
        zdef._signed64(ref.splitmix64(99, 2**40 + 3 + j)) for j in picks
    ]


def test_uniform_bits_are_balanced():
    words = zdef.counter_bits(zdef.mix_seed(1, 2), 0, 1 << 16, "cpu")
    ones = torch.stack([(words >> k) & 1 for k in range(64)]).double().mean(dim=1)
    # each bit: mean 1/2, standard error 0.002
    assert float((ones - 0.5).abs().max()) < 0.01


def test_passes_and_transient_scratch_give_the_same_numbers(monkeypatch):
    numel = 9 * 2 * zdef.GROUP + 7  # above the remembered small draws
    assert numel > zdef._Recent.SMALL
    whole = zdef.gaussian(3, 1, 5, (numel,), "cpu").clone()
    monkeypatch.setattr(zdef, "CPU_PAIRS", zdef.GROUP)
    monkeypatch.setattr(zdef, "_WORKSPACES", zdef._PerDevice(zdef._Workspace))
    passes = zdef.gaussian(3, 1, 5, (numel,), "cpu")
    transient = zdef.gaussian(3, 1, 5, (numel,), "cpu", transient=True)
    np.testing.assert_array_equal(bits(passes), bits(whole))
    np.testing.assert_array_equal(bits(transient), bits(whole))
    scratch = zdef._SCRATCH.get(torch.device("cpu"))
    assert scratch.data_ptr() <= transient.data_ptr() < scratch.data_ptr() + scratch.nbytes


def test_repeated_small_draws_are_copies_of_the_first(monkeypatch):
    monkeypatch.setattr(zdef, "_RECENT", zdef._Recent())
    first = zdef.gaussian(6, 2, 100, (24, 24), "cpu", transient=True)
    expected = bits(first).copy()
    first.div_(3.0)  # callers may scale a transient draw in place (HiZOO does)
    again = zdef.gaussian(6, 2, 100, (24, 24), "cpu", transient=True)
    kept = zdef.gaussian(6, 2, 100, (24, 24), "cpu")
    np.testing.assert_array_equal(bits(again), expected)
    np.testing.assert_array_equal(bits(kept), expected)
    assert kept.data_ptr() != again.data_ptr()
    monkeypatch.setattr(zdef._Recent, "BUDGET", 1000)
    for block in range(5):
        zdef.gaussian(6, block, 0, (400,), "cpu")
    assert sum(v.numel() for v in zdef._RECENT._draws.values()) <= 1000


@pytest.mark.parametrize("chunk", [257, 1000, 1 << 22])
def test_values_do_not_depend_on_chunking(chunk, monkeypatch):
    """Element i of a block is z[i] however the block is cut: chunks, row chunks of another
    block shape, an explicit start."""
    param = torch.empty(37, 29)
    block = zdef.gaussian_block(4, 2, param)
    monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", chunk)
    chunks = zdef.row_chunks(param.shape)
    parts = [zdef.param_chunk_z(4, 2, c, param) for c in range(len(chunks))]
    np.testing.assert_array_equal(bits(torch.cat(parts)), bits(block))
    for c, (r0, r1) in enumerate(chunks):
        default = zdef.gaussian_chunk(4, 2, c, (r1 - r0, 29), param.device)
        np.testing.assert_array_equal(bits(default), bits(block[r0:r1]))
    lozo_u = zdef.gaussian_chunk(4, 2, 1, (5, 29), param.device, start=10 * 29)
    np.testing.assert_array_equal(bits(lozo_u), bits(block[10:15]))
    assert zdef.param_chunk_z(4, 2, 0, torch.tensor(1.0)).shape == ()


def test_draws_are_float32_under_other_default_dtypes_and_inference_mode():
    expected = bits(zdef.gaussian(8, 0, 0, (64,), "cpu"))
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        np.testing.assert_array_equal(bits(zdef.gaussian(8, 0, 0, (64,), "cpu")), expected)
    finally:
        torch.set_default_dtype(old)
    with torch.inference_mode():
        inside = zdef.gaussian(8, 0, 0, (64,), "cpu", transient=True).clone()
    np.testing.assert_array_equal(bits(inside), expected)


def test_every_draw_is_one_profiler_range():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        zdef.param_chunk_z(1, 0, 0, torch.empty(8, 8), transient=True)
        zdef.gaussian_block(1, 1, torch.empty(3))
    names = [e.name for e in prof.events()]
    assert names.count("l2l::z") == 2


def test_constants_are_exact_float32():
    values = [*zdef.LOG_POLY, *zdef.SIN_POLY, *zdef.COS_POLY, zdef.TWO_LN2, zdef.PHI_SCALE]
    for v in values:
        assert float(np.float32(v)) == v, v
    assert np.array(zdef.SQRT_HALF_BITS, dtype=np.int32).view(np.float32) == np.float32(
        math.sqrt(0.5)
    )


def test_float_part_is_box_muller_to_float32_precision():
    """Each pair against Box-Muller in float64 from the same bits: radius sqrt(-2 ln u) with
    u = (low 30 bits + 1) / 2^30, angle pi/4 + phi with phi = high word * pi / 2^33, signs from
    bits 31 and 30. Catches any wrong coefficient, constant or bit."""
    rng = random.Random(0)
    worst = 0.0
    for _ in range(3000):
        h = rng.getrandbits(64)
        low, high = h & 0xFFFFFFFF, h >> 32
        u = ((low & 0x3FFFFFFF) + 1) / 2**30
        phi = (high - 2**32 if high >> 31 else high) * math.pi / 2**33
        r = math.sqrt(-2 * math.log(u))
        x = -r * math.cos(math.pi / 4 + phi) if low >> 31 else r * math.cos(math.pi / 4 + phi)
        y = -r * math.sin(math.pi / 4 + phi) if (low >> 30) & 1 else r * math.sin(math.pi / 4 + phi)
        gx, gy = ref.gaussian_pair(h)
        worst = max(worst, abs(gx - x) / max(1.0, r), abs(gy - y) / max(1.0, r))
    assert worst < 1e-6  # a few float32 ulps


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_distribution_is_standard_normal():
    n = 1 << 21
    x = zdef.gaussian(2024, 5, 0, (n,), "cpu").double()
    se = 1 / math.sqrt(n)
    assert abs(float(x.mean())) < 4 * se
    assert abs(float(x.var()) - 1) < 4 * math.sqrt(2) * se
    assert abs(float((x**3).mean())) < 4 * math.sqrt(15) * se
    assert abs(float((x**4).mean()) - 3) < 4 * math.sqrt(96) * se
    # Kolmogorov-Smirnov: sup |F_n - Phi| < 1.95 / sqrt(n) (p = 0.001)
    s = x.sort().values
    cdf = _normal_cdf(s)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max())
    assert ks < 1.95 * se, ks
    # tails: counts of |z| > 3, 4, 4.5 within 5 standard deviations of Poisson counts
    for t in (3.0, 4.0, 4.5):
        expected = n * 2 * float(_normal_cdf(torch.tensor(-t, dtype=torch.float64)))
        count = int((x.abs() > t).sum())
        assert abs(count - expected) < 5 * math.sqrt(expected) + 1, (t, count, expected)
    assert 4.5 < float(x.abs().max()) < 6.5


def test_pairs_blocks_and_steps_are_independent():
    g = zdef.GROUP
    x = zdef.gaussian(7, 0, 0, (1 << 20,), "cpu").double().view(-1, 2, g)
    a, b = x[:, 0].flatten(), x[:, 1].flatten()  # the two outputs of each pair
    se = 1 / math.sqrt(a.numel())
    assert abs(float((a * b).mean())) < 5 * se
    assert abs(float((a * a * b * b).mean()) - 1) < 5 * math.sqrt(8) * se  # 1 if independent
    angle = torch.atan2(b, a)  # uniform on (-pi, pi] for a rotation-invariant pair
    hist = torch.histc(angle, bins=64, min=-math.pi, max=math.pi)
    expected = a.numel() / 64
    assert float(((hist - expected) ** 2 / expected).sum()) < 64 + 5 * math.sqrt(128)
    m = 1 << 18
    others = [zdef.gaussian(7, 1, 0, (m,), "cpu"), zdef.gaussian(8, 0, 0, (m,), "cpu")]
    others.append(zdef.gaussian(7, 0, 1, (m,), "cpu"))  # the same stream shifted by one
    first = x.flatten()[:m]
    for other in others:
        assert abs(float((first * other.double()).mean())) < 5 / math.sqrt(m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_a_whole_chunk_as_the_cpu_does():
    shape = (zdef.CHUNK_ELEMENTS // 1000, 1000)
    cpu = zdef.gaussian(31, 7, 12345, shape, "cpu")
    cuda = zdef.gaussian(31, 7, 12345, shape, "cuda", transient=True)
    assert torch.equal(cuda.cpu().view(torch.int32), cpu.view(torch.int32))
    bits_cpu = zdef.counter_bits(5, 3, 1 << 20, "cpu")
    assert torch.equal(zdef.counter_bits(5, 3, 1 << 20, "cuda").cpu(), bits_cpu)


def test_many_draws_are_each_blocks_own_draw():
    """:func:`l2l.z.gaussian_many` (LOZO's U of every matrix in one draw): each request gets the
    bits of its own :func:`l2l.z.gaussian`, as views of one buffer, in one profiled draw."""
    requests = [
        (3, 0, (576, 2)),
        (7, 5, (1000,)),
        (0, 4095, (3, 7)),
        (2, 0, (0,)),
        (11, 10**5, (900, 2)),
    ]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = zdef.gaussian_many(12345, requests, "cpu")
    assert [e.name for e in prof.events()].count("l2l::z") == 1
    assert len({t.untyped_storage().data_ptr() for t in got}) == 1
    for (block, start, shape), draw in zip(requests, got, strict=True):
        want = zdef.gaussian(12345, block, start, shape, "cpu")
        assert draw.shape == want.shape and torch.equal(
            draw.view(torch.int32), want.view(torch.int32)
        )
