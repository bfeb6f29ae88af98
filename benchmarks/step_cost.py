"""Cost of one ZO step vs plain forwards, and peak memory of a step vs a forward.

Every measurement runs in a fresh subprocess so its peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU) belongs to that measurement alone. Models are random
initialisations of real shapes (no download).

    python benchmarks/step_cost.py --model smollm2-135m --batch 8 --seq 64 --dtype float32
    python benchmarks/step_cost.py --model tiny --methods mezo,mezo+tuner,lozo,lozo+tuner

Printed per method: step time, ratio = step_time / (forwards_per_step x forward_time), ratio of
the step time to the plain 4-pass MeZO reference, peak memory of a step and its ratio to a
forward's peak. Each worker times a forward right before every step, and the ratios use those
in-process forward times, so drift between workers (a busy or throttled machine) cancels out; the
reference ratio compares the two normalised times. A method named ``mezo+tuner`` (etc.) attaches a
freshly initialised learned tuner (block_scale) and also times the tuner's own work per step
(block features + one batched MLP call) against the step; ``--tuner`` attaches one to every
method.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _bench import bench_method

# the real shapes (llm.shapes) and a tiny Llama for quick checks
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
)  # fmt: skip
SHAPE_NAMES = ("tiny", "smollm2-135m", "llama-3.2-1b", "opt-13b")
METHODS = ("reference", "mezo", "hizoo", "lozo", "lozo-m")


def build(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm.shapes import shape_config

    torch.manual_seed(0)
    config = LlamaConfig(**TINY) if name == "tiny" else shape_config(name)
    with torch.device(device):  # built where it runs, in its dtype (OPT-13B: no 52 GB detour)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def count_gaussians() -> list[int]:
    """Count the Gaussian elements ``l2l`` draws: every z draw goes through ``l2l.z.gaussian``
    (whole chunks) or ``l2l.z.gaussian_at`` (looked-up positions)."""
    import l2l
    import l2l.methods.reference  # noqa: F401  (imported so that its reference is patched too)
    from l2l import z

    drawn, draw, draw_at = [0], z.gaussian, z.gaussian_at

    def counting(step_seed, block, start, shape, *a, **kw):
        drawn[0] += torch.Size(shape).numel()
        return draw(step_seed, block, start, shape, *a, **kw)

    def counting_at(step_seed, block, index):
        drawn[0] += index.numel()
        return draw_at(step_seed, block, index)

    for name, module in list(sys.modules.items()):
        if name.startswith("l2l"):
            if getattr(module, "gaussian", None) is draw:
                module.gaussian = counting
            if getattr(module, "gaussian_at", None) is draw_at:
                module.gaussian_at = counting_at
    assert z.gaussian is counting and l2l.methods.mezo.gaussian_at is counting_at
    return drawn


def sampler_seconds_per_element(device: str, sync, repeats: int = 5) -> float:
    """Time of one float32 N(0, 1) number of ``l2l.z`` on ``device``, drawn a chunk at a time into
    the scratch buffer as the methods draw it (a new step seed each time: nothing cached)."""
    from l2l.z import chunk_elements, gaussian

    numel = chunk_elements(device)
    if torch.device(device).type != "cpu":
        numel = min(numel, 1 << 24)  # a weight-sized draw; the whole 1 GiB budget is not needed
    times = []
    for seed in range(repeats + 1):
        sync()
        t = time.perf_counter()
        gaussian(seed, 0, 0, (numel,), device, transient=True)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) / numel


def measure(args) -> dict:
    """Runs inside the subprocess: one kind of work (forward or a method), timed."""
    drawn = count_gaussians()
    dtype = getattr(torch, args.dtype)
    model = build(args.model, dtype, args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    ids = ids.to(args.device)
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.what == "forward":
        run, forwards = closure, 1
    elif args.what == "reference":
        from l2l import ParamBlocks
        from l2l.methods.reference import mezo_reference_step

        blocks = ParamBlocks.from_module(model)
        run, forwards = (lambda: mezo_reference_step(blocks, closure, 1, 1e-7, 1e-3)), 2
    else:
        what = args.what if args.what.endswith("+tuner") or not args.tuner else f"{args.what}+tuner"
        opt = bench_method(what, model)
        run, forwards = (lambda: opt.step(closure)), opt.forwards_per_step
    times, fwd_times = [], []
    drawn[0] = 0
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            # a forward before every step: the ratio compares times taken in the same process
            # a moment apart, so a machine that speeds up or slows down cancels out
            for work, out in ((closure, fwd_times), (run, times)):
                sync()
                t = time.perf_counter()
                work()
                sync()
                if i >= args.warmup:
                    out.append(time.perf_counter() - t)
    row = dict(
        what=args.what,
        seconds=statistics.median(times),
        forward_seconds=statistics.median(fwd_times),
        forwards=forwards,
        peak_bytes=peak_memory(args.device),
        gaussians_per_step=drawn[0] / (args.warmup + args.repeats),
        sampler_seconds_per_element=sampler_seconds_per_element(args.device, sync),
    )
    if args.what not in ("forward", "reference") and opt.block_scale is not None:
        row.update(tuner_cost(opt, sync))
    return row


def tuner_cost(opt, sync, repeats: int = 20) -> dict:
    """What the tuner adds to a step: features + one batched MLP call (``block_scales``)."""
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        opt.block_scales()
        sync()
        times.append(time.perf_counter() - t)
    tuner = opt.block_scale
    return dict(
        tuner_seconds=statistics.median(times),
        tuner_bytes=sum(t.numel() * t.element_size() for t in tuner.state_dict().values()),
    )


def spawn(args, what: str) -> dict:
    cmd = (
        [sys.executable, __file__, "--_worker", what]
        + [
            f"--model={args.model}",
            f"--batch={args.batch}",
            f"--seq={args.seq}",
            f"--dtype={args.dtype}",
            f"--device={args.device}",
            f"--repeats={args.repeats}",
            f"--warmup={args.warmup}",
            f"--threads={args.threads}",
        ]
        + (["--tuner"] if args.tuner else [])
    )
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=SHAPE_NAMES, default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tuner", action="store_true", help="attach a learned tuner to each method")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        args.what = args._worker
        print(json.dumps(measure(args)))
        return
    rows = [spawn(args, "forward")] + [spawn(args, m) for m in args.methods.split(",")]
    report(args, rows)


def report(args, rows: list[dict]) -> None:
    fwd = rows[0]
    ref = next((r for r in rows if r["what"] == "reference"), None)
    print(
        f"# step_cost: model={args.model} batch={args.batch} seq={args.seq} dtype={args.dtype} "
        f"device={args.device} tuner={args.tuner} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} machine={platform.machine()} {platform.processor()}"
    )
    print(f"forward: {fwd['seconds'] * 1e3:.1f} ms, peak {fwd['peak_bytes'] / 2**20:.0f} MiB")
    print(
        "| method | step ms | step / (k x forward) | step / reference | peak MiB | peak / forward peak |"
    )
    print("|---|---|---|---|---|---|")

    def norm(r: dict) -> float:  # step time per forward, measured in the same process
        return r["seconds"] / (r["forwards"] * r["forward_seconds"])

    for r in rows[1:]:
        vs_ref = f"{norm(r) * r['forwards'] / (norm(ref) * ref['forwards']):.2f}" if ref else "-"
        mem = r["peak_bytes"] / fwd["peak_bytes"]
        print(
            f"| {r['what']} | {r['seconds'] * 1e3:.1f} | {norm(r):.3f} | {vs_ref} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {mem:.3f} |"
        )
    print(
        "Sampling z (l2l.z's generator, timed in each worker): Gaussians drawn per step, "
        "their time at the measured rate, and the ratio a step would have if everything but "
        "the forwards and the sampling were free:"
    )
    for r in rows[1:]:
        if r.get("gaussians_per_step"):
            sampling = r["gaussians_per_step"] * r["sampler_seconds_per_element"]
            floor = 1 + sampling / (r["forwards"] * r["forward_seconds"])
            print(
                f"  {r['what']}: {r['gaussians_per_step'] / 1e6:.1f} M per step, "
                f"{sampling * 1e3:.0f} ms ({100 * sampling / r['seconds']:.0f}% of the step) at "
                f"{r['sampler_seconds_per_element'] * 1e9:.2f} ns each; floor of "
                f"step / (k x forward): {floor:.2f}"
            )
    for r in rows[1:]:
        if "tuner_seconds" in r:
            print(
                f"tuner on {r['what']}: {r['tuner_seconds'] * 1e3:.2f} ms per step "
                f"({100 * r['tuner_seconds'] / r['seconds']:.2f}% of the step), "
                f"{r['tuner_bytes'] / 2**20:.2f} MiB of tuner weights"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
