"""Does a bfloat16 run train as the float32 run does?

The movie-review run of ``make demo`` (the bundled SmolLM2-135M tuner, 60 steps at lr 3e-5),
once per variant, each from the same start and seed:

* ``float32``: the reference;
* ``bfloat16``: weights in bfloat16, updates stochastically rounded (the default);
* ``bfloat16-nearest``: weights in bfloat16, updates rounded to nearest (what public ZO code
  does; most of each update is lost).

It prints and writes (``--out``, JSON) the zero-shot and final test accuracy of each, with the
binomial standard error of an accuracy on the test split, the noise that "within noise" means:

    nice -n 10 python benchmarks/bf16_check.py --out benchmarks/results/bf16_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "float32": ("float32", "stochastic"),
    "bfloat16": ("bfloat16", "stochastic"),
    "bfloat16-nearest": ("bfloat16", "nearest"),
}


def accuracy(metrics: dict) -> float:
    return float(metrics["accuracy"])


def run_variant(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One fine-tuning run through ``finetune``'s own setup (model, task, tuner, optimizer)."""
    from finetune.cli import setup
    from finetune.config import FinetuneConfig

    dtype, rounding = VARIANTS[name]
    cfg = FinetuneConfig(
        tuner=args.tuner,
        task=args.task,
        steps=args.steps,
        lr=args.lr,
        eval_examples=args.eval_examples,
        n_test=args.n_test,
        dtype=dtype,
        seed=args.seed,
        output=str(workdir / name),
        overwrite=True,
        progress=args.progress,
        checkpoint_every=0,
    )
    run = setup(cfg)
    run.opt.param_groups[0]["rounding"] = rounding  # FinetuneConfig has no such option
    t0 = time.perf_counter()
    results = run.fit(run.begin())
    before, after = results["eval_before"], results["eval_after"]
    n = int(after.get("n", args.n_test))
    out = dict(
        dtype=dtype,
        rounding=rounding,
        accuracy_before=accuracy(before),
        accuracy_after=accuracy(after),
        n_test=n,
        wall_s=round(time.perf_counter() - t0, 1),
    )
    print(
        f"{name:18s} zero-shot {out['accuracy_before']:.3f} -> after {args.steps} steps "
        f"{out['accuracy_after']:.3f}  (n={n}, {out['wall_s']:.0f} s)",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--tuner", default="smollm2-135m")
    parser.add_argument("--task", default="movie-reviews")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--eval_examples", type=int, default=200)
    parser.add_argument("--n_test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16_check.json"))
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}: choose from {', '.join(VARIANTS)}")

    runs = finished(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in runs:
                print(f"{name:18s} done before, in {args.out}")
                continue
            runs[name] = run_variant(name, args, Path(tmp))
            write(args, runs)  # after every run: a long job keeps what it finished
    for name, row in summarise(runs).items():
        print(
            f"{name:18s} after - float32 after = {row['minus_float32']:+.3f} "
            f"(one s.e. {row['binomial_se']:.3f})"
        )
    print(f"wrote {args.out}")


def _settings(args: argparse.Namespace) -> dict:
    """What a run's result depends on (not which variants, where, or how it is shown)."""
    skip = ("variants", "out", "progress")
    return {k: v for k, v in vars(args).items() if k not in skip}


def finished(args: argparse.Namespace) -> dict[str, dict]:
    """The runs already in ``--out`` with the same settings: the script resumes."""
    if not args.out.exists():
        return {}
    saved = json.loads(args.out.read_text())
    return dict(saved["runs"]) if saved.get("settings") == _settings(args) else {}


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    """Each run's final accuracy against float32's, and the binomial s.e. of an accuracy."""
    if "float32" not in runs:
        return {}
    ref = runs["float32"]["accuracy_after"]
    summary = {}
    for name, r in runs.items():
        p, n = r["accuracy_after"], r["n_test"]
        summary[name] = dict(
            minus_float32=round(p - ref, 4),
            gain_over_zero_shot=round(p - r["accuracy_before"], 4),
            binomial_se=round(math.sqrt(max(p * (1 - p), 1e-12) / n), 4),
        )
    return summary


def write(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    import torch

    result = dict(
        settings=_settings(args),
        runs=runs,
        summary=summarise(runs),
        machine=dict(platform=platform.platform(), torch=torch.__version__),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
