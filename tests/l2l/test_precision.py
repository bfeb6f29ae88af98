"""Half-precision ZO runs keep their updates: stochastic rounding, exact in expectation and replayable."""

from __future__ import annotations

import pytest
import torch
from helpers import lm_closure, same_bits, snapshot, tiny_lm
from torch import nn

from l2l import LOZO, ZOSGD, HiZOO, ParamBlocks, StepRecord, Trajectory, apply_records, replay
from l2l.meta import MetaState, _shift, _unshift, meta_step
from l2l.methods.base import StepContext
from l2l.rounding import position_bits, round_into, sqrt_rn
from l2l.z import counter_bits, gaussian_block, param_chunk_z

HALF = [torch.bfloat16, torch.float16]
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)
INPUT = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def rounded(x: torch.Tensor, dtype: torch.dtype, key: int = 0, **kw) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype)
    round_into(out, x.clone(), key, **kw)
    return out


def grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype, ascending, in float64."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[values.isfinite()].double().unique()


# ---------------------------------------------------------------------------- the rounding


def test_position_bits_are_words_of_the_counter_stream():
    """Position i takes word i of z's counter stream (pure in (key, i): any piece, any start)."""
    key = 0x0123_4567_89AB_CDEF
    words = counter_bits(key, 0, 200, "cpu").view(torch.int32)
    for start, n in ((0, 10), (7, 101), (100, 300)):
        assert torch.equal(position_bits(key, start, n, "cpu"), words[start : start + n])


@pytest.mark.parametrize("dtype", HALF)
def test_result_is_a_bracketing_neighbour(dtype):
    """Representable values stay; others land on one of their two neighbours, sign kept;
    beyond the largest finite value the neighbour above is inf; inf and NaN stay."""
    values = grid(dtype)
    finite_max = float(values.max())
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(4000, generator=gen) * 0.02,
            torch.randn(2000, generator=gen) * 1e-6,  # float16 subnormals
            torch.randn(2000, generator=gen) * 1e-39,  # bfloat16 subnormals
            torch.tensor([0.0, -0.0, 1.0, -2.0, finite_max, -finite_max]),
            finite_max * (1 + torch.rand(500, generator=gen) * 2.0**-7),  # above the max
        ]
    )
    out = rounded(x, dtype).double()
    x64 = x.double().clamp(-finite_max, finite_max)
    lo_index = torch.searchsorted(values, x64, right=True) - 1
    lo = values[lo_index.clamp(0, len(values) - 1)]
    hi = values[(lo_index + 1).clamp(max=len(values) - 1)]
    beyond = x.double().abs() > finite_max
    inside = ~beyond
    assert bool(((out == lo) | (out == hi))[inside].all())
    assert bool(((out.abs() == finite_max) | out.isinf())[beyond].all())
    assert bool((torch.signbit(out) == torch.signbit(x)).all())
    exact = x.to(dtype).double() == x.double()
    assert bool((out[exact] == x.double()[exact]).all())
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    got = rounded(special, dtype)
    assert got[0] == float("inf") and got[1] == -float("inf") and bool(got[2].isnan())
    nan_low_payload = torch.tensor([0x7F80_0001, -0x0000_0001], dtype=torch.int32).view(
        torch.float32
    )
    assert bool(rounded(nan_low_payload, dtype).isnan().all())


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_rounding_is_unbiased(dtype):
    """E[round(x)] = x: the mean over positions (one key) and over keys (one position)."""
    info = torch.finfo(dtype)
    points = [0.02 + 1e-6, -0.02 - 3e-7, 1.0 + 1e-9, info.tiny * 0.3, -info.tiny * 1.7]
    n, keys = 1 << 16, 1000
    for point in points:
        x = torch.full((n,), point, dtype=INPUT[dtype])
        low = x[0].to(dtype)
        spacing = float((torch.nextafter(low, low.new_tensor(point * float("inf"))) - low).abs())
        over_positions = float(rounded(x, dtype, key=3).double().mean())
        over_keys = sum(float(rounded(x[:1], dtype, key=k).double()) for k in range(keys)) / keys
        for mean, draws in ((over_positions, n), (over_keys, keys)):
            assert abs(mean - point) < 5 * 0.5 * spacing / draws**0.5 + 1e-12 * abs(point)
    # a quarter of the last ulp past the largest finite value: inf with probability 1/4
    past = float(info.max) * (1 + 0.25 * info.eps / (2 - info.eps))
    share = float(
        rounded(torch.full((n,), past, dtype=INPUT[dtype]), dtype).isinf().double().mean()
    )
    assert abs(share - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5
    nearest = rounded(torch.full((n,), 0.02 + 1e-6), torch.bfloat16, rounding="nearest")
    assert bool((nearest == torch.tensor(0.02).to(torch.bfloat16)).all())


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_a_part_rounds_as_in_the_whole(dtype):
    """Rows held by a shard (start = their first position) draw the whole block's bits."""
    x = torch.randn(6, 50, dtype=INPUT[dtype]) * 0.02
    whole = rounded(x, dtype, key=9)
    part = rounded(x[2:5].contiguous(), dtype, key=9, start=100)
    assert torch.equal(part.view(INT[dtype]), whole[2:5].view(INT[dtype]))


def test_complement_undoes_a_shift_within_a_binade():
    t0 = (torch.rand(1 << 16) + 1.0).to(torch.bfloat16)  # [1, 2): one binade
    d = torch.full((1 << 16,), 3e-4)
    t1 = rounded(t0.float() + d, torch.bfloat16, key=5)
    keep = (t1.float() - d >= 1.0) & (t1.float() < 2.0)  # t1 and t1 - d in the binade too
    back = rounded(t1.float() - d, torch.bfloat16, key=5, complement=True)
    assert torch.equal(back[keep].view(torch.int16), t0[keep].view(torch.int16))
    assert bool((t1 != t0).float().mean() > 0.01)  # the shift moved a fair share


# ---------------------------------------------------------------------------- ZO updates


def linear_model(dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """A (1024, 1024) weight ~ N(0, 0.02^2): 1M weights, as an LLM's."""
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024, bias=False)
    nn.init.normal_(model.weight, std=0.02)
    return model.to(device, dtype)


def realised_share(
    dtype: torch.dtype, step: float, rounding: str = "stochastic", device: str = "cpu"
) -> float:
    """Slope of the realised change of a ``dtype`` model regressed on float32's, one ZOSGD update
    with lr * g = ``step`` from the same start and seed."""
    start = linear_model(dtype, device)
    changes = []
    for dt in (torch.float32, dtype):
        model = linear_model(dtype, device).to(dt)  # the same start: half-precision, upcast
        opt = ZOSGD(model, lr=step, rounding=rounding)
        opt._apply(StepRecord(step=0, seed=7, grad=1.0, lr=step, weight_decay=0.0))
        changes.append((model.weight.double() - start.weight.double()).flatten())
    full, half = changes
    return float((half * full).sum() / (full * full).sum())


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    "dtype,step", [(torch.bfloat16, 1e-6), (torch.bfloat16, 1e-5), (torch.float16, 1e-7)]
)
def test_half_precision_step_keeps_the_float32_update(dtype, step, device):
    share = realised_share(dtype, step, device=device)
    print(f"{dtype} on {device} keeps {share:.3f} of the float32 update at lr*g = {step:g}")
    assert 0.95 <= share <= 1.05


def test_round_to_nearest_loses_the_update():
    """What the option "nearest" keeps (the defect stochastic rounding fixes)."""
    assert realised_share(torch.bfloat16, 1e-6, "nearest") < 0.2


def test_float32_update_is_unchanged_by_the_option():
    models = [linear_model(torch.float32) for _ in range(2)]
    for model, rounding in zip(models, ("stochastic", "nearest"), strict=True):
        record = StepRecord(step=0, seed=7, grad=1.0, lr=1e-6, weight_decay=0.1)
        ZOSGD(model, lr=1e-6, weight_decay=0.1, rounding=rounding)._apply(record)
    assert torch.equal(models[0].weight, models[1].weight)
    expected = linear_model(torch.float32).weight.detach().clone()
    expected.mul_(1 - 1e-7).add_(gaussian_block(7, 0, expected), alpha=-1e-6)
    assert torch.equal(models[0].weight, expected)


@pytest.mark.parametrize(
    "cls,kw",
    [(ZOSGD, {}), (HiZOO, {"hessian_smooth": 1e-8}), (LOZO, {"rank": 2, "nu": 3, "momentum": 0.5})],
)
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_replay_and_resume_are_bit_exact(cls, kw, device, tmp_path):
    """At lr 1e-5 almost every change is a rounding decision: replay and resume repeat them."""
    model = tiny_lm("llama", dtype=torch.bfloat16).to(device)
    closure = lm_closure(model)
    opt = cls(model, lr=1e-5, eps=1e-2, record=True, **kw)
    for _ in range(3):
        opt.step(closure)
    zo = opt.zo_state()
    for _ in range(3):
        opt.step(closure)
    trajectory = Trajectory.from_optimizer(opt)
    assert trajectory.hparams["rounding"] == "stochastic"
    fresh = tiny_lm("llama", dtype=torch.bfloat16).to(device)
    assert not same_bits(snapshot(fresh), snapshot(model))
    replay(fresh, trajectory.save(tmp_path / "t.json"))
    assert same_bits(snapshot(fresh), snapshot(model))

    resumed = tiny_lm("llama", dtype=torch.bfloat16).to(
        device
    )  # a resume: replay the records, then go on
    again = cls(resumed, lr=1e-5, eps=1e-2, record=True, **kw)
    apply_records(again, trajectory.records[:3])
    again.load_zo_state(zo)
    for _ in range(3):
        again.step(lm_closure(resumed))
    assert same_bits(snapshot(resumed), snapshot(model))


def test_nearest_is_recorded_and_replayed():
    model = tiny_lm("llama", dtype=torch.bfloat16)
    opt = ZOSGD(model, lr=1e-4, record=True, rounding="nearest")
    for _ in range(3):
        opt.step(lm_closure(model))
    trajectory = Trajectory.from_optimizer(opt)
    assert trajectory.hparams["rounding"] == "nearest"
    fresh, other = tiny_lm("llama", dtype=torch.bfloat16), tiny_lm("llama", dtype=torch.bfloat16)
    replay(fresh, trajectory)
    assert same_bits(snapshot(fresh), snapshot(model))
    replay(
        other,
        Trajectory(
            "ZOSGD",
            dict(trajectory.hparams, rounding="stochastic"),
            trajectory.fingerprint,
            trajectory.records,
        ),
    )
    assert not same_bits(snapshot(other), snapshot(model))


def test_non_contiguous_half_parameter_takes_the_same_update():
    w = torch.randn(64, 48, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    strided, dense = nn.Parameter(w.T.contiguous().T), nn.Parameter(w.clone())  # same values
    assert not strided.is_contiguous()
    for p in (strided, dense):
        ZOSGD([p], lr=1e-4)._apply(StepRecord(step=0, seed=2, grad=1.0, lr=1e-4, weight_decay=0))
    assert torch.equal(strided, dense) and not torch.equal(dense, w)


def test_bad_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding must be one of"):
        ZOSGD(linear_model(torch.float32), rounding="up")


# ---------------------------------------------------------------------------- HiZOO's H


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_hizoo_curvature_moves_at_alpha_1e_8(rounding):
    """H <- (1 - alpha) H + alpha |h_hat| in expectation, though each step is ~0.1 ulp of H."""
    model = linear_model(torch.bfloat16)
    alpha, mu = 1e-8, 1e-3
    opt = HiZOO(model, lr=0.0, eps=mu, hessian_smooth=alpha, rounding=rounding)
    h = opt.state[model.weight]["hessian"]
    record = StepRecord(step=0, seed=3, grad=0.0, lr=0.0, weight_decay=0.0)
    record.extra["delta_loss"] = 2 * mu * mu * 3.0  # h_hat = 3 (z^2 - 1): alpha h_hat ~ 0.3 ulp
    opt._apply(record)
    z = param_chunk_z(3, 0, 0, model.weight).double()
    expected = ((1 - alpha) + alpha * (3.0 * (z.square() - 1)).abs()).mean() - 1.0
    moved = h.double().mean() - 1.0
    print(f"rounding={rounding}: mean H change {float(moved):.3e}, expected {float(expected):.3e}")
    if rounding == "nearest":  # only the rare alpha |h_hat| above half an ulp moves H
        assert float((h == 1.0).double().mean()) > 0.85
    else:
        assert abs(float(moved / expected) - 1) < 0.02


def correctly_rounded_sqrt(x: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Whether each float32 ``root`` is sqrt(x) correctly rounded: x lies strictly between the
    squares of the midpoints to root's neighbours (exact in float64: 25-bit midpoints)."""
    up = torch.nextafter(root, torch.tensor(float("inf")))
    down = torch.nextafter(root, torch.tensor(0.0))
    r, xd = root.double(), x.double()
    lo, hi = (r + down.double()) / 2, (r + up.double()) / 2
    return (lo * lo < xd) & (xd < hi * hi)


def test_sqrt_rn_is_correctly_rounded_where_torch_sqrt_is_not():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(1 << 20) * 4, torch.randn(1 << 20).abs() * 1e4, torch.rand(4) + 1])
    x = x.clamp_min(1e-12)  # HiZOO's floor on H
    assert bool(correctly_rounded_sqrt(x, sqrt_rn(x)).all())
    assert bool(correctly_rounded_sqrt(x, sqrt_rn(x, transient=True)).all())
    # the reason for it: torch's CPU float32 sqrt misses some on x86 builds (about 0.6% here)
    missed = int((~correctly_rounded_sqrt(x, torch.sqrt(x))).sum())
    print(f"torch.sqrt not correctly rounded for {missed} of {x.numel()} inputs")


def test_hizoo_direction_uses_the_correctly_rounded_root_of_h():
    """A CPU replay of a GPU-measured H perturbs with the same z / sqrt(H) (CUDA's sqrt is IEEE)."""
    model = linear_model(torch.float32)
    opt = HiZOO(model, lr=0.0, eps=1e-3, hessian_smooth=1e-8)
    h = opt.state[model.weight]["hessian"]
    h.copy_(torch.rand_like(h) * 3 + 0.1)
    root = sqrt_rn(h)
    assert bool(correctly_rounded_sqrt(h, root).all())
    expected = param_chunk_z(4, 0, 0, model.weight) / root
    got = opt._direction(StepContext(step=0, seed=4, scales=None), 0, 0)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # sqrt="torch" (how trajectories recorded before the setting replay) is torch's own root
    legacy = HiZOO(model, lr=0.0, eps=1e-3, hessian_smooth=1e-8, sqrt="torch")
    legacy.state[model.weight]["hessian"].copy_(h)
    old = legacy._direction(StepContext(step=0, seed=4, scales=None), 0, 0)
    assert torch.equal(old, param_chunk_z(4, 0, 0, model.weight) / h.sqrt())


def test_hizoo_trajectories_recorded_before_the_sqrt_setting_replay_with_torch_sqrt():
    model = linear_model(torch.float32)
    opt = HiZOO(model, lr=1e-3, eps=1e-3, hessian_smooth=0.5, record=True)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.step(lambda: model(x).square().mean())
    trajectory = Trajectory.from_optimizer(opt)
    assert trajectory.hparams["sqrt"] == "rn"
    del trajectory.hparams["sqrt"]  # as written before the setting existed
    assert replay(linear_model(torch.float32), trajectory).group["sqrt"] == "torch"
    with pytest.raises(ValueError, match="sqrt must be one of"):
        HiZOO(model, sqrt="fast")


# ---------------------------------------------------------------------------- meta look-ahead


def shifted_model(dtype: torch.dtype) -> tuple[nn.Module, ParamBlocks]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512)).to(dtype)
    nn.init.normal_(model[0].weight, std=0.02)
    return model, ParamBlocks.from_module(model)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("shift", [1e-6, 1e-2])
def test_meta_shift_is_kept_in_expectation_and_undone_bit_for_bit(dtype, shift):
    """1e-2 moves most weights many ulps (the whole chunks are kept for the undo)."""
    model, blocks = shifted_model(dtype)
    theta0 = snapshot(model)
    coeffs = torch.full((len(blocks),), shift, dtype=torch.float64)
    saved = _shift(blocks, 5, coeffs)
    w, w0 = model[0].weight.double(), theta0["0.weight"].double()
    z = gaussian_block(5, 0, model[0].weight).double()
    slope = float(((w - w0) * z).sum() / (shift * z.square().sum()))
    assert abs(slope - 1) < 0.05, slope
    _unshift(blocks, 5, coeffs, saved)
    assert same_bits(snapshot(model), theta0)
    if shift == 1e-6:  # the undo keeps only a few elements (the norm's exact 0s and 1s, ...)
        assert sum(theta.numel() for _, theta in saved.values()) < 0.01 * blocks.numels.sum()


class SoftplusTuner(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.05, 0.4], dtype=torch.float64))

    def forward(self, x):
        return nn.functional.softplus(x.double() @ self.w + 0.5)


def test_bf16_meta_step_restores_theta0():
    model = tiny_lm("llama", dtype=torch.bfloat16)
    blocks = ParamBlocks.from_module(model)
    before = snapshot(model)
    tuner = SoftplusTuner()
    out = meta_step(model, blocks, tuner, lm_closure(model), MetaState(), seed=4, lr_update=1e-4)
    assert same_bits(snapshot(model), before)
    assert tuner.w.grad is not None and bool(tuner.w.grad.abs().sum() > 0)
    assert torch.isfinite(out.meta_loss)
