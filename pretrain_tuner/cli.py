"""``pretrain-tuner``: meta-train a block-scale tuner for one base LLM and publish it.

    pretrain-tuner --model smollm2-135m --tasks tweets,nyt-editorials --output tuners/smollm2-135m
    pretrain-tuner --model meta-llama/Llama-3.2-1B --tasks copa --output out --devices 1 \\
        --precision bf16-mixed --push-to-hub me/llama-3.2-1b-tuner

Writes the tuner folder (config.json, model.safetensors, README.md) into ``--output``, with the
Lightning checkpoints in ``--output/checkpoints`` and CSV (and TensorBoard, when installed) logs in
``--output/logs``; ``--resume`` continues from the last checkpoint there. The tuner registers
itself in the local zoo under ``--name`` (default: the output folder's name), so
``finetune --tuner NAME`` finds it.

Data parallel: ``--strategy ddp --devices N`` (each rank meta-trains on its own minibatches; L+
and L- are all-reduced, and DDP averages the gradients of the meta-step's two backward passes).
On CPU this runs on the gloo backend: ``--accelerator cpu --devices 2 --strategy ddp``.
Sharded: ``--strategy fsdp`` (FSDP2: each decoder layer's weights, gradients and momentum split
over the ranks; ``--accelerator cpu`` works too). Large models (13B): see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
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
    g.add_argument(
        "--strategy", default="auto", help="auto, ddp, fsdp (FSDP2), or a Lightning strategy name"
    )
    g.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    g.add_argument("--dtype", default="float32", help="dtype the base model is loaded in")
    g.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.ckpt"
    )
    g.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps")
    g.add_argument(
        "--log-every", type=int, default=1, help="log metrics (logs/metrics.csv) every N steps"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    return p


def _keep_csv_rows(output: Path):
    """A callback that, on --resume, keeps the logged rows of the steps before the checkpoint
    (Lightning's CSVLogger deletes ``logs/metrics.csv`` when it starts)."""
    import csv

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    path = output / "logs" / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not")

    class KeepCSVRows(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            keep = [r for r in rows if r.get("step", "").isdigit()]
            keep = [r for r in keep if int(r["step"]) < trainer.global_step]
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger) and trainer.is_global_zero:
                    old = [{k: v for k, v in r.items() if v != ""} for r in keep]
                    logger.experiment.metrics[:0] = old

    return KeepCSVRows()


def _loggers(output: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(output / "logs", name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(output / "logs", name="tb", version=""))
    return loggers


def _quiet_lightning() -> None:
    """Silence the Lightning warnings that do not apply to meta-training."""
    # the checkpoint holds the state after the step, which is what --resume needs
    warnings.filterwarnings(
        "ignore", message=r"Using ModelCheckpoint with manual optimization", category=UserWarning
    )
    # the batches are a function of the global step (pretrain_tuner.data.StepBatches), so a
    # mid-epoch resume continues them exactly; one process reads them (no worker duplicates)
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # the base model is kept in eval mode on purpose (no dropout: losses must be deterministic)
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning
    )


def _strategy(name: str):
    """``ddp`` -> DDP that tolerates the meta-step's two backward passes over disjoint params;
    ``fsdp`` -> FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy."""
    if name == "fsdp":
        return _fsdp2()
    if name.startswith(("fsdp", "deepspeed")):
        raise ValueError(
            f"--strategy {name} is not supported: use --strategy fsdp (FSDP2, every decoder "
            "layer sharded over all ranks) or ddp; see docs/distributed.md"
        )
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # 1st backward (meta-loss) reaches only the base model, 2nd (surrogate) only the tuner;
        # bucket views: no second copy of the model's gradients (matters for a 13B model)
        return DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True)
    return name


def _fsdp2():
    """Lightning's ModelParallelStrategy with one data-parallel dimension over every rank.

    Lightning's ``FSDPStrategy`` wraps with FSDP1, which needs CUDA; FSDP2 runs on CPU (gloo) as
    well, so the sharded meta-step is tested here with 2 CPU processes. ``MetaTunerModule
    .configure_model`` does the sharding. Checkpoints are distributed (a folder, each rank
    writing its shard).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            # The tuner's SGD group has no momentum, so its parameters have no optimizer state,
            # and torch's set_optimizer_state_dict refuses that unless strict=False, which
            # Lightning does not pass. Loading stays strict where it matters: the distributed
            # checkpoint load fails on any tensor (weight or momentum) missing from the folder.
            import dataclasses

            import torch.distributed.checkpoint.state_dict as dcp_state

            strict = dcp_state.set_optimizer_state_dict

            def lenient(model, optimizers, optim_state_dict, *, options=None):
                options = dataclasses.replace(options or dcp_state.StateDictOptions(), strict=False)
                return strict(model, optimizers, optim_state_dict, options=options)

            dcp_state.set_optimizer_state_dict = lenient
            try:
                return super().load_checkpoint(checkpoint_path, weights_only)
            finally:
                dcp_state.set_optimizer_state_dict = strict

    return FSDP2()


def _trainer(args, output: Path):
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    if str(precision).startswith("16"):
        raise ValueError(
            f"--precision {precision} is not supported: the meta-gradient is "
            "built from the model's gradients, which fp16 loss scaling would scale twice; use "
            "bf16-mixed or 32-true"
        )
    _quiet_lightning()
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
    if args.resume:
        callbacks.append(_keep_csv_rows(output))
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=_strategy(args.strategy),
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

    from l2l.blocks import ParamBlocks
    from l2l.tuner import Tuner
    from llm.ids import base_model_id
    from llm.models import load_model
    from pretrain_tuner.data import MetaDataModule
    from pretrain_tuner.module import MetaTunerModule

    L.seed_everything(args.seed, workers=True, verbose=False)
    output = args.output.expanduser().resolve()
    ckpt = output / "checkpoints" / "last.ckpt"
    if args.resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
    trainer = _trainer(args, output)  # checks the settings before the model loads
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
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if args.resume else None)
    if trainer.global_rank != 0:
        return output
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tuner.config.metrics = dict(
        metrics, steps=trainer.global_step, wall_time_s=round(time.perf_counter() - start, 1)
    )
    if trainer.world_size > 1:
        tuner.config.metrics.update(
            world_size=trainer.world_size,
            replicas_identical=module.replicas_match,
            sharded=module.sharded,
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
    """Exit status: 0 done, 2 an error the message explains."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pretrain-tuner: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
