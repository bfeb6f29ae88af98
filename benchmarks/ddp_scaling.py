"""Data-parallel ZO scaling on the CPU: ``finetune`` steps/s with 1 and 2 processes.

Both runs use the same global batch, so 2 processes each do half the forward work and exchange
only the step's loss scalars (one all-reduce of 2 float64 = 16 bytes for MeZO). Each run is a
fresh ``python -m finetune.cli`` (Lightning launches the second rank itself, gloo backend);
steps/s is read from its ``results.json`` (training loop only, evaluations excluded). Every
process gets ``--threads`` intra-op threads (default: half the cores), so the question answered is
"what does a second, identical worker add"; oversubscribed cores (2 processes x all cores)
measure contention instead.

    python benchmarks/ddp_scaling.py                       # smollm2-135m, tweets, 20 MeZO steps
    python benchmarks/ddp_scaling.py --model tiny-llama --steps 50 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(world: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "--model", args.model, "--task", args.task]
    cmd += [
        "--method",
        args.method,
        "--steps",
        str(args.steps),
        "--batch_size",
        str(args.batch_size),
    ]
    cmd += ["--n_train", str(max(args.batch_size * args.steps, 64)), "--n_test", "8"]
    cmd += ["--eval_examples", "2", "--max_length", str(args.max_length), "--lr", "1e-6"]
    cmd += ["--accelerator", "cpu", "--devices", str(world), "--no_progress", "--output", str(out)]
    if world > 1:
        cmd += ["--strategy", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"$ OMP_NUM_THREADS={args.threads} python {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(
            f"run with {world} process(es) failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    results = json.loads((out / "results.json").read_text())
    results["process_wall_s"] = time.perf_counter() - start
    return results


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="tweets")
    p.add_argument("--method", default="mezo")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over ranks)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = p.parse_args()

    import torch

    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, python {platform.python_version()}"
    )
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            results = run(world, args, Path(tmp) / f"world{world}")
            rates[world] = results["steps_per_s"]
            comm = results.get("communication") or {}
            sent = comm.get("payload_bytes_per_step", 0)
            print(
                f"  {world} process(es): {rates[world]:.3f} steps/s "
                f"({args.steps} steps, global batch {args.batch_size}); "
                f"all-reduce payload {sent:g} bytes/step; "
                f"process wall {results['process_wall_s']:.1f} s"
            )
    print(f"speed-up 2 vs 1 process: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
