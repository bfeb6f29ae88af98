"""The settings of ``pretrain-tuner``: three dataclasses whose field docstrings are ``--help``.

The command line is parsed with jsonargparse, not LightningCLI. LightningCLI builds its flags
from the signatures of the Trainer, the LightningModule and the DataModule, under nested keys
(``--trainer.max_steps``, ``--model.lr_tuner``); the three commands of this project share one
flat vocabulary instead (``--steps``, ``--devices``, ``--batch_size``), and the run builds its
module from objects that are not settings (the loaded base model, a tuner sized by its parameter
blocks). A flat dataclass parsed with jsonargparse gives the same recipe files (``--config
FILE.yaml``, ``--print_config``) with the vocabulary kept, and :func:`check` refuses a bad value
before any work with a message naming the flag, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from llm.cli import HelpFormatter, UsageError, add_dataclass_flags, dataclass_from, parse_flags

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
OBJECTIVES = ("auto", "classification", "lm")
_ZOO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(kw_only=True)
class Inputs:
    """What to meta-train, and where the tuner goes."""

    model: str
    """base model: a Hugging Face id, a local folder, or built-in tiny-llama, tiny-opt,
    smollm2-135m"""
    task: list[str] | str
    """one or more meta-training tasks (names or .jsonl/.csv files): --task tweets, or a list:
    --task [tweets,nyt-editorials]"""
    output: Path
    """folder for the tuner (config.json, model.safetensors, README.md), its checkpoints/ and
    logs/"""
    model_revision: str | None = None
    """revision (branch, tag or commit) of the base model, recorded in the tuner's config"""
    name: str | None = None
    """name in the local zoo (finetune --tuner NAME finds it); none: the output folder's name;
    'none' to skip registering"""
    push_to_hub: str | None = None
    """also upload the tuner to this Hub repo (owner/name)"""
    overwrite: bool = False
    """replace a finished run in --output (nothing of it is kept) and a zoo entry of the same
    name"""
    resume: bool = False
    """continue the run in --output from checkpoints/last.ckpt, with the same settings"""
    trust_remote_code: bool = False
    """allow custom model code from the Hub"""


@dataclass(kw_only=True)
class Recipe:
    """Meta-training recipe (defaults: ZO Fine-tuner's, for Llama-3.2-1B on COPA)."""

    steps: int | None = None
    """stop after this many meta-steps; none: --max_epochs decides"""
    max_epochs: int = 15
    """passes over the meta-training batches"""
    batch_size: int = 8
    """examples per meta-step (the global batch: split over data-parallel ranks)"""
    n_train: int = 1000
    """training examples drawn from each task"""
    mix: Literal["mixed", "alternating"] = "mixed"
    """how tasks share batches: mixed (shuffled together) or alternating (one task per batch)"""
    objective: Literal["auto", "classification", "lm"] = "auto"
    """loss of the meta-step: auto (the tasks' default), classification or lm"""
    eps: float = 1e-3
    """perturbation scale of the ZO estimate"""
    lr_update: float = 1e-6
    """step size of the look-ahead ZO update"""
    lr_tuner: float = 0.1
    """SGD learning rate of the tuner"""
    lr_model: float = 0.01
    """first-order learning rate of the base model between meta-steps (0: frozen)"""
    momentum: float = 0.8
    """SGD momentum of the base model's first-order steps"""
    reset_every: int = 5
    """reset the base model to its pretrained weights every K epochs (0: never)"""
    feature_scaling: Literal["asinh", "raw"] = "asinh"
    """transform of the tuner's input features"""
    init: Literal["constant", "weight-rms"] = "constant"
    """the tuner's block scales at the start: constant (sigma_b = 1: MeZO) or weight-rms (each
    block's weight RMS: the hand-made heuristic of finetune --tuner weight-rms)"""
    anchor: float = 0.0
    """pull the learned block scales towards the initial ones (--init): adds anchor x
    sum_b d_b^2 to the tuner's objective, d = log sigma - log sigma_init, each centred over the
    blocks (the overall size does not count). 0: off"""
    normalize: bool = True
    """normalise the block scales so that the perturbation keeps its overall size (nf)"""
    grad_clip: float = 1.0
    """clip the tuner's gradient norm to this (0: no clipping)"""
    max_length: int = 256
    """longest tokenised example, in tokens"""
    seed: int = 0
    """seed of the data order, the tuner's initialisation and every step's direction z"""


@dataclass(kw_only=True)
class Hardware:
    """Hardware and engineering (Lightning)."""

    accelerator: str = "auto"
    """auto, cpu or gpu"""
    devices: int | str = 1
    """devices per node (more than 1: data parallel; auto: all of them)"""
    num_nodes: int = 1
    """machines taking part"""
    strategy: str = "auto"
    """auto (ddp for several devices), ddp, or fsdp (FSDP2: every decoder layer sharded)"""
    precision: str = "auto"
    """32-true, bf16-mixed or bf16-true (the tuner stays float32); auto: bf16-mixed on a GPU,
    32-true on the CPU"""
    dtype: str = "float32"
    """dtype the base model is loaded in"""
    keep_z: bool | None = None
    """keep each meta-step's direction z in memory (one float32 copy of the model) instead of
    drawing it five times; the result is the same. Default: keep it when the model is on the
    CPU, where a draw costs more than a forward"""
    checkpoint_every: int = 50
    """write checkpoints/last.ckpt every N meta-steps (and at the end)"""
    log_every: int = 1
    """log metrics (logs/metrics.csv) every N meta-steps"""
    progress: bool = True
    """show a progress bar"""


@dataclass(kw_only=True)
class PretrainConfig(Hardware, Recipe, Inputs):
    """Every setting of one ``pretrain-tuner`` run (see the three groups above)."""

    @property
    def tasks(self) -> list[str]:
        """``--task`` as a list (a single value may also be comma-separated)."""
        if isinstance(self.task, str):
            return [t.strip() for t in self.task.split(",") if t.strip()]
        return list(self.task)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["task"], out["output"] = self.tasks, str(self.output)
        return out


GROUPS = (Inputs, Recipe, Hardware)


def build_parser(description: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog="pretrain-tuner",
        description=description,
        exit_on_error=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="read settings from a YAML file")
    for group in GROUPS:
        add_dataclass_flags(parser, group)
    return parser


def parse(argv: Sequence[str] | None = None, description: str | None = None) -> PretrainConfig:
    """The settings from ``argv`` (and any ``--config`` file), checked (:func:`check`)."""
    namespace = parse_flags(build_parser(description), argv)
    config = dataclass_from(PretrainConfig, namespace)
    check(config)
    return config


def _refuse(flag: str, value: object, allowed: str) -> UsageError:
    return UsageError(f"--{flag} {value}: {allowed}")


def _check_numbers(c: PretrainConfig) -> None:
    positive = ("eps", "lr_update", "lr_tuner")
    for name in positive:
        value = getattr(c, name)
        if not (math.isfinite(value) and value > 0):
            raise _refuse(name, value, "must be a finite number > 0")
    for name in ("lr_model", "grad_clip", "anchor"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0):
            raise _refuse(name, value, "must be a finite number >= 0 (0: off)")
    if not (math.isfinite(c.momentum) and 0 <= c.momentum < 1):
        raise _refuse("momentum", c.momentum, "must be in [0, 1)")
    if c.steps is not None and c.steps < 1:
        raise _refuse("steps", c.steps, "must be >= 1 (leave it unset to let --max_epochs decide)")
    at_least = dict(max_epochs=1, batch_size=1, n_train=1, max_length=2, checkpoint_every=1)
    at_least.update(log_every=1, num_nodes=1, reset_every=0, seed=0)
    for name, low in at_least.items():
        if getattr(c, name) < low:
            raise _refuse(name, getattr(c, name), f"must be a whole number >= {low}")


def _check_choices(c: PretrainConfig) -> None:
    if str(c.precision).startswith("16"):
        raise _refuse(
            "precision",
            c.precision,
            "not supported: the meta-gradient is built from the model's gradients, which "
            "fp16 loss scaling would scale twice; use bf16-mixed, bf16-true or 32-true",
        )
    choices = dict(precision=PRECISIONS, accelerator=ACCELERATORS, objective=OBJECTIVES)
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise _refuse(name, getattr(c, name), f"use one of {', '.join(allowed)}")
    if c.strategy not in STRATEGIES:
        raise _refuse(
            "strategy",
            c.strategy,
            "not supported: use --strategy fsdp (FSDP2, every decoder layer sharded over "
            "all ranks), ddp or auto; see docs/distributed.md",
        )
    devices = c.devices
    if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        raise _refuse("devices", devices, "must be a whole number >= 1 or auto")


def _check_names(c: PretrainConfig) -> None:
    if not c.tasks:
        raise _refuse("task", c.task, "name at least one task or .jsonl/.csv file")
    if c.name is not None and c.name.lower() != "none" and not _ZOO_NAME.match(c.name):
        raise _refuse("name", c.name, "use letters, digits, '.', '_' and '-' (or 'none')")
    if c.push_to_hub is not None and not _REPO_ID.match(c.push_to_hub):
        raise _refuse("push_to_hub", c.push_to_hub, "must be a Hub repo id owner/name")
    if c.resume and c.overwrite:
        raise UsageError(
            "--resume continues the run in --output and --overwrite replaces it: pass one of them"
        )


def check(config: PretrainConfig) -> None:
    """Refuse a bad setting (:class:`UsageError` naming the flag, the value, what is allowed)."""
    _check_names(config)
    _check_numbers(config)
    _check_choices(config)


#: Settings a resumed run may change: they do not change the meta-training's result.
RESUMABLE = frozenset(
    {"steps", "max_epochs", "resume", "overwrite", "output", "name", "push_to_hub"}
    | {"checkpoint_every", "log_every", "progress", "keep_z"}
)


#: Settings added after run manifests were first written, with the value that a checkpoint
#: written without them ran with: ``--resume`` of such a checkpoint at that value is no change.
ADDED_SETTINGS = {"init": "constant", "anchor": 0.0}


def decisive_settings(config: PretrainConfig) -> dict:
    """The settings that decide the result (all but :data:`RESUMABLE`), for the run manifest."""
    values = config.to_dict()
    return {f.name: values[f.name] for f in fields(config) if f.name not in RESUMABLE}
