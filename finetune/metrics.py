"""The learning-rate schedule of a run and where its per-step metrics go.

The lr of step ``t`` is a pure function of ``t`` and the settings (:func:`lr_at`); the optimizer
records it in each step's trajectory entry, so replay and ``--resume`` apply exactly the lr the
step used. Metrics go to Lightning's loggers through Fabric (CSV by default, TensorBoard or wandb
when installed) under ``--output/logs``; without a progress bar a plain line is printed every
``--log_every`` steps, so a long run in a batch job shows it is alive.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.io import LOGS_DIR
from llm.cli import UsageError


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """The lr of step ``step`` (0-based): linear warmup over ``warmup_steps``, then constant,
    linear decay to 0 or cosine decay to 0 over the remaining steps."""
    base, warmup = float(cfg.lr), cfg.warmup_steps
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return base
    span = max(1, cfg.steps - warmup)
    done = min(1.0, (step - warmup) / span)
    if cfg.lr_schedule == "linear":
        return base * (1.0 - done)
    return base * 0.5 * (1.0 + math.cos(math.pi * done))


def make_loggers(cfg: FinetuneConfig) -> list:
    """Fabric loggers for ``--logger`` (none for ``none``), writing under ``--output/logs``."""
    root = str(Path(cfg.output_dir) / LOGS_DIR)
    if cfg.logger == "none":
        return []
    if cfg.logger == "csv":
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger(root, name="", version="")]
    if cfg.logger == "tensorboard":
        try:
            from lightning.fabric.loggers import TensorBoardLogger

            return [TensorBoardLogger(root, name="", version="")]
        except ModuleNotFoundError as err:
            raise UsageError(
                f"--logger tensorboard needs the tensorboard package ({err}): pip install tensorboard"
            ) from err
    try:
        from lightning.pytorch.loggers import WandbLogger

        return [WandbLogger(save_dir=root, project="l2l-finetune")]
    except ModuleNotFoundError as err:
        raise UsageError(
            f"--logger wandb needs the wandb package ({err}): pip install wandb"
        ) from err


def print_line(step: int, total: int, metrics: dict[str, float]) -> None:
    """One plain progress line (when no progress bar is shown)."""
    parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"step {step}/{total} {parts}", file=sys.stdout, flush=True)


def shows_bar(progress: bool) -> bool:
    return progress and sys.stdout.isatty()
