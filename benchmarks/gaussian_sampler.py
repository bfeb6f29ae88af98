"""What drawing z costs: l2l's counter-based generator against torch's sampler, in one process.

ZOSGD never stores z, so every step draws it three times (two forwards and the update). ``l2l.z``
computes z from (step seed, block, element) in plain torch ops, the same bits on every device
(SplitMix64 + Box-Muller from IEEE basic operations); before it, ``l2l`` drew each z chunk with
``normal_`` from a seeded ``torch.Generator``, whose numbers depend on the device. This script
times, interleaved round by round so that a busy machine slows every row alike (best of the
rounds):

* ``torch normal_``: that former sampler (a generator re-seeded per chunk, a reused buffer);
* ``l2l.z.gaussian``: one transient chunk, with torch's intra-op threads and with one thread
  (``normal_`` uses one core whatever the setting);
* ``l2l.z.gaussian, a repeat``: the same draw again (a step draws each z three times; draws of
  small blocks are remembered, larger ones computed again);
* ``l2l.z.counter_bits``: the uniform bits of stochastic rounding (time per 32-bit word).

Rows give ns per number for ``--elements`` numbers per call (wall time, and the process's CPU
time, which a busy machine inflates less), and microseconds per call for a small block
(``--small`` elements, e.g. a norm's weight) where the per-op overhead dominates.
With ``--step-cost`` (a ``step_cost.py --json`` result) it also prints the time per number that
ZOSGD's ratio of 1.10 would need if drawing were the step's only overhead.

    python benchmarks/gaussian_sampler.py --step-cost benchmarks/results/step_cost_smollm2-135m_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from l2l import z as zdef


@contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


Draw = Callable[[int, int], object]  # draw(numbers, round)


def candidates(default_threads: int) -> dict[str, tuple[Draw, int | None]]:
    """name -> (draw, threads: None = torch's setting)."""
    buf, gen = torch.empty(zdef.CHUNK_ELEMENTS), torch.Generator()
    words = torch.empty(zdef.CHUNK_ELEMENTS // 2 + 1, dtype=torch.int64)

    def torch_normal(numel: int, k: int) -> object:
        return buf[:numel].normal_(generator=gen.manual_seed(zdef.mix_seed(k, 0, 0)))

    def counter(block: int) -> Draw:
        def draw(numel: int, k: int) -> object:
            return zdef.gaussian(k, block, 0, (numel,), "cpu", transient=True)

        return draw

    def bits(numel: int, k: int) -> object:  # numel 32-bit words
        half = (numel + 1) // 2
        return zdef.counter_bits(k, 0, half, "cpu", out=words[:half])

    return {  # single-threaded rows first: a row after a multi-threaded one shares the cores
        "torch normal_ (former z)": (torch_normal, None),  # one thread whatever the setting
        "l2l.z.gaussian, 1 thread": (counter(1), 1),
        f"l2l.z.gaussian, {default_threads} threads": (counter(0), None),
        "l2l.z.gaussian, a repeat": (counter(1), None),  # small draws: remembered
        f"l2l.z.counter_bits, {default_threads} threads": (bits, None),
    }


def measure(rows, numel: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (as ``timeit``) wall and process-CPU seconds per call of each row over the rounds, the
    rows interleaved within every round: on a shared machine the best round is the one least
    disturbed by other processes. CPU time counts all threads of this process."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for k in range(repeats + 1):
        time.sleep(0.1)  # idle OpenMP workers of the last round stop spinning
        for name, (draw, n_threads) in rows.items():
            with threads(n_threads):
                draw(numel, k + 10**6)  # untimed, another key: wakes threads and caches up
                cpu = time.process_time()  # a system call: outside the wall-clock interval
                wall = time.perf_counter()
                draw(numel, k)
                wall = time.perf_counter() - wall
                elapsed = (wall, time.process_time() - cpu)
            if k:  # the first round warms buffers up
                times[name].append(elapsed)
    return {name: tuple(min(t[j] for t in ts) for j in range(2)) for name, ts in times.items()}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--elements", type=int, default=1 << 20, help="numbers per call")
    p.add_argument("--small", type=int, default=576, help="numbers per call of the small rows")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--step-cost", type=Path, help="a step_cost.py --json result (mezo row used)")
    args = p.parse_args(argv)

    default_threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    print(
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, {default_threads} "
        f"torch threads, load average {load:.2f}; {args.elements} numbers per call, "
        f"{args.repeats} rounds, generator {zdef.GENERATOR}"
    )
    rows = candidates(default_threads)
    large = measure(rows, args.elements, args.repeats)
    small = measure(rows, args.small, args.repeats)
    base, small_base = large["torch normal_ (former z)"], small["torch normal_ (former z)"]
    print(
        f"{'sampler':34s} {'ns/number':>10s} {'x normal_':>10s} {'cpu ns':>8s} {'x normal_':>10s}"
        f" {'us/call, ' + str(args.small):>15s} {'x normal_':>10s}"
    )
    for name in rows:
        (wall, cpu), (small_wall, _) = large[name], small[name]
        print(
            f"{name:34s} {wall / args.elements * 1e9:10.2f} {wall / base[0]:10.2f} "
            f"{cpu / args.elements * 1e9:8.2f} {cpu / base[1]:10.2f} "
            f"{small_wall * 1e6:15.1f} {small_wall / small_base[0]:10.2f}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
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
