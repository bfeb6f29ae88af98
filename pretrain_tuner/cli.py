"""``pretrain-tuner``: meta-train a block-scale tuner for one base LLM and publish it.

    pretrain-tuner --model smollm2-135m --tasks tweets,nyt-editorials --output tuners/smollm2-135m
    pretrain-tuner --model meta-llama/Llama-3.2-1B --tasks copa --output out --devices 1 \\
        --precision bf16-mixed --push-to-hub me/llama-3.2-1b-tuner

Writes the tuner folder (config.json, model.safetensors, README.md) into ``--output``, with the
Lightning checkpoints in ``--output/checkpoints`` and CSV (and TensorBoard, when installed) logs in
``--output/logs``; ``--resume`` continues from the last checkpoint there. The tuner registers
itself in the local zoo under ``--name`` (default: the output folder's name), so
``finetune --tuner NAME`` finds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULTS = dict(
    batch_size=8,
    n_train=1000,
    eps=1e-3,
    lr_update=1e-6,
    lr_tuner=0.1,
    lr_model=0.01,
    momentum=0.8,
    reset_every=5,
    max_epochs=15,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-tuner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--model",
        required=True,
        help="HF id, local folder, or built-in: tiny-llama, tiny-opt, smollm2-135m",
    )
    g.add_argument("--tasks", required=True, help="comma-separated task names or .jsonl/.csv files")
    g.add_argument(
        "--output", required=True, type=Path, help="folder for the tuner (and checkpoints/logs)"
    )
    g.add_argument(
        "--name", help="local zoo name (default: the output folder's name); 'none' to skip"
    )
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the tuner to this Hub repo")
    g.add_argument("--revision", help="base model revision to record in the tuner config")
    g.add_argument("--trust-remote-code", action="store_true")
    g = p.add_argument_group("meta-training recipe (defaults: ZO Fine-tuner, Llama-3.2-1B/COPA)")
    g.add_argument(
        "--max-steps", type=int, default=-1, help="stop after N meta-steps (-1: epochs decide)"
    )
    g.add_argument("--max-epochs", type=int, default=DEFAULTS["max_epochs"])
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    g.add_argument("--n-train", type=int, default=DEFAULTS["n_train"], help="examples per task")
    g.add_argument(
        "--mix", choices=["mixed", "alternating"], default="mixed", help="how tasks share batches"
    )
    g.add_argument("--eps", type=float, default=DEFAULTS["eps"])
    g.add_argument(
        "--lr-update", type=float, default=DEFAULTS["lr_update"], help="look-ahead ZO step size"
    )
    g.add_argument("--lr-tuner", type=float, default=DEFAULTS["lr_tuner"])
    g.add_argument(
        "--lr-model",
        type=float,
        default=DEFAULTS["lr_model"],
        help="first-order inner lr of the LLM (0: frozen)",
    )
    g.add_argument("--momentum", type=float, default=DEFAULTS["momentum"])
    g.add_argument(
        "--reset-every",
        type=int,
        default=DEFAULTS["reset_every"],
        help="reset the LLM every K epochs (0: never)",
    )
    g.add_argument(
        "--feature-scaling", default="asinh", help="tuner feature transform (see l2l.tuner)"
    )
    g.add_argument("--no-normalize", action="store_true", help="disable the nf normalisation")
    g.add_argument("--grad-clip", type=float, default=1.0, help="tuner gradient-norm clip (0: off)")
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("hardware and engineering (Lightning)")
    g.add_argument("--accelerator", default="auto")
    g.add_argument("--devices", default="auto")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto", help="auto, ddp, fsdp, ...")
    g.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    g.add_argument("--dtype", default="float32", help="dtype the base model is loaded in")
    g.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.ckpt"
    )
    g.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    return p


def _loggers(output: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(output / "logs", name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(output / "logs", name="tb", version=""))
    return loggers


def _trainer(args, output: Path):
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    callbacks = [
        ModelCheckpoint(
            dirpath=output / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=args.checkpoint_every,
            save_on_train_epoch_end=True,
        ),
    ]
    if not args.no_progress:
        callbacks.append(RichProgressBar())
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=precision,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        logger=_loggers(output),
        callbacks=callbacks,
        log_every_n_steps=args.log_every,
        enable_progress_bar=not args.no_progress,
        default_root_dir=output,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def recipe(args) -> dict:
    keys = [
        "tasks",
        "mix",
        "max_steps",
        "max_epochs",
        "batch_size",
        "n_train",
        "eps",
        "lr_update",
        "lr_tuner",
        "lr_model",
        "momentum",
        "reset_every",
        "feature_scaling",
        "grad_clip",
        "max_length",
        "seed",
        "dtype",
        "precision",
    ]
    out = {k: getattr(args, k) for k in keys}
    out["tasks"] = args.tasks.split(",")
    out["normalize"] = not args.no_normalize
    out["command"] = (
        "pretrain-tuner " + " ".join(sys.argv[1:])
        if sys.argv[0].endswith("pretrain-tuner")
        else None
    )
    return out


def run(args) -> Path:
    import lightning as L

    from finetune.model_ids import base_model_id
    from finetune.models import load_model
    from l2l.blocks import ParamBlocks
    from l2l.tuner import Tuner
    from pretrain_tuner.data import MetaDataModule
    from pretrain_tuner.module import MetaTunerModule

    L.seed_everything(args.seed, workers=True, verbose=False)
    output = args.output.expanduser().resolve()
    ckpt = output / "checkpoints" / "last.ckpt"
    if args.resume and not ckpt.exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
    model, tokenizer = load_model(
        args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    blocks = ParamBlocks.from_module(model)
    tuner = Tuner.for_blocks(
        blocks,
        base_model=base_model_id(args.model, model),
        revision=args.revision,
        model_type=getattr(model.config, "model_type", None),
        eps=args.eps,
        normalize=not args.no_normalize,
        feature_scaling=args.feature_scaling,
        recipe=recipe(args),
        seed=args.seed,
    )
    module = MetaTunerModule(
        model,
        tuner,
        eps=args.eps,
        lr_update=args.lr_update,
        lr_tuner=args.lr_tuner,
        lr_model=args.lr_model,
        momentum=args.momentum,
        reset_every=args.reset_every,
        normalize=not args.no_normalize,
        grad_clip=args.grad_clip,
        seed=args.seed,
    )
    data = MetaDataModule(
        args.tasks.split(","),
        tokenizer,
        batch_size=args.batch_size,
        n_train=args.n_train,
        mix=args.mix,
        seed=args.seed,
        max_length=args.max_length,
    )
    trainer = _trainer(args, output)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if args.resume else None)
    if trainer.global_rank != 0:
        return output
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tuner.config.metrics = dict(
        metrics, steps=trainer.global_step, wall_time_s=round(time.perf_counter() - start, 1)
    )
    tuner.save_pretrained(output)
    _publish(args, output, tuner)
    return output


def _publish(args, output: Path, tuner) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"[green]tuner written to {output}[/green] ({tuner.num_blocks} blocks)")
    name = args.name or output.name
    if name.lower() != "none":
        from tuner_zoo.resolve import register_local

        where = register_local(name, output)
        console.print(f"registered in the local zoo as [bold]{name}[/bold] ({where})")
    if args.push_to_hub:
        url = tuner.push_to_hub(args.push_to_hub)
        console.print(f"pushed to the Hub: {url}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
