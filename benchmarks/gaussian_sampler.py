"""How fast can this machine draw the N(0, 1) numbers of a ZO step? (issue 2's CPU ratio target)

ZOSGD never stores z, so every step draws it three times (two forwards and the update); on CPU
torch's sampler, not the arithmetic, is what keeps the step above 1.10 forward pairs
(``step_cost.py`` prints that floor). This script times, in one process, the ways of drawing
float32 Gaussians one could put behind ``l2l.z.gaussian_chunk``:

* ``torch normal_``: what ``l2l`` does (one seeded generator per z chunk, a reused buffer);
* ``torch normal_, 2 threads``: two chunks drawn at once by two generators (keeps z as defined);
* ``numpy <bit generator>``: numpy's ziggurat ``standard_normal`` (float32, into a buffer);
* ``counter hash + Box-Muller``: a counter-based generator written in torch elementwise ops
  (splitmix64 finaliser of the element index, then Box-Muller): the cheapest redefinition of z in
  plain PyTorch that lets any row range be drawn on its own.

With ``--step-cost`` (a ``step_cost.py --json`` result) it also prints the time per number that
ZOSGD's ratio of 1.10 would need if drawing were the step's only overhead, from that run's
Gaussians per step and forward time.

    python benchmarks/gaussian_sampler.py --step-cost benchmarks/results/step_cost_smollm2-135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from l2l.z import CHUNK_ELEMENTS

_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


class CounterGaussian:
    """z[i] for i in [0, n): splitmix64 of (seed, i // 2) gives two 24-bit uniforms; Box-Muller
    turns them into the pair (z[2k], z[2k+1]). int64 arithmetic wraps; shifts are made logical by
    masking."""

    GOLDEN, C1, C2 = (
        _signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
    )

    def __init__(self, n: int) -> None:
        half = n // 2
        self.index = torch.arange(half, dtype=torch.int64)
        self.x, self.t = torch.empty(half, dtype=torch.int64), torch.empty(half, dtype=torch.int64)
        self.u1, self.u2 = torch.empty(half), torch.empty(half)
        self.out = torch.empty(2 * half)

    def _shift_xor(self, bits: int) -> None:
        torch.bitwise_right_shift(self.x, bits, out=self.t)
        self.x.bitwise_xor_(self.t.bitwise_and_((1 << (64 - bits)) - 1))

    def draw(self, seed: int) -> torch.Tensor:
        x, t, half = self.x, self.t, self.index.numel()
        torch.add(self.index, _signed(seed), out=x).mul_(self.GOLDEN)
        self._shift_xor(30)
        x.mul_(self.C1)
        self._shift_xor(27)
        x.mul_(self.C2)
        self._shift_xor(31)
        torch.bitwise_right_shift(x, 40, out=t)
        self.u1.copy_(t.bitwise_and_((1 << 24) - 1)).add_(1).mul_(2.0**-24)  # (0, 1]
        self.u2.copy_(torch.bitwise_and(x, (1 << 24) - 1, out=t)).mul_(2 * math.pi * 2.0**-24)
        radius = self.u1.log_().mul_(-2).sqrt_()
        torch.cos(self.u2, out=self.out[:half]).mul_(radius)
        torch.sin(self.u2, out=self.out[half:]).mul_(radius)
        return self.out


def per_element(fn: Callable[[int], None], elements: int, repeats: int) -> float:
    """Median seconds per element of ``fn(k)`` (which draws ``elements`` numbers)."""
    fn(0)
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        fn(k + 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / elements


def in_threads(work: Callable[[int, int], None], threads: int) -> Callable[[int], None]:
    def run(k: int) -> None:
        pool = [threading.Thread(target=work, args=(i, k)) for i in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()

    return run


def candidates(n: int) -> dict[str, tuple[Callable[[int], None], int]]:
    """name -> (draw(k), numbers drawn per call)."""
    buf, gen = torch.empty(n), torch.Generator()
    bufs, gens = [torch.empty(n) for _ in range(2)], [torch.Generator() for _ in range(2)]

    def torch_two(i: int, k: int) -> None:
        bufs[i].normal_(generator=gens[i].manual_seed(2 * k + i))

    out: dict[str, tuple[Callable[[int], None], int]] = {
        "torch normal_": (lambda k: buf.normal_(generator=gen.manual_seed(k)), n),
        "torch normal_, 2 threads": (in_threads(torch_two, 2), 2 * n),
    }
    array = np.empty(n, dtype=np.float32)
    for name in ("PCG64", "SFC64", "Philox"):
        rng = np.random.Generator(getattr(np.random, name)(0))
        out[f"numpy {name}"] = (lambda k, r=rng: r.standard_normal(out=array, dtype=np.float32), n)
    counter = CounterGaussian(n)
    out["counter hash + Box-Muller"] = (counter.draw, n)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--elements", type=int, default=CHUNK_ELEMENTS // 4, help="numbers per call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--step-cost", type=Path, help="a step_cost.py --json result (mezo row used)")
    args = p.parse_args(argv)

    check = CounterGaussian(1 << 20).draw(7)
    moments = [float(check.mean()), float(check.var()), float((check**4).mean())]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, numpy "
        f"{np.__version__}, {torch.get_num_threads()} torch threads, {args.elements} per call"
    )
    print(f"counter generator moments (mean, var, E z^4; N(0,1): 0, 1, 3): {moments}")
    rows = {}
    for name, (fn, elements) in candidates(args.elements).items():
        rows[name] = per_element(fn, elements, args.repeats)
    base = rows["torch normal_"]
    print(f"{'sampler':28s} {'ns/number':>10s} {'x torch normal_':>16s}")
    for name, sec in rows.items():
        print(f"{name:28s} {sec * 1e9:10.2f} {sec / base:16.2f}")
    if args.step_cost:
        mezo = next(
            r for r in json.loads(args.step_cost.read_text())["rows"] if r["what"] == "mezo"
        )
        budget = 0.10 * mezo["forwards"] * mezo["forward_seconds"]
        need = budget / mezo["gaussians_per_step"]
        print(
            f"ZOSGD ratio <= 1.10 with {mezo['gaussians_per_step'] / 1e6:.0f} M numbers per step "
            f"and {mezo['forward_seconds']:.2f} s forwards ({args.step_cost.name}) needs <= "
            f"{need * 1e9:.2f} ns per number even if drawing were the only overhead"
        )


if __name__ == "__main__":
    main()
