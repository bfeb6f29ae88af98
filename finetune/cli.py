"""``finetune``: zeroth-order fine-tuning of a causal LM on a task, with a learned tuner.

    finetune --tuner smollm2-135m --task movie-reviews --steps 100
    finetune --model facebook/opt-13b --tuner opt-13b --task sst2 --method lozo
    finetune --model tiny-llama --task data.jsonl --tuner none --method hizoo --output out

``--model`` defaults to the tuner's base model. ``--tuner`` takes a folder, a name in the local
zoo, a bundled tuner, a registry name or a Hub repo id (``tuner-zoo list`` shows them), or
``none`` for the plain method. Results go to ``--output`` (see ``finetune.run``).

Data parallel on N devices (same step seed everywhere, a few bytes of losses all-reduced per
step; results identical to one process on the same global ``--batch-size``)::

    finetune --model tiny-llama --task tweets --strategy ddp --devices 2 --accelerator cpu

A model too big for one GPU: ``--device-map auto`` splits its layers over the visible GPUs (one
process; every weight must sit on a GPU, nothing offloaded)::

    finetune --model facebook/opt-66b --task sst2 --dtype bfloat16 --device-map auto

Exit status: 0 done, 2 an error the message explains (nothing written is left half-written),
130 interrupted (continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.run import METHODS, RunConfig
from llm.ids import DEVICE_MAPS

# finetune's own defaults where neither the command line nor the tuner's registry entry says
DEFAULT_LR = {"mezo": 1e-6, "hizoo": 1e-6, "lozo": 1e-6, "lozo-m": 1e-6}
DEFAULT_EPS = 1e-3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("what to fine-tune")
    g.add_argument(
        "--model",
        help="HF id, local folder, or built-in: tiny-llama, tiny-opt, smollm2-135m "
        "(default: the tuner's base model)",
    )
    g.add_argument(
        "--task", required=True, help="task name (see --list-tasks) or a .jsonl/.csv file"
    )
    g.add_argument(
        "--tuner", default="none", help="folder, zoo name, Hub repo id, or 'none' (default)"
    )
    g.add_argument("--method", choices=METHODS, default="mezo")
    g.add_argument(
        "--peft", choices=["lora"], help="train LoRA adapters (peft) instead of all weights"
    )
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the Hub"
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument(
        "--lr", type=float, help="learning rate (default: the tuner's recommendation or 1e-6)"
    )
    g.add_argument("--eps", type=float, help="perturbation scale (default: the tuner's or 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--rank", type=int, default=2, help="LOZO rank r")
    g.add_argument("--nu", type=int, default=50, help="LOZO steps between V redraws")
    g.add_argument("--momentum", type=float, default=0.9, help="LOZO-M beta")
    g.add_argument("--hessian-smooth", type=float, default=1e-8, help="HiZOO EMA rate alpha")
    g.add_argument(
        "--on-nonfinite",
        choices=["raise", "warn", "skip"],
        default="raise",
        help="what a NaN/inf loss does (the parameters are never touched by it)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--max-length", type=int, default=256)
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--n-train", type=int, default=1000)
    g.add_argument("--n-dev", type=int, default=500)
    g.add_argument("--n-test", type=int, default=1000)
    g.add_argument(
        "--eval-every", type=int, default=0, help="evaluate on dev every N steps (0: off)"
    )
    g.add_argument("--eval-examples", type=int, default=200, help="examples per evaluation")
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, default=Path("runs/finetune"))
    g.add_argument("--resume", action="store_true", help="continue the run in --output")
    g.add_argument("--save-model", action="store_true", help="also write the fine-tuned weights")
    g.add_argument("--checkpoint-every", type=int, default=50)
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("devices (Lightning Fabric)")
    g.add_argument("--accelerator", default="auto")
    g.add_argument("--devices", default="1")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument(
        "--strategy", default="auto", help="ddp: data-parallel ZO (same seed on every rank)"
    )
    g.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="split a model too big for one device over all visible GPUs (accelerate's "
        "device_map: consecutive layers on consecutive GPUs); one process, not with ddp",
    )
    g.add_argument("--list-tasks", action="store_true", help="print the known tasks and exit")
    return p


def _load_tuner(spec: str):
    from l2l.tuner import Tuner
    from tuner_zoo.registry import get_entry
    from tuner_zoo.resolve import resolve_tuner

    folder = resolve_tuner(spec)
    tuner = Tuner.load_folder(folder)
    entry = get_entry(spec)
    defaults = dict(entry.method_defaults) if entry else {}
    return tuner, folder, defaults


def _fabric(args):
    import lightning as L

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    fabric = L.Fabric(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision="32-true",
    )
    fabric.launch()
    return fabric


def _apply_peft(model, r: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a declared extra
        raise SystemExit("--peft lora needs the peft package: pip install 'l2l-zo[peft]'") from e
    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM")
    )


def _check_output(fabric, output: Path) -> None:
    """Rank 0 proves ``output`` writable before any expensive work; every rank learns the verdict."""
    from finetune.io import OutputError, check_writable

    message = None
    if fabric.global_rank == 0:
        try:
            check_writable(output)
        except OutputError as e:
            message = str(e)
    if fabric.world_size > 1:
        message = fabric.broadcast(message, src=0)
    if message:
        raise OutputError(message)


def setup(args):
    """Resolve tuner, model, task and optimizer; returns a ready :class:`finetune.run.Run`."""
    import torch

    from finetune.run import LossAllReduce, Run, make_optimizer
    from llm.ids import offline_name
    from llm.models import load_model
    from llm.tasks import load_task

    tuner, tuner_info, defaults = None, None, {}
    if args.tuner.lower() != "none":
        tuner, folder, defaults = _load_tuner(args.tuner)
        tuner_info = dict(
            spec=args.tuner,
            folder=str(folder),
            base_model=tuner.config.base_model,
            fingerprint=tuner.config.fingerprint,
        )
    model_name = args.model or (offline_name(tuner.config.base_model) if tuner else None)
    if model_name is None:
        raise SystemExit("finetune: pass --model (or a --tuner, whose base model is then used)")
    if args.device_map and (str(args.devices) != "1" or args.num_nodes > 1):
        raise ValueError(  # checked before Fabric launches any process
            "--device-map splits one copy of the model over the devices of one process; it does "
            "not combine with --devices > 1 / --num-nodes > 1 / --strategy ddp"
        )
    fabric = _fabric(args)
    if args.batch_size < fabric.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is the global batch: it needs at least one example "
            f"per rank ({fabric.world_size} ranks)"
        )
    cfg = RunConfig(
        model=model_name,
        task=args.task,
        method=args.method,
        tuner=args.tuner,
        steps=args.steps,
        lr=args.lr if args.lr is not None else defaults.get("lr", DEFAULT_LR[args.method]),
        eps=args.eps if args.eps is not None else defaults.get("eps", DEFAULT_EPS),
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        n_train=args.n_train,
        n_dev=args.n_dev,
        n_test=args.n_test,
        seed=args.seed,
        dtype=args.dtype,
        max_length=args.max_length,
        rank=args.rank,
        nu=args.nu,
        momentum=args.momentum,
        hessian_smooth=args.hessian_smooth,
        checkpoint_every=args.checkpoint_every,
        nonfinite=args.on_nonfinite,
        peft=args.peft,
        save_model=args.save_model,
    )
    task = load_task(
        args.task, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test
    )
    _check_output(fabric, args.output.expanduser())  # before the (possibly large) model loads
    model, tokenizer = load_model(
        model_name,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
    )
    if args.peft:
        if tuner is not None:
            raise SystemExit(
                "finetune: a tuner scales full-weight blocks; use --tuner none with --peft"
            )
        model = _apply_peft(model, args.lora_r)
    if args.device_map is None:
        model = model.to(fabric.device)
    if tuner is not None:
        from l2l.blocks import ParamBlocks

        tuner.check_compatible(ParamBlocks.from_module(model), model_id=model_name)
        tuner = tuner.to(fabric.device)
    reduce = LossAllReduce(fabric) if fabric.world_size > 1 else None
    with torch.no_grad():
        opt = make_optimizer(cfg, model, tuner, loss_reduce=reduce)
    return Run(
        cfg,
        model,
        tokenizer,
        task,
        opt,
        args.output.expanduser(),
        fabric=fabric,
        progress=not args.no_progress,
        tuner_info=tuner_info,
    )


def _report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['config']['method']} on {results['config']['task']}")
    table.add_column("metric")
    table.add_column("before (zero-shot)")
    table.add_column("after")
    before, after = results["eval_before"] or {}, results["eval_after"] or {}
    for key in ("accuracy", "f1", "exact_match"):
        if key in before:
            table.add_row(key, f"{before[key]:.4f}", f"{after.get(key, float('nan')):.4f}")
    losses = results["train_loss"]
    if losses:
        tail = losses[-max(1, len(losses) // 10) :]
        table.add_row(
            "train loss (first / mean of last 10%)",
            f"{losses[0]:.4f}",
            f"{sum(tail) / len(tail):.4f}",
        )
    table.add_row("wall time (s)", "", f"{results['wall_time_s']:.1f}")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    from l2l import NonFiniteLossError

    args = build_parser().parse_args(argv)
    if args.list_tasks:
        from llm.tasks import describe_tasks

        for name, desc in describe_tasks().items():
            print(f"{name:16s} {desc}")
        return 0
    try:
        run = setup(args)
        start = run.resume() if args.resume else 0
        results = run.fit(start)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: progress saved in {args.output}; continue with --resume",
            file=sys.stderr,
        )
        return 130
    except NonFiniteLossError as e:
        print(
            f"finetune: error: {e} Progress up to the failed step is saved in {args.output} "
            "(see --on-nonfinite).",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    if run.rank == 0:
        _report(results)
        print(f"results in {args.output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
