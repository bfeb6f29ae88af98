"""Where a ZO step's CPU time goes: ``torch.profiler``'s table of aten ops for a few steps.

For comparing two commits op by op (same ops and call counts, and which op got slower), e.g.
from two worktrees::

    PYTHONPATH=<worktree> python benchmarks/profile_step.py --method hizoo --layers 4

Random-init model of a real shape (no download), one torch thread, ``--steps`` profiled steps
after one warm-up step.
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
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from l2l.methods.factory import make_method
    from llm.shapes import shape_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = shape_config(args.model, num_hidden_layers=args.layers)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    def closure():
        return model(input_ids=ids, labels=ids).loss

    opt = make_method(args.method, model, lr=1e-7, eps=1e-3)
    with torch.no_grad():
        opt.step(closure)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                opt.step(closure)
    print(
        f"# {args.method} on {args.model} ({args.layers} layers), batch {args.batch} x {args.seq}"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
