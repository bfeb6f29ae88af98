"""The Lightning Trainer of a ``pretrain-tuner`` run: strategy, precision, checkpoints, logs.

* Strategy: ``auto`` is one process on one device, and DDP as soon as the run spans several
  devices or nodes. DDP is built with ``find_unused_parameters=True``: the meta-step's first
  backward (the meta-loss) reaches only the base model and its second (the surrogate) only
  the tuner. ``fsdp`` is FSDP2 (:func:`fsdp2`).
* Precision: :mod:`pretrain_tuner.precision` (the tuner stays float32).
* Checkpoints: ``checkpoints/last.ckpt`` every ``--checkpoint_every`` steps and at the end,
  written atomically (:class:`pretrain_tuner.checkpoint.AtomicCheckpointIO`; FSDP2's
  distributed checkpoint folder is staged next to the old one and swapped in).
* Interrupts: :class:`StopOnSignal` turns SIGINT/SIGTERM during training into "finish this
  meta-step, save it, stop".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from pretrain_tuner.checkpoint import AtomicCheckpointIO
from pretrain_tuner.config import PretrainConfig
from pretrain_tuner.precision import precision_plugin, resolve_accelerator

LAST = "last.ckpt"


def device_count(config: PretrainConfig) -> int:
    """Processes the run will have: devices per node (``auto``: every GPU) x nodes."""
    per_node = config.devices
    if per_node == "auto":
        on_gpu = resolve_accelerator(config.accelerator) == "cuda"
        per_node = max(torch.cuda.device_count(), 1) if on_gpu else 1
    return int(per_node) * config.num_nodes


def strategy(config: PretrainConfig):
    """The Lightning strategy for ``--strategy`` (module docstring)."""
    if config.strategy == "fsdp":
        return fsdp2()
    if config.strategy == "ddp" or device_count(config) > 1:
        from lightning.pytorch.strategies import DDPStrategy

        # bucket views: no second copy of the model's gradients (matters for a 13B model)
        return DDPStrategy(
            find_unused_parameters=True,
            gradient_as_bucket_view=True,
            checkpoint_io=AtomicCheckpointIO(),
        )
    return "auto"


def fsdp2():
    """Lightning's ModelParallelStrategy with one data-parallel dimension over every rank.

    Lightning's ``FSDPStrategy`` wraps with FSDP1, which needs CUDA; FSDP2 runs on CPU (gloo) as
    well. ``MetaTunerModule.configure_model`` does the sharding. Checkpoints are distributed (a
    folder, each rank writing its shard), staged in a sibling folder and swapped in by rank 0.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            path = Path(self.broadcast(str(filepath)))
            staged = path.with_name(f".{path.name}.tmp")
            if self.global_rank == 0 and staged.exists():
                shutil.rmtree(staged)
            self.barrier()
            super().save_checkpoint(checkpoint, staged, storage_options)
            self.barrier()
            if self.global_rank == 0:
                _swap_in(staged, path)
            self.barrier()

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
                return super().load_checkpoint(checkpoint_path, weights_only=True)
            finally:
                dcp_state.set_optimizer_state_dict = strict

    return FSDP2()


def _swap_in(staged: Path, target: Path) -> None:
    """Replace the checkpoint folder ``target`` by ``staged`` with renames only."""
    if not target.exists():
        os.rename(staged, target)
        return
    aside = target.with_name(f".{target.name}.old")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(target, aside)
    os.rename(staged, target)
    shutil.rmtree(aside)


class StopOnSignal(Callback):
    """SIGINT or SIGTERM during training: the meta-step under way completes, is saved to
    ``last.ckpt`` and the run stops (every rank at the same step). A second signal stops at
    once, with the last checkpoint written before it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requested: int | None = None  # the signal received
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = signum

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread
                return

    def restore(self) -> None:
        """Put back the handlers that were there before training (idempotent)."""
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def keep_csv_rows(output: Path) -> Callback:
    """A callback that, on --resume, keeps the logged rows of the steps before the checkpoint
    (Lightning's CSVLogger rewrites ``logs/metrics.csv`` when it starts)."""
    import csv

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


def build_trainer(config: PretrainConfig, output: Path, stop: StopOnSignal) -> L.Trainer:
    _quiet_lightning()
    chosen = strategy(config)
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=output / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=config.checkpoint_every,
            save_on_train_epoch_end=True,
        ),
        stop,
    ]
    if config.progress:
        callbacks.append(RichProgressBar())
    if config.resume:
        callbacks.append(keep_csv_rows(output))
    plugins = [precision_plugin(config.precision, config.accelerator)]
    if chosen == "auto":
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=chosen,
        plugins=plugins,
        max_steps=config.steps if config.steps is not None else -1,
        max_epochs=config.max_epochs,
        logger=_loggers(output),
        callbacks=callbacks,
        log_every_n_steps=config.log_every,
        enable_progress_bar=config.progress,
        default_root_dir=output,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
