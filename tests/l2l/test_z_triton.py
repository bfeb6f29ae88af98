"""The Triton kernels of z (l2l.z_triton) give the torch-op generator's bits.

They run under Triton's interpreter (``TRITON_INTERPRET=1``: NumPy on the CPU, each float32
operation IEEE-rounded as on a GPU compiled without FMA contraction), in a child process so
that the interpreter setting, read when Triton compiles, cannot leak into other tests. On a GPU,
``benchmarks/device_check.py`` compares the compiled kernels with the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TESTS = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys, warnings
from fractions import Fraction
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter
sys.path.insert(0, sys.argv[1])


def exact_fma64(x, y, z):
    # float64: the exact value as a fraction, rounded once (float() of a Fraction rounds to
    # nearest even)
    f = np.frompyfunc(lambda a, b, c: float(Fraction(a) * Fraction(b) + Fraction(c)), 3, 1)
    return f(x, y, z).astype(np.float64)


def exact_fma(self, x, y, z):
    if z.data.dtype == np.float64:
        r = exact_fma64(x.data.astype(np.float64), y.data.astype(np.float64), z.data)
        return interpreter.TensorHandle(r, z.dtype.scalar)
    # The interpreter's fma is x * y + z in NumPy float32 (two roundings); a GPU's is one.
    # Exact emulation: x y is exact in float64 (24 + 24 bits), TwoSum gives the float64 sum s
    # and its error e, and s rounds to float32 as the exact sum does unless s is a float32
    # midpoint, where the sign of e decides.
    a, b, c = (t.data.astype(np.float64) for t in (x, y, z))
    p = a * b
    s = p + c
    v = s - p
    e = (p - (s - v)) + (c - v)
    r = s.astype(np.float32)
    up, down = np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))
    r64 = r.astype(np.float64)
    r = np.where((s == (r64 + up.astype(np.float64)) / 2) & (e > 0), up, r)
    r = np.where((s == (r64 + down.astype(np.float64)) / 2) & (e < 0), down, r)
    return interpreter.TensorHandle(r.astype(z.data.dtype), z.dtype.scalar)


_cast = interpreter.InterpreterBuilder.cast_impl


def cast_rne(self, src, dst_type):
    # The interpreter truncates float32 -> bfloat16; a GPU's conversion rounds to nearest even.
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        data = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(data, dst_type.scalar)
    return _cast(self, src, dst_type)


# a kernel that fails falls back to the torch ops with a warning: here it fails the check
warnings.filterwarnings("error", message="l2l's Triton kernel ")
interpreter.InterpreterBuilder.create_fma = exact_fma
interpreter.InterpreterBuilder.cast_impl = cast_rne
from helpers import lm_closure, snapshot, tiny_lm
from l2l import z as zdef, z_triton
from l2l.methods.factory import make_method

launches = {"draw": 0, "draw_at": 0, "bits": 0, "add_z": 0, "update_bf16": 0, "add_scaled_z": 0,
            "hizoo_update": 0, "block_var_mean": 0, "round_into": 0, "tuner_sigma": 0,
            "draw_many": 0, "lowrank_update": 0}
for name in launches:
    def counted(*a, _f=getattr(z_triton, name), _n=name):
        out = _f(*a)
        launches[_n] += 1  # a launch that ran (a failing one raises below)
        return out
    setattr(z_triton, name, counted)

def bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

def draws():
    out = [zdef.gaussian(s, b, st, (n,), "cpu") for s, b, st, n in (
        (1, 0, 0, 1000), (31, 7, 12345, 70_001), (5, 2, 3, 257), (9, 1, 2048, 4096), (2, 3, 7, 1))]
    out.append(zdef.gaussian_at(9, 4, torch.randint(0, 90_000, (3, 50),
                                generator=torch.Generator().manual_seed(0))))
    out.append(zdef.counter_bits(5, 3, 5000, "cpu"))
    for seed in (3, 2**31, 2**32 - 1, 2**40 + 7, 2**63 - 1):  # keys derived in the kernel
        out.extend(zdef.gaussian_many(seed, [(0, 0, (576, 2)), (9, 4095, (3, 7)), (2, 0, (0,)),
                                             (130, 70_001, (5000,))], "cpu"))
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(300, 77, generator=gen) * 0.02).to(dtype)
        out.append(zdef.add_z(x, 4, 2, 5000, -3e-3))  # a perturbed copy
        y = x.clone()
        out.append(zdef.add_z(y, 4, 2, 0, 1e-2, out=y))  # in place
    from l2l.rounding import round_into
    for dest_dtype, src_dtype, big in ((torch.bfloat16, torch.float32, 3.3e38),
                                       (torch.float32, torch.float64, 3.4028235e38)):
        x = torch.randn(5000, generator=gen, dtype=src_dtype) * 1e-3
        x[:9] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), big, -big,
                              1e-40, -3e-39], dtype=src_dtype)
        for complement in (False, True):
            d = torch.empty(5000, dtype=dest_dtype)
            round_into(d, x.clone(), 77, start=3, complement=complement)
            out.append(d)
    return [bits(t) for t in out]

def train(method, dtype, **kw):
    model = tiny_lm("llama", dtype=dtype)
    opt = make_method(method, model, lr=1e-2 if dtype == torch.float32 else 1e-3, eps=1e-2,
                      rank=2, nu=2, hessian_smooth=0.1, **kw)
    closure = lm_closure(model)
    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
    return [bits(v) for v in snapshot(model).values()]

runs = [("draws", None, None, {})] + [("train", m, d, {}) for m in ("mezo", "hizoo", "lozo")
                                      for d in (torch.float32, torch.bfloat16)]
runs += [("train", "mezo", torch.bfloat16, dict(rounding="nearest", weight_decay=0.5)),
         ("train", "mezo", torch.float32, dict(weight_decay=0.5))]
# the variants of the fused HiZOO and rounding kernels, on the whole-weight (CUDA) path only
device_runs = [("train", "hizoo", torch.float32, dict(rounding="nearest", weight_decay=0.5)),
               ("train", "hizoo", torch.bfloat16, dict(rounding="nearest", weight_decay=0.5)),
               ("train", "hizoo", torch.bfloat16, dict(weight_decay=0.5)),
               ("train", "lozo-m", torch.bfloat16, dict(weight_decay=0.5))]
mismatches = []
for accelerator in (False, True):  # the CPU's chunking, then whole weights + gathered embedding
    for what, method, dtype, kw in runs + (device_runs if accelerator else []):
        got = []
        for kernels in (False, True):
            zdef.KERNEL_DEVICES.clear()
            zdef.ACCELERATOR_POLICY.clear()
            if kernels:
                zdef.KERNEL_DEVICES.add("cpu")
            if accelerator:
                zdef.ACCELERATOR_POLICY.add("cpu")
            zdef._RECENT = zdef._Recent()  # no small draw served from the other path's cache
            got.append(draws() if what == "draws" else train(method, dtype, **kw))
        if not all(torch.equal(a, b) for a, b in zip(*got, strict=True)):
            mismatches.append(f"{what} {method} {dtype} {kw} accelerator={accelerator}")
# the tuner's block statistics: kernels (two per dtype) against the torch ops, to rounding
from l2l.blocks import _device_var_mean
gen = torch.Generator().manual_seed(3)
flats = [(torch.randn(n, generator=gen) * sd + mu).to(dt) for n, sd, mu, dt in (
    (200_003, 0.02, 1e-3, torch.float32), (576, 0.1, 1.0, torch.float32), (1, 1.0, 0.5, torch.float32),
    (70_000, 0.05, 0.0, torch.bfloat16), (3 * 65_536, 0.02, -0.01, torch.float32))]
zdef.KERNEL_DEVICES.clear()
want = torch.stack(_device_var_mean(flats, torch.device("cpu")), 1)
zdef.KERNEL_DEVICES.add("cpu")
got = [torch.stack(_device_var_mean(flats, torch.device("cpu")), 1) for _ in range(2)]
moments = dict(rel=float(((got[0] - want).abs() / want.abs().clamp_min(1e-300)).max()),
               same_bits=torch.equal(got[0], got[1]))
# the tuner's features and MLP in one kernel against Tuner.forward, to float32 rounding
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
zdef.ACCELERATOR_POLICY.add("cpu")
model = tiny_lm("llama")
blocks = ParamBlocks.from_module(model)
prev_sigma = torch.rand(len(blocks), generator=gen) + 0.5
tuner_rel = []
for scaling in ("asinh", "raw"):
    tuner = Tuner.for_blocks(blocks, "tiny", feature_scaling=scaling)
    with torch.no_grad():
        for t in tuner.parameters():
            t.add_(torch.randn(t.shape, generator=gen) * 0.3)
    zdef.KERNEL_DEVICES.clear()
    want = tuner.step_sigma(blocks, (2.5, 2.25), prev_sigma)
    zdef.KERNEL_DEVICES.add("cpu")
    got = tuner.step_sigma(blocks, (2.5, 2.25), prev_sigma)
    tuner_rel.append(float(((got - want).abs() / want).max()))
print(json.dumps({"mismatches": mismatches, "launches": launches, "moments": moments,
                  "failed": sorted(zdef.FAILED_KERNELS),
                  "tuner_rel": tuner_rel}))
"""


def test_kernels_match_the_torch_generator_in_draws_and_whole_zo_steps():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(TESTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mismatches"] == [] and result["failed"] == []
    launches = result["launches"]
    # every entry point ran as a kernel: whole draws, looked-up rows, rounding bits, draw-and-add
    # (MeZO's perturbed copies and float32 updates), fused bfloat16 updates, HiZOO's perturbed
    # copies along z / sqrt(H) and its fused update and curvature EMA, several blocks' draws in
    # one (LOZO's U) and LOZO's fused bfloat16 update
    assert min(launches.values()) > 0 and launches["add_z"] > 100, launches
    # the block statistics agree with the torch ops to rounding and are deterministic
    assert result["moments"]["rel"] < 1e-9 and result["moments"]["same_bits"], result["moments"]
    # the tuner's one kernel gives Tuner.forward's sigmas to float32 rounding
    assert max(result["tuner_rel"]) < 1e-5, result["tuner_rel"]


def test_cuda_takes_the_kernels_and_a_missing_triton_falls_back(monkeypatch):
    import torch

    from l2l import z as zdef

    assert "cuda" in zdef.KERNEL_DEVICES
    assert zdef._kernels(torch.device("cpu")) is None
    monkeypatch.setattr(zdef, "_KERNELS", [None])  # as if `import triton` had failed
    monkeypatch.setattr(zdef, "KERNEL_DEVICES", {"cpu"})
    assert zdef._kernels(torch.device("cpu")) is None
    ref = zdef.gaussian(3, 1, 5, (100,), "cpu")
    monkeypatch.setattr(zdef, "KERNEL_DEVICES", set())
    assert torch.equal(ref, zdef.gaussian(3, 1, 5, (100,), "cpu"))


def test_a_failing_kernel_is_turned_off_and_its_torch_ops_run(monkeypatch):
    import warnings

    import torch

    from l2l import z as zdef

    calls = []

    class Broken:  # e.g. a GPU that Triton cannot compile one kernel for
        def draw(self, *args):
            calls.append("draw")
            raise RuntimeError("no ptxas")

        def bits(self, key, start, out):
            calls.append("bits")
            return out.fill_(7)

    ref = zdef.gaussian(3, 1, 5, (20_000,), "cpu")  # above _Recent.SMALL: not served from cache
    monkeypatch.setattr(zdef, "_KERNELS", [Broken()])
    monkeypatch.setattr(zdef, "KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(zdef, "FAILED_KERNELS", set())
    with pytest.warns(RuntimeWarning, match="'draw' failed .*no ptxas"):
        got = zdef.gaussian(3, 1, 5, (20_000,), "cpu")
    assert torch.equal(got, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off for the rest of the process: no second try
        assert torch.equal(zdef.gaussian(3, 1, 5, (20_000,), "cpu"), ref)
    assert calls == ["draw"] and zdef.FAILED_KERNELS == {"draw"}
    assert (zdef.counter_bits(1, 0, 4, "cpu") == 7).all()  # the other kernels still run
    assert calls == ["draw", "bits"]


def test_running_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    import torch

    from l2l import z as zdef

    class Full:
        def draw(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(zdef, "_KERNELS", [Full()])
    monkeypatch.setattr(zdef, "KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(zdef, "FAILED_KERNELS", set())
    with pytest.raises(torch.OutOfMemoryError):
        zdef.gaussian(3, 1, 5, (20_000,), "cpu")
    assert zdef.FAILED_KERNELS == set()


def _variants():
    """(kernel, signature, constexprs) for every variant that l2l launches."""
    import triton.language as tl

    from l2l import z_triton as zt

    i64, f32 = "i64", "fp32"
    group = dict(start=i64, numel=i64, first_group=i64)
    out = []
    for key in ("i32", i64):  # a small key arrives as int32
        out.append((zt._draw_kernel, dict(out_ptr="*fp32", key=key, **group), {}))
    flat = dict(BLOCK="constexpr")
    out.append((zt._at_kernel, dict(out_ptr="*fp32", index_ptr="*i64", key=i64, n=i64, **flat), {}))
    out.append((zt._bits_kernel, dict(out_ptr="*i64", key=i64, start=i64, n=i64, **flat), {}))
    for dtype in ("fp32", "bf16", "fp16"):
        for scaled in (False, True):
            sig = dict(
                out_ptr="*" + dtype, x_ptr="*" + dtype, h_ptr="*fp32" if scaled else "*" + dtype
            )
            sig.update(key=i64, **group, alpha=f32, FMA="constexpr", SCALED="constexpr")
            out.append((zt._add_z_kernel, sig, dict(FMA=dtype == "fp32", SCALED=scaled)))
    for sr in (False, True):
        sig = dict(w_ptr="*bf16", zkey=i64, rkey=i64, **group, alpha=f32, factor=f32)
        out.append((zt._update_kernel, dict(sig, SR="constexpr"), dict(SR=sr)))
    for w_mode in (0, 1, 2, 3):
        for h_mode in (0, 1, 2):
            sig = dict(w_ptr="*fp32" if w_mode in (0, 1) else "*bf16", h_ptr="*fp32")
            sig.update(zkey=i64, wkey=i64, hkey=i64, **group)
            sig.update({k: f32 for k in ("alpha", "factor", "coef", "keep", "rate")})
            sig.update({k: "i32" for k in ("keep_hi", "keep_lo", "rate_hi", "rate_lo")})
            sig.update(W="constexpr", H="constexpr")
            out.append((zt._hizoo_kernel, sig, dict(W=w_mode, H=h_mode)))
    for dest, src in (("bf16", "fp32"), ("fp32", "fp64")):
        sig = dict(dest_ptr="*" + dest, x_ptr="*" + src, rkey=i64, start=i64, flip="i32", n=i64)
        out.append((zt._round_kernel, dict(sig, **flat), {}))
    for dtype in (tl.float32, tl.bfloat16, tl.float16, tl.float64):
        sig = dict(addr_ptr="*i64", numel_ptr="*i64", prog_block_ptr="*i64", prog_start_ptr="*i64")
        sig.update(partial_ptr="*fp64", DTYPE="constexpr", TILE="constexpr", ITERS="constexpr")
        consts = dict(DTYPE=dtype, TILE=zt._MOMENT_TILE, ITERS=zt._MOMENT_ITERS)
        out.append((zt._moments_kernel, sig, consts))
    sig = dict(partial_ptr="*fp64", first_ptr="*i64", numel_ptr="*i64", row_ptr="*i64")
    sig.update(out_ptr="*fp64", total=i64, ROUNDS="constexpr", CH="constexpr")
    out.append((zt._combine_kernel, sig, dict(ROUNDS=3, CH=zt._COMBINE)))
    for asinh in (False, True):
        sig = dict(mean_ptr="*fp64", var_ptr="*fp64", prev_ptr="*fp32", lp=f32, lm=f32)
        sig.update({k: "*fp32" for k in ("scale_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr")})
        sig.update(out_ptr="*fp32", floor=f32, H="constexpr", ASINH="constexpr")
        out.append((zt._tuner_kernel, sig, dict(H=64, ASINH=asinh)))
    return out


def test_every_kernel_variant_compiles_for_a_gpu():
    """Each kernel as l2l launches it compiles to a cubin for an H100/H200 (sm_90) with
    Triton's bundled ptxas, no GPU needed: the interpreter runs kernels without compiling
    them, so an op the GPU backend rejects (a float32-only intrinsic on bfloat16, a branch
    that should be a compile-time constant) only shows here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from l2l import z_triton as zt

    target = GPUTarget("cuda", 90, 32)
    flat = {"BLOCK": zt._AT_BLOCK}
    for kernel, signature, constexprs in _variants():
        consts = dict(constexprs, **{k: v for k, v in flat.items() if k in signature})
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        compiled = triton.compile(source, target=target, options=zt._OPTIONS)
        assert compiled.asm["cubin"], (kernel.__name__, constexprs)
