"""Where a ZO step's time goes: ``torch.profiler``'s table of ops for a few steps.

For comparing two commits op by op (same ops and call counts, and which op got slower), e.g.
from two worktrees::

    PYTHONPATH=<worktree> python benchmarks/profile_step.py --method hizoo --layers 4

On CUDA the table is sorted by the kernels' own device time, and the project's profiled ranges
(``l2l::*``: z draws, perturbed copies, roundings, the tuner's statistics and MLP) are listed
with the device time of everything inside them::

    python benchmarks/profile_step.py --device cuda --dtype bfloat16 --model opt-13b --layers 4 \
        --batch 8 --seq 512 --method mezo+tuner

Random-init model of a real shape built on the device in its dtype (no download), one torch
thread, ``--steps`` profiled steps after one warm-up step. ``--method`` may end in ``+tuner``
(a freshly initialised learned tuner on the model's device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a worktree wins


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="hizoo", help="mezo, hizoo, lozo, lozo-m, ...")
    p.add_argument("--model", default="smollm2-135m", help="a shape of llm.shapes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=14, help="ops in the table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)

    from _bench import bench_method
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from llm.shapes import shape_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cuda = torch.device(args.device).type == "cuda"
    config = shape_config(args.model, num_hidden_layers=args.layers)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    def closure():
        return model(input_ids=ids, labels=ids).loss

    try:
        opt = bench_method(args.method, model)
    except ValueError as e:
        p.error(f"--method: {e}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        opt.step(closure)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                opt.step(closure)
            if cuda:
                torch.cuda.synchronize()
    print(
        f"# {args.method} on {args.model} ({args.layers} layers), batch {args.batch} x {args.seq}"
        f", {args.dtype} on {args.device}, {args.steps} steps"
    )
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    if cuda:
        # a range is listed twice on CUDA: its CPU entry (the kernels launched inside it, which
        # this table wants) and its device-side annotation (its span on the device, gaps too)
        ranges = sorted(
            (
                e
                for e in events
                if e.key.startswith("l2l::") and not getattr(e, "is_user_annotation", False)
            ),
            key=lambda e: e.device_time_total,
            reverse=True,
        )
        print("project ranges: calls, device time of the kernels inside (ms per step)")
        for e in ranges:
            per_step = e.device_time_total / 1e3 / args.steps
            print(f"  {e.key:<20} {e.count:>6}  {per_step:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
