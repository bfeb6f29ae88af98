"""Kernel and host-sync budget of one ZO step: aten ops per step against k forwards, and syncs.

On a GPU a step costs kernel launches, host synchronisations and passes over the weights, and
all three can be counted on any device. Counted here with ``torch.profiler`` on a random-init
model of a real shape (no download), per method with and without a (fresh) learned tuner:

* ``ops``: aten ops that launch work, outermost only (an op called inside another op is part of
  it); view and allocation ops (``view``, ``slice``, ``empty``, ``to``, ...) launch nothing and
  are not counted, but what they call is (a ``to`` that converts counts its ``_to_copy``); a
  profiled range of :data:`RANGES` counts as the kernels it is on CUDA with Triton
  (:mod:`l2l.z_triton`): one for a z draw, a random-bits draw, a fused draw-and-add
  (``"l2l::z"``, ``"l2l::bits"``, ``"l2l::add_z"``; several blocks' z drawn together, LOZO's
  U, is one ``"l2l::z"``), HiZOO's fused update (``"l2l::hizoo"``), LOZO's fused bfloat16 update
  (``"l2l::lowrank"``), stochastic rounding (``"l2l::round"``) and the tuner's features and MLP (``"l2l::tuner"``),
  two for the tuner's block statistics (``"l2l::moments"``, per dtype of the weights); on other
  devices their torch-op reference runs (a z draw: about 60 ops per pass of 2^21 elements);
* ``ratio``: ops of a step / (k x ops of one plain forward), k the method's forwards per step;
* ``syncs``: host synchronisations an accelerator would make: ``_local_scalar_dense``
  (``item``, ``float``, ``bool``), ``nonzero`` (masked indexing) and every ``tolist``/``cpu``/
  ``numpy`` call on a tensor (counted on host tensors too, so an upper bound).

``--policy device`` runs the code path that a CUDA device takes (whole weights in one z draw and
one GEMM) on this device, so that a CPU machine counts what a GPU step launches::

    python benchmarks/step_ops.py --model llama-3.2-1b --layers 1 --batch 2 --seq 16 --policy device

Budget: ratio <= 1.5 and syncs <= 2 for every method, with and without the tuner.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from collections import Counter

import torch
from _bench import bench_method

METHODS = ("mezo", "mezo+tuner", "hizoo", "hizoo+tuner", "lozo", "lozo+tuner", "lozo-m")
RATIO_BUDGET, SYNC_BUDGET = 1.5, 2

#: ops that only make views or allocate: no kernel on any device
NO_KERNEL = {
    "aten::" + name
    for name in (
        "view alias as_strided slice select t transpose permute expand expand_as unsqueeze "
        "squeeze reshape _reshape_alias _unsafe_view detach detach_ lift_fresh resolve_conj "
        "resolve_neg split split_with_sizes chunk unbind narrow unflatten flatten view_as "
        "empty empty_like empty_strided new_empty new_empty_strided set_ result_type "
        "_has_compatible_shallow_copy_type is_nonzero size stride numel dim contiguous "
        "lift to _to_copy_noop numpy_T mT"
    ).split()
}
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero"}
#: profiled ranges -> the kernels they are on CUDA with Triton (whatever their CPU reference runs)
RANGES = {
    "l2l::z": 1,
    "l2l::bits": 1,
    "l2l::add_z": 1,
    "l2l::hizoo": 1,
    "l2l::lowrank": 1,
    "l2l::round": 1,
    "l2l::moments": 2,
    "l2l::tuner": 1,
}


def count_events(prof) -> Counter:
    """{op name: count} of the outermost launching ops (a range of :data:`RANGES` counts as its
    kernels)."""
    counts: Counter = Counter()
    for ev in prof.events():
        name = ev.name
        parent, inside = ev.cpu_parent, False
        while parent is not None:  # a no-kernel op (e.g. ``to``) hides nothing it calls
            if parent.name in RANGES or (
                parent.name.startswith("aten::") and parent.name not in NO_KERNEL
            ):
                inside = True
                break
            parent = parent.cpu_parent
        if name in SYNC_OPS:
            counts["sync:" + name] += 1  # syncs count at any depth
        if inside:
            continue
        if name in RANGES:
            counts[name] += RANGES[name]
        elif name.startswith("aten::") and name not in NO_KERNEL:
            counts[name] += 1
    return counts


@contextlib.contextmanager
def host_transfers(counter: Counter):
    """Count ``Tensor.tolist``/``cpu``/``numpy`` calls (a device-to-host copy on an accelerator)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counter["sync:Tensor." + name] += 1
            return fn(self, *args, **kwargs)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def profile(fn) -> Counter:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    counts: Counter = Counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof, host_transfers(counts):
        fn()
    counts.update(count_events(prof))
    return counts


def split(counts: Counter) -> tuple[int, int]:
    syncs = sum(v for k, v in counts.items() if k.startswith("sync:"))
    return sum(counts.values()) - syncs, syncs


def build(args):
    from transformers import AutoModelForCausalLM

    from llm.shapes import shape_config

    torch.manual_seed(0)
    config = shape_config(args.model, num_hidden_layers=args.layers)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    return model.eval()


def measure(args) -> list[dict]:
    model = build(args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        closure()  # warm-up (lazy initialisation)
        fwd_ops, fwd_syncs = split(profile(closure))
    rows = []
    for method in args.methods:
        opt = bench_method(method, model, record=True)
        for _ in range(args.warmup):
            opt.step(closure)
        counts = profile(lambda: opt.step(closure))  # noqa: B023
        ops, syncs = split(counts)
        k = opt.forwards_per_step
        rows.append(
            dict(
                method=method,
                k=k,
                ops=ops,
                forward_ops=fwd_ops,
                ratio=round(ops / (k * fwd_ops), 3),
                syncs=syncs,
                within_budget=ops <= RATIO_BUDGET * k * fwd_ops and syncs <= SYNC_BUDGET,
                sync_sources={k: v for k, v in counts.items() if k.startswith("sync:")},
                top_ops=dict(
                    Counter(
                        {k: v for k, v in counts.items() if not k.startswith("sync:")}
                    ).most_common(8)
                ),
            )
        )
        print(
            f"{method:12s} k={k}  ops {ops:6d}  ratio {rows[-1]['ratio']:6.2f}  syncs {syncs:3d}"
            f"  {'ok' if rows[-1]['within_budget'] else 'OVER'}",
            flush=True,
        )
    print(f"plain forward: {fwd_ops} ops, {fwd_syncs} syncs")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama-3.2-1b", help="a shape of llm.shapes")
    p.add_argument("--layers", type=int, default=1, help="decoder layers (the rest of the shape)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--policy",
        choices=["auto", "device"],
        default="auto",
        help="device: the z chunking and GEMM policy of an accelerator, on any device",
    )
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--check", action="store_true", help="exit 1 if a method is over budget")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown --methods {unknown}: choose from {', '.join(METHODS)}")
    torch.set_num_threads(1)
    if args.policy == "device":
        from l2l import z as zdef

        zdef.ACCELERATOR_POLICY.add(torch.device(args.device).type)
    rows = measure(args)
    if args.json:
        from l2l.io import write_json

        write_json(
            args.json,
            dict(
                command=" ".join(["python", "benchmarks/step_ops.py", *(argv or sys.argv[1:])]),
                machine=dict(platform=platform.platform(), torch=torch.__version__),
                budget=dict(ratio=RATIO_BUDGET, syncs=SYNC_BUDGET),
                rows=rows,
            ),
        )
    return 0 if not args.check or all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
