"""pretrain-tuner: meta-train a block-scale tuner for one base LLM and publish it.

    pretrain-tuner --model smollm2-135m --task [tweets,nyt-editorials] --output tuners/smollm2
    pretrain-tuner --model meta-llama/Llama-3.2-1B --task copa --output out --devices 4 \\
        --precision bf16-mixed --push_to_hub me/llama-3.2-1b-tuner
    pretrain-tuner --config recipe.yaml        # a recipe written by --print_config

Writes the tuner folder (config.json, model.safetensors, README.md) into --output, with the
Lightning checkpoints in --output/checkpoints and CSV (and TensorBoard, when installed) logs in
--output/logs. --resume continues from the last checkpoint there, refusing any change to the
settings or data that decide the result; a finished run is only replaced with --overwrite. The
tuner registers itself in the local zoo under --name (default: the output folder's name), so
finetune --tuner NAME finds it.

Data parallel: --devices N (DDP; each rank meta-trains on its own share of the global batch,
L+ and L- are all-reduced). On CPU: --accelerator cpu --devices 2 (gloo). Sharded: --strategy
fsdp (FSDP2: each decoder layer's weights, gradients and momentum split over the ranks). Large
models: see docs/distributed.md.

Exit status: 0 done, 2 an error the one-line message explains, 130 interrupted (SIGINT or
SIGTERM: the meta-step under way completes and is saved to checkpoints/last.ckpt).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llm.cli import UsageError, run_command
from pretrain_tuner.config import (
    ADDED_SETTINGS,
    PretrainConfig,
    Recipe,
    decisive_settings,
    parse,
)
from pretrain_tuner.output import check_output, check_zoo_name, replacing

PROG = "pretrain-tuner"


@dataclass
class RunState:
    """What a run has written so far: what an interrupt message may truthfully claim."""

    output: Path | None = None
    created: bool = False  # the run made the output folder (removed again if nothing is saved)
    training: bool = False
    tuner_written: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.output is None else self.output / "checkpoints" / "last.ckpt"

    def report(self) -> str:
        """The line printed after an interrupt."""
        from pretrain_tuner.checkpoint import saved_step

        if self.tuner_written:
            return f"interrupted after the tuner was written to {self.output}"
        step = saved_step(self.checkpoint) if self.checkpoint is not None else None
        if step is None:
            self.discard_empty_output()
            return "interrupted before any meta-step was saved: nothing was written"
        return (
            f"interrupted: meta-step {step} is saved in {self.checkpoint}; continue with the "
            "same command and --resume"
        )

    def discard_empty_output(self) -> None:
        """Remove an output folder this run created when it holds no checkpoint (logs only)."""
        if self.created and self.output is not None and self.output.exists():
            from pretrain_tuner.checkpoint import saved_step

            if saved_step(self.checkpoint) is None:
                shutil.rmtree(self.output, ignore_errors=True)


def is_secondary_rank() -> bool:
    """A process Lightning launched for another rank (it re-runs this command): rank 0 alone
    checks and prepares the output folder and the zoo."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


def _from_command_line() -> bool:
    """Whether this process is the command (``pretrain-tuner ...`` or ``python -m
    pretrain_tuner.cli ...``), so that ``sys.argv`` holds its arguments."""
    path = Path(sys.argv[0])
    return path.name == PROG or (path.name == "cli.py" and path.parent.name == "pretrain_tuner")


def recipe(config: PretrainConfig, run_id: str, precision: str) -> dict:
    """What the tuner's config.json records about how it was meta-trained."""
    values = config.to_dict()
    out = {"tasks": config.tasks}
    out.update({f: values[f] for f in Recipe.__dataclass_fields__})
    out.update(dtype=config.dtype, precision=precision, run_id=run_id)
    out["command"] = f"{PROG} " + " ".join(sys.argv[1:]) if _from_command_line() else None
    return out


def _build(config: PretrainConfig):
    """(module, tuner, data) for the run: the base model, a fresh tuner for its blocks and the
    meta-training data (loaded now, so that a bad task fails before training)."""
    from l2l.blocks import ParamBlocks
    from l2l.tuner import Tuner
    from llm.ids import base_model_id
    from llm.models import load_model
    from pretrain_tuner.data import MetaDataModule
    from pretrain_tuner.module import MetaTunerModule

    model, tokenizer = load_model(
        config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )
    tuner = Tuner.for_blocks(
        ParamBlocks.from_module(model),
        base_model=base_model_id(config.model, model),
        revision=config.model_revision,
        model_type=getattr(model.config, "model_type", None),
        eps=config.eps,
        normalize=config.normalize,
        feature_scaling=config.feature_scaling,
        seed=config.seed,
    )
    initial = None  # the init's block scales: the reference of --anchor (None: all 1)
    if config.init == "weight-rms":
        import torch

        from l2l.scales import weight_rms_scale

        blocks = ParamBlocks.from_module(model)
        mean, var = blocks.statistics()
        initial = weight_rms_scale(torch.stack([mean, var], dim=1))
        tuner.start_at(initial)
    module = MetaTunerModule(
        model,
        tuner,
        eps=config.eps,
        lr_update=config.lr_update,
        lr_tuner=config.lr_tuner,
        lr_model=config.lr_model,
        momentum=config.momentum,
        reset_every=config.reset_every,
        normalize=config.normalize,
        grad_clip=config.grad_clip,
        seed=config.seed,
        keep_z=config.keep_z,
        anchor=config.anchor,
        anchor_to=initial,
    )
    data = MetaDataModule(
        config.tasks,
        tokenizer,
        batch_size=config.batch_size,
        n_train=config.n_train,
        mix=config.mix,
        seed=config.seed,
        max_length=config.max_length,
        objective=config.objective,
    )
    data.setup("fit")
    return module, tuner, data


def _manifest(config: PretrainConfig, tuner, data, run_id: str) -> dict:
    from pretrain_tuner.checkpoint import batches_hash, run_manifest, tensors_hash
    from pretrain_tuner.data import make_batches

    batches = make_batches(data.tasks, config.batch_size, config.mix, config.seed)
    settings = decisive_settings(config)
    return run_manifest(settings, batches_hash(batches), tensors_hash(tuner), run_id)


def _fit(trainer, module, data, config: PretrainConfig, stop, state: RunState) -> None:
    """``trainer.fit``; an interrupt (handled by :class:`StopOnSignal`, or a second signal that
    Lightning turns into ``sys.exit(1)``) comes out as ``KeyboardInterrupt``."""
    ckpt = state.checkpoint
    state.training = True
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if config.resume else None)
    except SystemExit:
        if stop.requested is None:
            raise
        raise KeyboardInterrupt from None
    finally:
        stop.restore()
        state.training = False
    if stop.requested is not None:
        raise KeyboardInterrupt


def _lightning_errors() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (MisconfigurationException,)


def run(config: PretrainConfig, state: RunState | None = None) -> Path:
    """Meta-train as ``config`` says; returns the output folder (see the module docstring)."""
    import lightning as L

    from pretrain_tuner.checkpoint import MANIFEST_KEY, check_resume, read_checkpoint_meta
    from pretrain_tuner.precision import default_precision
    from pretrain_tuner.trainer import StopOnSignal, build_trainer

    state = state or RunState()
    output = state.output = config.output.expanduser().resolve()
    ckpt = state.checkpoint
    primary = not is_secondary_rank()
    saved = read_checkpoint_meta(ckpt) if config.resume and ckpt.exists() else None
    run_id = ((saved or {}).get(MANIFEST_KEY) or {}).get("run_id")
    if primary:
        check_output(config, output, ckpt)
        check_zoo_name(config, output, run_id)
    L.seed_everything(config.seed, workers=True, verbose=False)
    stop = StopOnSignal(ckpt)
    try:
        trainer = build_trainer(config, output, stop)  # checks the hardware before the model loads
    except _lightning_errors() as err:
        raise UsageError(f"--accelerator/--devices/--strategy: {err}") from None
    module, tuner, data = _build(config)
    run_id = run_id or uuid.uuid4().hex
    module.manifest = _manifest(config, tuner, data, run_id)
    if config.resume:
        check_resume(ckpt, saved, module.manifest, config.steps, ADDED_SETTINGS)
    precision = config.precision
    if precision == "auto":
        precision = default_precision(config.accelerator)
    tuner.config.recipe = recipe(config, run_id, precision)

    state.created = primary and not output.exists()  # else never removed: it is a run
    start = time.perf_counter()
    with replacing(output, ckpt, enabled=primary and config.overwrite):
        _fit(trainer, module, data, config, stop, state)
    if trainer.global_rank != 0:
        return output
    _write_tuner(trainer, module, tuner, output, time.perf_counter() - start)
    state.tuner_written = True
    _publish(config, output)
    return output


def meta_loss_curve(csv_path: Path, windows: int = 10) -> str | None:
    """The logged meta-loss as ``windows`` means over equal ranges of meta-steps
    (``"1-50: 0.412; 51-100: 0.388; ..."``), for the model card; None without a log."""
    import csv

    if not csv_path.is_file():
        return None
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("meta_loss") and r.get("step")]
    points = sorted((int(r["step"]) + 1, float(r["meta_loss"])) for r in rows)
    if not points:
        return None
    last = points[-1][0]
    width = max(1, -(-last // windows))
    parts = []
    for lo in range(1, last + 1, width):
        hi = min(lo + width - 1, last)
        values = [v for step, v in points if lo <= step <= hi]
        if values:
            parts.append(f"{lo}-{hi}: {sum(values) / len(values):.3f}")
    return "; ".join(parts)


def _write_tuner(trainer, module, tuner, output: Path, seconds: float) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tuner.config.metrics = dict(metrics, steps=trainer.global_step, wall_time_s=round(seconds, 1))
    curve = meta_loss_curve(output / "logs" / "metrics.csv")
    if curve:
        tuner.config.metrics["meta_loss_curve"] = curve
    if trainer.world_size > 1:
        tuner.config.metrics.update(
            world_size=trainer.world_size,
            replicas_identical=module.replicas_match,
            sharded=module.sharded,
        )
    tuner.save_pretrained(output)


def _publish(config: PretrainConfig, output: Path) -> None:
    from rich.console import Console

    from tuner_zoo.resolve import register_local, zoo_name

    console = Console(stderr=True)
    console.print(f"[green]tuner written to {output}[/green]")
    name = zoo_name(config.name, output)
    if name is not None:
        where = register_local(name, output, overwrite=True)  # checked before training
        console.print(f"registered in the local zoo as [bold]{name}[/bold] ({where})")
    if config.push_to_hub:
        from tuner_zoo.publish import push_folder

        try:
            url = push_folder(output, config.push_to_hub)
        except OSError as err:
            raise OSError(
                f"{err}. The tuner is saved in {output}; upload it later with: tuner-zoo push "
                f"{output} {config.push_to_hub}"
            ) from None
        console.print(f"pushed to the Hub: {url}")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user error (one line), 130 interrupted."""
    state = RunState()

    def body() -> int:
        config = parse(argv, description=__doc__)
        try:
            run(config, state)
        except Exception:
            state.discard_empty_output()
            raise
        return 0

    return run_command(PROG, body, on_interrupt=state.report)


if __name__ == "__main__":
    sys.exit(main())
