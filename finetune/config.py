"""The settings of a ``finetune`` run: one dataclass, its checks, and the tuner's defaults.

:class:`FinetuneConfig` is what the command line, a ``--config`` YAML file and Python callers
fill in; its field docstrings are the ``--help`` text (the four bases are the help groups).
:meth:`FinetuneConfig.validate` refuses every bad value before any work, with one line that names
the flag, the value and what is allowed. :func:`resolve` fills ``lr``, ``eps`` and ``normalize``
left unset from the tuner and its registry entry, and says where each value came from.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from llm.cli import UsageError

METHODS = ("mezo", "hizoo", "lozo", "lozo-m")
OBJECTIVES = ("auto", "classification", "lm", "accuracy")
STRATEGIES = ("auto", "ddp")
#: finetune's own defaults where neither the user nor the tuner says.
DEFAULT_LR, DEFAULT_EPS, DEFAULT_NORMALIZE = 1e-6, 1e-3, True
#: Where a resolved value came from (results.json ``resolved``).
SOURCES = ("user", "tuner", "registry", "default")
#: ``--tuner`` names that select a hand-made block scale of :mod:`l2l.scales` instead of a tuner.
HEURISTIC_SCALES = ("weight-rms",)


@dataclass
class ModelArgs:
    """Model, tuner and data"""

    model: str | None = None
    """Hub id, local folder or .gguf file, or a built-in model: tiny-llama, tiny-opt,
    smollm2-135m; none: the tuner's base model"""
    tuner: str = "none"
    """tuner folder, name in the local zoo, bundled or registry name, or Hub repo id (tuner-zoo
    list shows them); none for the plain method; weight-rms for the hand-made per-block scale
    (each block perturbed in proportion to its weights' RMS, no learned tuner)"""
    tuner_revision: str | None = None
    """Hub revision (branch, tag or commit) of a --tuner given as a repo id"""
    force_download: bool = False
    """fetch the --tuner from the Hub again even when it is cached"""
    task: str | None = None
    """task name (finetune --list_tasks shows them) or a .jsonl/.csv file"""
    template: str | None = None
    """prompt template of a local classification file, e.g. '{text} It was'"""
    label_words: str | None = None
    """the word each label of a local classification file is scored as, e.g.
    'positive=great,negative=terrible'"""
    n_train: int = 1000
    """training examples drawn from the task (with --seed)"""
    n_dev: int = 500
    """dev examples drawn from the task (with --seed)"""
    n_test: int = 1000
    """test examples (the same ones for every seed)"""
    max_length: int | None = None
    """tokens per example, longer prompts lose tokens on the left; none: the task's, 256, or
    2048 for the long-passage tasks multirc, record, squad and drop"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the model's weights are loaded and trained in"""
    peft: Literal["lora"] | None = None
    """train LoRA adapters (peft) instead of all weights; not with a --tuner"""
    lora_r: int = 8
    """LoRA rank (with --peft lora)"""
    trust_remote_code: bool = False
    """allow custom model code from the Hub"""


@dataclass
class OptimArgs:
    """Optimisation"""

    method: Literal["mezo", "hizoo", "lozo", "lozo-m"] = "mezo"
    """zeroth-order method: mezo (ZO-SGD), hizoo (diagonal Hessian), lozo (low-rank z),
    lozo-m (LOZO with momentum)"""
    objective: Literal["auto", "classification", "lm", "accuracy"] = "auto"
    """training loss: auto (the task's default), classification (cross-entropy over the
    candidates), lm (the gold answer's LM loss) or accuracy (non-differentiable)"""
    steps: int = 100
    """optimizer steps (with --resume: the total, so a larger value extends a run)"""
    lr: float | None = None
    """learning rate; none: the tuner's registry recommendation, else 1e-6"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """learning rate over the steps after warmup: constant, linear decay to 0, or cosine to 0"""
    warmup_steps: int = 0
    """steps of linear warmup from 0 to --lr"""
    eps: float | None = None
    """perturbation scale epsilon; none: the eps the tuner was meta-trained with, else 1e-3"""
    normalize: bool | None = None
    """rescale the tuner's per-block scales so the perturbation keeps its overall size; none:
    as the tuner was meta-trained (on without a tuner)"""
    weight_decay: float = 0.0
    """weight decay lambda (not on biases and norm weights)"""
    batch_size: int = 16
    """examples per step (the global batch, split over the ranks)"""
    seed: int = 0
    """seed of the step directions and of the train/dev draw"""
    rank: int = 2
    """LOZO rank r of the direction z = U V^T"""
    nu: int = 50
    """LOZO steps between redraws of V"""
    momentum: float = 0.9
    """LOZO-M momentum beta, in [0, 1)"""
    hessian_smooth: float = 1e-8
    """HiZOO Hessian EMA rate alpha, in [0, 1]"""
    on_nonfinite: Literal["raise", "warn", "skip"] = "raise"
    """what a NaN/inf loss does: stop (raise), or skip the step with (warn) or without a
    warning; the weights are never touched by it"""


@dataclass
class OutputArgs:
    """Evaluation and output"""

    eval_every: int = 0
    """evaluate on dev every N steps (0: never)"""
    eval_examples: int = 200
    """dev examples per evaluation (the final test evaluation uses all --n_test examples)"""
    output: str = "runs/finetune"
    """folder of results.json, trajectory.json, state.json and model/"""
    resume: bool = False
    """continue the run saved in --output (every setting must be the same, --steps may grow)"""
    overwrite: bool = False
    """replace a run already in --output (every file of it is removed first)"""
    save_model: bool = False
    """also write the fine-tuned weights to --output/model (trajectory.json rebuilds them)"""
    checkpoint_every: int = 50
    """save progress every N steps (0: only at the end and on an interrupt)"""
    progress: bool = True
    """show a progress bar"""
    logger: Literal["csv", "tensorboard", "wandb", "none"] = "csv"
    """where the per-step metrics go (Lightning's loggers), under --output/logs: csv,
    tensorboard or wandb (when installed), or none"""
    log_every: int = 10
    """log train loss, lr, projected gradient and steps/s every N steps; without a progress bar
    (--no_progress, or stdout not a terminal) also print them as a line"""
    push_to_hub: str | None = None
    """Hub repo (USER/REPO) to upload the finished fine-tune to as kilobytes: trajectory.json,
    results.json and a model card with the weights' sha256 (l2l replay REPO rebuilds them)"""


@dataclass
class DeviceArgs:
    """Devices (Lightning Fabric)"""

    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    """where the model runs"""
    devices: int | str = 1
    """processes/devices: a count, auto, or a list such as 0,1"""
    num_nodes: int = 1
    """machines taking part (each runs --devices processes)"""
    strategy: str = "auto"
    """auto (one process) or ddp (data parallel: the same step seed on every rank, a few bytes
    of losses all-reduced per step)"""
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = None
    """split a model too big for one GPU over the visible GPUs (accelerate's device_map,
    consecutive layers on consecutive GPUs); one process, not with ddp"""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: int):
    return lambda v: _is_int(v) and v >= low


def _devices(v: Any) -> bool:
    if _is_int(v):
        return v >= 1 or v == -1
    return v == "auto" or bool(re.fullmatch(r"\d+(,\d+)*,?", str(v)))


#: field -> (check, what is allowed). Literal fields are checked against their choices.
RULES: dict[str, tuple[Any, str]] = {
    "n_train": (_at_least(1), "an integer >= 1"),
    "n_dev": (_at_least(0), "an integer >= 0"),
    "n_test": (_at_least(0), "an integer >= 0"),
    "max_length": (
        lambda v: v is None or _at_least(2)(v),
        "an integer >= 2 (one prompt token and one answer token at least)",
    ),
    "lora_r": (_at_least(1), "an integer >= 1"),
    "steps": (_at_least(1), "an integer >= 1"),
    "warmup_steps": (_at_least(0), "an integer >= 0"),
    "log_every": (_at_least(1), "an integer >= 1"),
    "lr": (lambda v: v is None or (_is_number(v) and v > 0), "a finite number > 0"),
    "eps": (lambda v: v is None or (_is_number(v) and v > 0), "a finite number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "batch_size": (_at_least(1), "an integer >= 1"),
    "seed": (_at_least(0), "an integer >= 0"),
    "rank": (_at_least(1), "an integer >= 1"),
    "nu": (_at_least(1), "an integer >= 1"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "hessian_smooth": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "eval_every": (_at_least(0), "an integer >= 0"),
    "eval_examples": (_at_least(0), "an integer >= 0"),
    "checkpoint_every": (_at_least(0), "an integer >= 0"),
    "num_nodes": (_at_least(1), "an integer >= 1"),
    "devices": (_devices, "a count >= 1, -1 (all), auto, or a device list such as 0,1"),
    "output": (lambda v: bool(str(v).strip()), "a folder path"),
    "push_to_hub": (lambda v: v is None or str(v).count("/") == 1, "a repo id USER/REPO"),
}

#: Settings that may differ on ``--resume``: they do not change what the run computes.
RESUME_MAY_CHANGE = (
    "output", "resume", "overwrite", "steps", "checkpoint_every", "save_model", "progress",
    "trust_remote_code", "force_download", "push_to_hub", "logger", "log_every",
)  # fmt: skip


def _literal_choices(name: str) -> tuple | None:
    hint = typing.get_type_hints(FinetuneConfig)[name]
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            optional = type(None) in typing.get_args(hint)
            return typing.get_args(arg) + ((None,) if optional else ())
    return None


def allowed(name: str) -> str:
    """What ``--name`` accepts, in words (for error messages)."""
    if name in RULES:
        return RULES[name][1]
    choices = _literal_choices(name)
    if choices:
        return "one of " + ", ".join("null" if c is None else str(c) for c in choices)
    if name == "strategy":
        return "one of " + ", ".join(STRATEGIES)
    return "a value of type " + str(typing.get_type_hints(FinetuneConfig)[name])


@dataclass
class FinetuneConfig(DeviceArgs, OutputArgs, OptimArgs, ModelArgs):
    """Every setting of a fine-tuning run (the fields of the four groups, in one flat record)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.output).expanduser()

    @property
    def uses_tuner(self) -> bool:
        """A learned tuner is loaded (not ``none``, not a hand-made scale)."""
        return self.tuner.strip().lower() not in ("none", *HEURISTIC_SCALES)

    @property
    def heuristic_scale(self) -> str | None:
        """The hand-made block scale ``--tuner`` names (``weight-rms``), else None."""
        name = self.tuner.strip().lower()
        return name if name in HEURISTIC_SCALES else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> FinetuneConfig:
        """Raise :class:`UsageError` on the first bad value or combination; returns ``self``."""
        for f in fields(self):
            value = getattr(self, f.name)
            check = RULES.get(f.name, (None,))[0]
            choices = _literal_choices(f.name)
            if (check and not check(value)) or (choices and value not in choices):
                raise UsageError(f"--{f.name} {_show(value)}: expected {allowed(f.name)}")
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        if not self.task:
            raise UsageError(
                "--task is required: a task name (finetune --list_tasks) or a .jsonl/.csv file"
            )
        task = Path(self.task).expanduser()
        if task.is_dir():
            raise UsageError(f"--task {self.task} is a directory: pass a .jsonl or .csv file")
        strategy = self.strategy.lower()
        if strategy.startswith(("fsdp", "deepspeed")):
            raise UsageError(
                f"--strategy {self.strategy} is not supported: it would shard nothing, as finetune "
                "never hands the model to Fabric (zeroth-order steps need no gradients to shard). "
                "Use --strategy ddp for data parallel, or --device_map auto to split a model too "
                "big for one GPU"
            )
        if strategy not in STRATEGIES:
            raise UsageError(f"--strategy {self.strategy}: expected {allowed('strategy')}")
        if self.device_map and (self.devices != 1 or self.num_nodes > 1 or strategy == "ddp"):
            raise UsageError(
                "--device_map splits one copy of the model over the devices of one process; it "
                "does not combine with --devices > 1 / --num_nodes > 1 / --strategy ddp"
            )
        if self.peft and self.uses_tuner:
            raise UsageError(
                "--peft lora trains adapters, but a tuner predicts one scale per full-weight "
                "block from that block's own statistics and the blocks it was meta-trained on; "
                "LoRA blocks (A, B) are other tensors, starting at zero (B) with other shapes, "
                "so the tuner has no entry for them and its scales would not transfer: use "
                "--tuner none with --peft"
            )
        if self.peft and self.heuristic_scale:
            raise UsageError(
                f"--tuner {self.heuristic_scale} scales each block by its weights' RMS, and "
                "LoRA's B starts at zero, so B would not move: use --tuner none with --peft"
            )
        if self.resume and self.overwrite:
            raise UsageError(
                "--resume continues the run in --output and --overwrite replaces it: pass one"
            )
        if self.tuner_revision and not self.uses_tuner:
            raise UsageError("--tuner_revision needs a --tuner")


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class Resolved:
    """A setting's value and where it came from (one of :data:`SOURCES`)."""

    value: Any
    source: str


def resolve(
    cfg: FinetuneConfig, tuner_config=None, registry_defaults: dict | None = None
) -> tuple[FinetuneConfig, dict[str, Resolved]]:
    """``cfg`` with ``lr``, ``eps`` and ``normalize`` filled in, and their provenance.

    Order: the user's value, then the tuner's config.json (``eps``, ``normalize``: what it was
    meta-trained with), then the tuner's registry entry (``lr``, ``eps``), then finetune's default.
    """
    registry = registry_defaults or {}
    tuner = {}
    if tuner_config is not None:
        tuner = {"eps": tuner_config.eps, "normalize": tuner_config.normalize}
    defaults = {"lr": DEFAULT_LR, "eps": DEFAULT_EPS, "normalize": DEFAULT_NORMALIZE}
    out = {}
    for name, default in defaults.items():
        user = getattr(cfg, name)
        if user is not None:
            out[name] = Resolved(user, "user")
        elif name in tuner:
            out[name] = Resolved(tuner[name], "tuner")
        elif name in registry:
            out[name] = Resolved(registry[name], "registry")
        else:
            out[name] = Resolved(default, "default")
    return replace(cfg, **{k: v.value for k, v in out.items()}), out
