"""A step's launches and host syncs, and that the code paths an
accelerator takes compute what the CPU's compute.

``benchmarks/step_ops.py`` counts aten ops and syncs with ``torch.profiler``; here the same
counter checks the sync budget on tiny models, and the accelerator policy (whole weights in one z
draw and one GEMM, the gather embedding) is run on the CPU against the CPU policy.
"""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_module, lm_closure, same_bits, snapshot, tiny_lm
from torch import nn

import l2l.perturb as perturb
import l2l.z as zdef
from l2l import LOZO, ZOSGD, HiZOO, Trajectory, replay

METHODS = {
    "mezo": (ZOSGD, {}),
    "hizoo": (HiZOO, {"hessian_smooth": 1e-2}),
    "lozo": (LOZO, {"rank": 2, "nu": 2, "momentum": 0.0}),
    "lozo-m": (LOZO, {"rank": 2, "nu": 2, "momentum": 0.9}),
}


@pytest.fixture(scope="module")
def step_ops():
    with benchmark_module("step_ops") as module:
        yield module


@pytest.fixture
def accelerator_policy(monkeypatch):
    """The CPU takes the accelerator's code paths (what ``step_ops.py --policy device`` does)."""
    monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", {"cpu"})


def test_gaussian_at_is_gaussian_at_those_positions():
    for seed, block in ((1, 0), (7, 3)):
        full = zdef.gaussian(seed, block, 0, (6000,), "cpu")
        index = torch.randint(0, 6000, (3, 5, 41), generator=torch.Generator().manual_seed(seed))
        at = zdef.gaussian_at(seed, block, index)
        assert at.shape == index.shape and at.dtype == torch.float32
        assert torch.equal(at.view(torch.int32), full[index].view(torch.int32))
        assert torch.equal(zdef.gaussian_at(seed, block, torch.arange(6000)), full)


def test_gaussian_at_in_several_passes(monkeypatch):
    index = torch.arange(3 * zdef.GROUP + 17).flip(0)
    whole = zdef.gaussian_at(2, 1, index)
    zdef._WORKSPACES._by_device.clear()
    monkeypatch.setattr(zdef, "CPU_PAIRS", zdef.GROUP)  # passes of 1024 elements
    try:
        assert torch.equal(zdef.gaussian_at(2, 1, index), whole)
    finally:
        zdef._WORKSPACES._by_device.clear()


@pytest.mark.parametrize("name", ["mezo", "hizoo"])
@pytest.mark.parametrize("chunk", [zdef.CHUNK_ELEMENTS, 257], ids=["whole", "chunked"])
def test_gather_embedding_is_the_whole_weight_path(name, chunk, monkeypatch):
    """The embedding perturbed at its looked-up rows only gives the losses (bit for bit) of the
    path that perturbs the whole weight (or each 257-element chunk, with masks)."""
    monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", chunk)
    cls, kw = METHODS[name]
    runs = []
    for gather in (True, False):
        if not gather:
            monkeypatch.setattr(cls, "_has_direction_at", lambda self: False)
        model = tiny_lm("opt")  # untied embedding: the embedding's z reaches the loss alone
        opt = cls(model, lr=1e-2, eps=1e-2, record=True, **kw)
        closure = lm_closure(model)
        for _ in range(3):
            opt.step(closure)
        runs.append(([r.grad for r in opt.records], snapshot(model)))
    assert runs[0][0] == runs[1][0]
    assert same_bits(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", list(METHODS))
def test_accelerator_policy_steps_like_the_cpu_policy(name, accelerator_policy, monkeypatch):
    """Whole-weight draws and one GEMM per weight (the accelerator policy) against 257-element
    chunks with sub-GEMMs (the CPU policy): the same losses up to the GEMMs' summation order, and
    a trajectory recorded under one policy replays under the other bit for bit (MeZO, HiZOO:
    elementwise updates) or to rounding (LOZO: its low-rank update is a GEMM, whose summation
    order the BLAS picks by shape)."""
    cls, kw = METHODS[name]
    monkeypatch.setattr(perturb, "MATMUL_ELEMENTS", 100)
    runs = {}
    for policy in ("device", "cpu"):
        monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", {"cpu"} if policy == "device" else set())
        monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", 257)  # only the CPU policy reads it
        model = tiny_lm("llama")
        opt = cls(model, lr=1e-2, eps=1e-2, record=True, **kw)
        closure = lm_closure(model)
        losses = [float(opt.step(closure)) for _ in range(3)]
        runs[policy] = (losses, Trajectory.from_optimizer(opt), snapshot(model))
    assert runs["device"][0] == pytest.approx(runs["cpu"][0], abs=1e-5)
    for recorded, other in (("device", "cpu"), ("cpu", "device")):
        monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", {"cpu"} if other == "device" else set())
        model = tiny_lm("llama")
        replay(model, runs[recorded][1])
        got, want = snapshot(model), runs[recorded][2]
        if name.startswith("lozo"):
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        else:
            assert same_bits(got, want), f"{recorded} replayed as {other}"


def test_chunk_policy_by_device(accelerator_policy):
    assert zdef.chunk_elements(None) == zdef.CHUNK_ELEMENTS
    assert zdef.chunk_elements("cpu") == zdef.ACCELERATOR_CHUNK_ELEMENTS
    assert zdef.chunk_elements("meta") == zdef.ACCELERATOR_CHUNK_ELEMENTS
    assert zdef.row_chunks((128_256, 2048), "cpu") == [(0, 128_256)]
    zdef.ACCELERATOR_POLICY.clear()
    assert zdef.chunk_elements("cpu") == zdef.CHUNK_ELEMENTS
    assert len(zdef.row_chunks((128_256, 2048), "cpu")) == 63


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_syncs_once(name, step_ops, accelerator_policy):
    """Without a tuner a step waits on the device once: the losses come back in one transfer;
    no sync per block, chunk or embedding lookup."""
    cls, kw = METHODS[name]
    for arch in ("llama", "opt"):
        model = tiny_lm(arch)
        opt = cls(model, lr=1e-3, eps=1e-3, record=True, **kw)
        closure = lm_closure(model)
        with torch.no_grad():
            opt.step(closure)  # lazy state (HiZOO's H, LOZO's V) outside the count
            counts = step_ops.profile(lambda: opt.step(closure))  # noqa: B023
        syncs = {k: v for k, v in counts.items() if k.startswith("sync:")}
        # lm_closure's loss and labels add no sync; the one transfer is the losses'
        assert sum(syncs.values()) <= 1, (arch, syncs)


def test_device_statistics_match_the_cpu_path(accelerator_policy):
    """The accelerator's block statistics (float64 sum and foreach norm, left on the device)
    are those of the CPU path to float32 precision, also for a block whose mean dominates."""
    from l2l.blocks import ParamBlocks

    model = tiny_lm("llama")
    with torch.no_grad():
        model.model.norm.weight.add_(3.0)  # mean^2 >> var: the fast CPU path's fallback case
    blocks = ParamBlocks.from_module(model)
    device_mean, device_var = blocks.statistics(on_device=True)
    zdef.ACCELERATOR_POLICY.clear()
    mean, var = blocks.statistics()
    torch.testing.assert_close(device_mean, mean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(device_var, var, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("name", ["mezo", "lozo"])
def test_a_tuner_step_syncs_a_fixed_number_of_times(name, step_ops, accelerator_policy):
    """With a tuner: the losses' transfer and the tuner's sigma (and host-side reads of that
    host copy), independent of the number of blocks."""
    from l2l.blocks import ParamBlocks
    from l2l.tuner import Tuner

    cls, kw = METHODS[name]
    counts = []
    for layers in (1, 3):
        model = tiny_lm("llama")
        model.model.layers = model.model.layers[:layers]
        tuner = Tuner.for_blocks(ParamBlocks.from_module(model), base_model="t")
        opt = cls(model, lr=1e-3, eps=1e-3, block_scale=tuner, record=True, **kw)
        closure = lm_closure(model)
        with torch.no_grad():
            opt.step(closure)
            counts.append(step_ops.profile(lambda: opt.step(closure)))  # noqa: B023
    syncs = [sum(v for k, v in c.items() if k.startswith("sync:")) for c in counts]
    assert syncs[0] == syncs[1] <= 5, counts


@pytest.mark.parametrize(
    "name,chunk", [("mezo", None), ("mezo", 64), ("lozo", None)]
)  # looked-up rows, row chunks (a 400-element chunk here), low rank
def test_max_norm_embedding_renormalises_the_perturbed_copy_only(name, chunk, monkeypatch):
    """``max_norm`` renormalises looked-up rows in place: only the perturbed copy, never theta
    (a path that looks up unperturbed rows would renormalise the weight itself)."""
    if chunk is not None:
        monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", chunk)

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 8, max_norm=1.0)

        def forward(self, ids):
            return self.e(ids).sum()

    torch.manual_seed(0)
    model, ids = Lookup(), torch.randint(0, 50, (4, 6))
    with torch.no_grad():
        model.e.weight.mul_(3)  # rows far above max_norm
    before = model.e.weight.detach().clone()
    cls, kw = METHODS[name]
    cls(model, lr=0.0, eps=0.1, **kw).step(lambda: model(ids))
    assert torch.equal(model.e.weight, before)


def test_a_subclass_with_its_own_direction_does_not_inherit_the_looked_up_rows():
    class Sign(ZOSGD):  # a user's direction: sign(z); the looked-up-rows z is not it
        def _direction(self, ctx, block, chunk):
            return super()._direction(ctx, block, chunk).sign()

    model = tiny_lm("llama")
    assert ZOSGD(model)._has_direction_at() and HiZOO(model)._has_direction_at()
    assert not Sign(model)._has_direction_at()


def test_a_subclass_with_its_own_z_is_not_taken_for_plain_z():
    """MeZO fuses draw and add only for its own z: a subclass's ``_z`` (or ``_direction``)
    perturbs and updates as written. z -> 2 z at (lr, eps) is MeZO at (4 lr, 2 eps), bit for bit
    (every factor a power of two)."""

    class Double(ZOSGD):
        def _z(self, seed, block, chunk):
            return super()._z(seed, block, chunk).mul(2.0)

    class Sign(ZOSGD):
        def _direction(self, ctx, block, chunk):
            return super()._direction(ctx, block, chunk).sign()

    model = tiny_lm("llama")
    assert ZOSGD(model)._plain_z() and not Double(model)._plain_z() and not Sign(model)._plain_z()
    results = []
    for cls, lr, eps in ((Double, 1e-3, 0.05), (ZOSGD, 4e-3, 0.1), (ZOSGD, 1e-3, 0.05)):
        model = tiny_lm("llama")
        loss = cls(model, lr=lr, eps=eps, seed=3).step(lm_closure(model))
        results.append((float(loss), snapshot(model)))
    assert results[0][0] == results[1][0] and same_bits(results[0][1], results[1][1])
    assert not same_bits(results[0][1], results[2][1])  # and it is not plain MeZO at (lr, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_method_steps_within_the_op_budget(dtype, step_ops, accelerator_policy):
    """On the device path a step launches at most 1.5 x the ops of its k plain forwards (the
    benchmark's budget, counted as ``benchmarks/step_ops.py`` counts them), in float32 and
    bfloat16. LOZO: the U of all matrices is one draw; its linear layers take a perturbed copy
    (two launches) rather than the factored form (three) although a few tokens would make
    factoring cheaper in memory; a bfloat16 update is one fused kernel per matrix."""
    model = tiny_lm("llama", dtype=dtype)
    model.model.layers = model.model.layers[:1]
    closure = lm_closure(model, batch=1, length=8)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())  # the tied head included
    matrices = sum(p.ndim == 2 for p in model.parameters())
    with torch.no_grad():
        closure()
        forward = step_ops.split(step_ops.profile(closure))[0]
        for name, (cls, kw) in METHODS.items():
            opt = cls(model, lr=1e-7, eps=1e-3, record=True, **kw)
            opt.step(closure)  # lazy state outside the count
            counts = step_ops.profile(lambda: opt.step(closure))  # noqa: B023
            ops, syncs = step_ops.split(counts)
            k = opt.forwards_per_step
            assert ops <= step_ops.RATIO_BUDGET * k * forward and syncs <= 1, (name, ops, forward)
            if name.startswith("lozo"):
                assert counts["l2l::z"] == 1, counts  # U; the 1-D blocks draw-and-add fused
                assert counts["aten::addmm"] == k * linears, counts  # the perturbed copies
                fused = matrices if dtype == torch.bfloat16 else 0
                assert counts["l2l::lowrank"] == fused, counts


@pytest.mark.parametrize("name", ["mezo", "hizoo"])
def test_the_step_losses_cost_one_op(name, step_ops, accelerator_policy):
    """The losses of a step's k forwards reach the host as one stack and one transfer: a 0-d
    loss is not reduced or converted on the device, and the reported loss is made on the host
    from the transferred floats (no op on a tensor). What a step adds to its k forwards' means,
    divisions and dtype conversions is then nothing."""
    model = tiny_lm("llama")
    model.model.layers = model.model.layers[:1]
    closure = lm_closure(model, batch=1, length=8)
    cls, kw = METHODS[name]
    with torch.no_grad():
        closure()
        forward = step_ops.profile(closure)
        opt = cls(model, lr=1e-7, eps=1e-3, **kw)
        opt.step(closure)
        counts = step_ops.profile(lambda: opt.step(closure))
    k = opt.forwards_per_step
    for op in ("aten::stack", "aten::mean", "aten::div", "aten::_to_copy"):
        assert counts[op] - k * forward[op] == (op == "aten::stack"), (op, counts, forward)
    loss = opt.step(closure)
    assert loss.dtype == torch.float32 and loss.device.type == "cpu" and loss.ndim == 0


def test_a_gpu_copies_small_weights_and_factors_wide_ones():
    """The factored-or-copy choice of a LOZO linear layer: on memory alone (the CPU) a few tokens
    through a square 576-wide layer go factored; counting a launch (a GPU) they take the copy,
    and a wide layer or an LM head stays factored; many tokens take the copy everywhere."""
    launch = perturb.LAUNCH_BYTES
    assert perturb.factored_is_cheaper(32, 576, 576)
    assert not perturb.factored_is_cheaper(32, 576, 576, 4, launch)
    assert perturb.factored_is_cheaper(32, 8192, 2048, 2, launch)
    assert perturb.factored_is_cheaper(32, 49_152, 576, 4, launch)
    assert not perturb.factored_is_cheaper(4096, 576, 576)


def test_lozo_bfloat16_update_is_its_float32_value_rounded(accelerator_policy):
    """The device path's fused bfloat16 LOZO update, ``round(factor w + alpha a b^T)`` from
    elementwise ops, is the float64 value to one bfloat16 rounding (nearest), unbiased when
    stochastic, and leaves the weights alone at alpha = 0 with no decay."""
    from l2l.rounding import lowrank_update_

    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(70, 130, generator=gen) * 0.05).bfloat16()
    a, b = torch.randn(70, 3, generator=gen), torch.randn(130, 3, generator=gen)
    alpha, factor = 3e-3, 0.999
    exact = w0.double() * factor + alpha * (a.double() @ b.double().T)
    w = w0.clone()
    lowrank_update_(w, a, b, alpha, factor, 11, start=5, rounding="nearest")
    assert torch.equal(w, exact.float().bfloat16())
    draws = []
    for key in range(200):
        w = w0.clone()
        lowrank_update_(w, a, b, alpha, factor, key, start=5)
        draws.append(w.double())
    mean = torch.stack(draws).mean(0)
    spacing = (exact.float().bfloat16().double() - exact).abs().max() * 2
    assert float((mean - exact).abs().mean()) < 0.1 * float(spacing)
    w = w0.clone()
    lowrank_update_(w, a, b, 0.0, 1.0, 3)
    assert torch.equal(w, w0)
    whole = w0.clone()
    lowrank_update_(whole, a, b, alpha, factor, 11, start=5)
    zdef_chunk = zdef.CHUNK_ELEMENTS
    try:  # row slices of 3 rows: the reference ops in pieces give the same bits
        zdef.CHUNK_ELEMENTS = 3 * 130
        sliced = w0.clone()
        lowrank_update_(sliced, a, b, alpha, factor, 11, start=5)
    finally:
        zdef.CHUNK_ELEMENTS = zdef_chunk
    assert torch.equal(sliced.view(torch.int16), whole.view(torch.int16))
    for bad_a, bad_b in ((a[:-1], b), (a, b[:, :2]), (a[:, 0], b)):
        with pytest.raises(ValueError, match="lowrank_update_"):
            lowrank_update_(w0.clone(), bad_a, bad_b, alpha, factor, 1)


@pytest.mark.parametrize("name", ["mezo", "hizoo"])
def test_an_accelerator_without_kernels_keeps_its_temporaries_chunk_sized(name, monkeypatch):
    """On an accelerator without the fused kernels (a GPU without Triton), a whole weight is
    still perturbed into one copy for one GEMM, but the kernels' reference ops (the perturbed
    copy's draw, HiZOO's update and curvature refresh) run in the CPU's chunks: a step
    allocates about one weight-sized buffer per forward (the copies), not a dozen per weight,
    and computes the CPU's bits."""
    from torch.profiler import ProfilerActivity, profile

    import l2l.methods.hizoo as hizoo_module

    monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", 4096)
    cls, kw = METHODS[name]
    results = {}
    for policy in ("cpu", "reference-only accelerator"):
        accelerator = policy != "cpu"
        monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", {"cpu"} if accelerator else set())
        monkeypatch.setattr(hizoo_module, "reference_only", lambda device, a=accelerator: a)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8))  # 64k-element weight
        x = torch.randn(4, 256)
        opt = cls(model, lr=1e-3, eps=1e-3, **kw)
        with torch.no_grad():
            opt.step(lambda: model(x).pow(2).mean())  # noqa: B023
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                opt.step(lambda: model(x).pow(2).mean())  # noqa: B023
        weight_bytes = model[0].weight.numel() * 4
        big = sum(ev.self_cpu_memory_usage >= weight_bytes for ev in prof.events())
        results[policy] = big, snapshot(model), opt
    big, after, opt = results["reference-only accelerator"]
    assert big <= opt.forwards_per_step + 1, big
    assert same_bits(after, results["cpu"][1])
    if name == "hizoo":
        hessians = [
            {str(i): o.state[p]["hessian"] for i, p in enumerate(o.blocks.params)}
            for o in (opt, results["cpu"][2])
        ]
        assert same_bits(*hessians)
