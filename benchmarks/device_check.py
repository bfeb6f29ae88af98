"""z and trajectories mean the same on every device: a check to run on each new device.

1. **z**: :func:`l2l.z.gaussian` (whole and offset draws, one larger than a CPU chunk),
   :func:`l2l.z.gaussian_at`, :func:`l2l.z.gaussian_many`, :func:`l2l.z.counter_bits`,
   :func:`l2l.z.add_z`, :func:`l2l.z.add_scaled_z`, :func:`l2l.rounding.lowrank_update_`,
   :func:`l2l.rounding.round_into` and
   :func:`l2l.rounding.sqrt_rn` on ``--device`` against the CPU, bit for bit, and the tuner's
   block statistics to 1e-9. On CUDA with Triton these are the kernels of :mod:`l2l.z_triton`
   (reported as ``kernels``), on the CPU their torch-op reference.
2. **Replay**: a few steps of every method (float32 and bfloat16, MeZO also with a tuner) on a
   tiny Llama trained on ``--device`` (with the accelerator's code paths: whole weights, gather
   embedding), its trajectory replayed on the CPU (the CPU's chunking) and on the device; the
   replayed weights against the trained ones (HiZOO's H moves fast, hessian_smooth 0.1, so that
   its z / sqrt(H) is tested). MeZO and HiZOO updates are elementwise and must
   match bit for bit; LOZO's low-rank update is a GEMM, whose summation order the BLAS picks,
   so its difference is reported, not required to be zero.

    python benchmarks/device_check.py --device cuda --json runs/device_check.json
    python benchmarks/device_check.py --device cpu    # the accelerator's paths on the CPU

Exit status 1 when a required bit-for-bit match fails or a kernel failed (and fell back to its
torch ops, which would make the later rows compare the torch ops with themselves).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

EXACT_METHODS = ("mezo", "hizoo", "mezo+tuner")
METHODS = (*EXACT_METHODS, "lozo", "lozo-m")


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().contiguous().view(ints)


def check_z(device: str) -> list[dict]:
    from l2l import z as zdef

    rows = []
    big = zdef.CHUNK_ELEMENTS + 4099  # more than one CPU chunk, drawn whole on an accelerator
    for seed, block, start, numel in ((1, 0, 0, 1000), (31, 7, 12345, big), (5, 2, 3, 257)):
        cpu = zdef.gaussian(seed, block, start, (numel,), "cpu")
        dev = zdef.gaussian(seed, block, start, (numel,), device)
        rows.append(
            dict(what=f"gaussian {numel} at {start}", equal=torch.equal(bits(dev), bits(cpu)))
        )
    full = zdef.gaussian(9, 4, 0, (300_000,), "cpu")
    index = torch.randint(0, 300_000, (4, 64, 32), generator=torch.Generator().manual_seed(0))
    at = zdef.gaussian_at(9, 4, index.to(device))
    rows.append(
        dict(what="gaussian_at 8192 positions", equal=torch.equal(bits(at), bits(full[index])))
    )
    cpu_bits = zdef.counter_bits(5, 3, 1 << 20, "cpu")
    dev_bits = zdef.counter_bits(5, 3, 1 << 20, device)
    rows.append(dict(what="counter_bits 1M", equal=torch.equal(dev_bits.cpu(), cpu_bits)))
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):  # the fused draw-and-add (perturbed copies)
        x = (torch.randn(1000, 333, generator=gen) * 0.02).to(dtype)
        cpu, dev = zdef.add_z(x, 7, 3, 999, -1e-3), zdef.add_z(x.to(device), 7, 3, 999, -1e-3)
        what = f"add_z {str(dtype).removeprefix('torch.')} 333k"
        rows.append(dict(what=what, equal=torch.equal(bits(dev), bits(cpu))))
    requests = [(0, 0, (576, 2)), (9, 4095, (3, 7)), (130, 70_001, (49_152, 2))]  # LOZO's U
    for seed in (3, 2**40 + 7):
        cpu = zdef.gaussian_many(seed, requests, "cpu")
        dev = zdef.gaussian_many(seed, requests, device)
        same = all(torch.equal(bits(d), bits(c)) for c, d in zip(cpu, dev, strict=True))
        rows.append(dict(what=f"gaussian_many 3 blocks, seed {seed}", equal=same))
    from l2l.rounding import lowrank_update_, round_into, sqrt_rn  # HiZOO's sqrt(H)

    w = (torch.randn(1000, 333, generator=gen) * 0.02).bfloat16()  # LOZO's bfloat16 update
    a, b = torch.randn(1000, 2, generator=gen), torch.randn(333, 2, generator=gen) / 2
    for rounding in ("stochastic", "nearest"):
        got = []
        for where in ("cpu", device):
            out = w.to(where, copy=True)
            lowrank_update_(out, a.to(where), b.to(where), -3e-3, 0.999, 77, start=5,
                            rounding=rounding)  # fmt: skip
            got.append(bits(out))
        rows.append(dict(what=f"lowrank_update_ bfloat16 {rounding} 333k", equal=torch.equal(*got)))

    h = torch.rand(1 << 20, generator=torch.Generator().manual_seed(1)) * 4 + 1e-3
    same = torch.equal(bits(sqrt_rn(h.to(device))), bits(sqrt_rn(h)))
    rows.append(dict(what="sqrt_rn 1M", equal=same))
    for dtype in (torch.float32, torch.bfloat16):  # HiZOO's perturbed copy along z / sqrt(H)
        x, hx = (
            (torch.randn(1000, 333, generator=gen) * 0.02).to(dtype),
            h[:333_000].view(1000, 333),
        )
        cpu = zdef.add_scaled_z(x, hx, sqrt_rn, 7, 3, 999, -1e-3)
        dev = zdef.add_scaled_z(x.to(device), hx.to(device), sqrt_rn, 7, 3, 999, -1e-3)
        what = f"add_scaled_z {str(dtype).removeprefix('torch.')} 333k"
        rows.append(dict(what=what, equal=torch.equal(bits(dev), bits(cpu))))
    for dest, src in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        x = torch.randn(1 << 20, generator=gen, dtype=src) * 1e-3
        for complement in (False, True):  # stochastic rounding (and the meta-step's undo)
            got = []
            for where in ("cpu", device):
                out = torch.empty(x.shape, dtype=dest, device=where)
                round_into(out, x.to(where, copy=True), 77, start=5, complement=complement)
                got.append(bits(out))
            what = f"round_into {str(dest).removeprefix('torch.')} complement={complement} 1M"
            rows.append(dict(what=what, equal=torch.equal(*got)))
    from l2l.blocks import _device_var_mean  # the tuner's block statistics (to rounding)

    flats = [(torch.randn(n, generator=gen) * 0.02 + 1e-3) for n in (3_000_001, 576, 70_000)]
    moments = [
        torch.stack(_device_var_mean([f.to(where) for f in flats], torch.device(where)), 1).cpu()
        for where in ("cpu", device)
    ]
    rel = float(((moments[1] - moments[0]).abs() / moments[0].abs()).max())
    rows.append(dict(what=f"block statistics (relative difference {rel:.1e})", equal=rel < 1e-9))
    return rows


def _train(method: str, dtype: torch.dtype, device: str, steps: int):
    from helpers import VOCAB, tiny_lm  # tests/helpers.py

    from l2l import Trajectory
    from l2l.blocks import ParamBlocks
    from l2l.methods.factory import make_method
    from l2l.tuner import Tuner

    model = tiny_lm("llama", dtype=dtype).to(device)
    name, _, tuner = method.partition("+")
    kw = {}
    if tuner:
        net = Tuner.for_blocks(ParamBlocks.from_module(model), base_model="check", seed=1)
        with torch.no_grad():
            net.b2.copy_(torch.linspace(0.5, 2.0, net.num_blocks))
        kw["block_scale"] = net.to(device)
    lr = 1e-2 if dtype == torch.float32 else 1e-3
    # hessian_smooth 0.1: HiZOO's H leaves 1 at once, so its directions z / sqrt(H) are tested
    opt = make_method(
        name, model, lr=lr, eps=1e-2, rank=2, nu=2, hessian_smooth=0.1, record=True, **kw
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 12), generator=gen).to(device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        for _ in range(steps):
            opt.step(closure)
    return Trajectory.from_optimizer(opt), {
        k: v.detach().cpu() for k, v in model.state_dict().items()
    }


def _replay(trajectory, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    from helpers import tiny_lm

    from l2l import replay

    model = tiny_lm("llama", dtype=dtype).to(device)
    replay(model, trajectory)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _compare(a: dict, b: dict) -> tuple[bool, float]:
    equal = all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return equal, diff


def check_replay(device: str, steps: int) -> list[dict]:
    from l2l import z as zdef

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for method in METHODS:
            policy = set(zdef.ACCELERATOR_POLICY)
            if device == "cpu":
                zdef.ACCELERATOR_POLICY.add("cpu")  # train with the accelerator's code paths
            trajectory, trained = _train(method, dtype, device, steps)
            on_device = _replay(trajectory, dtype, device)
            zdef.ACCELERATOR_POLICY.clear()
            zdef.ACCELERATOR_POLICY.update(policy - {"cpu"})
            on_cpu = _replay(trajectory, dtype, "cpu")  # the CPU's own chunking
            zdef.ACCELERATOR_POLICY.update(policy)
            for where, got in (("device", on_device), ("cpu", on_cpu)):
                equal, diff = _compare(got, trained)
                rows.append(
                    dict(
                        method=method,
                        dtype=str(dtype).removeprefix("torch."),
                        replayed_on=where,
                        bit_equal=equal,
                        max_abs_diff=diff,
                        required=method in EXACT_METHODS,
                    )  # fmt: skip
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    import l2l  # noqa: F401  (first: tests/ has an l2l folder of its own)

    sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # for tests/helpers.py
    from l2l import z as zdef

    triton_module = zdef._kernels(torch.device(args.device))
    kernels = "torch ops" if triton_module is None else f"triton {triton_module.triton.__version__}"
    print(f"z on {args.device}: {kernels}")
    z_rows = check_z(args.device)
    replay_rows = check_replay(args.device, args.steps)
    for r in z_rows:
        print(f"z   {r['what']:32s} {'equal' if r['equal'] else 'DIFFERENT'}")
    for r in replay_rows:
        verdict = "bit-equal" if r["bit_equal"] else f"max |diff| {r['max_abs_diff']:.3g}"
        need = "" if r["required"] or r["bit_equal"] else " (GEMM update: not required)"
        print(f"replay {r['method']:11s} {r['dtype']:9s} on {r['replayed_on']:6s} {verdict}{need}")
    # a kernel that failed fell back to its torch ops: the rows after it compared torch with
    # torch, so the check fails (and names the kernels)
    failed = sorted(zdef.FAILED_KERNELS)
    if failed:
        print(f"kernels that failed and fell back to the torch ops: {', '.join(failed)}")
    ok = (
        all(r["equal"] for r in z_rows)
        and all(r["bit_equal"] for r in replay_rows if r["required"])
        and not failed
    )
    if args.json:
        device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        out = dict(
            command=" ".join(["python", "benchmarks/device_check.py", *(argv or sys.argv[1:])]),
            machine=dict(platform=platform.platform(), torch=torch.__version__, device=device_name),
            ok=ok,
            kernels=kernels,
            failed_kernels=failed,
            z=z_rows,
            replay=replay_rows,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print("device check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
