"""``ZOTrainingArguments``: transformers' ``TrainingArguments`` plus the ZO method's settings.

Every ``TrainingArguments`` field keeps its meaning: ``learning_rate`` is the ZO step size
``eta`` (the Trainer's scheduler moves it), ``weight_decay`` the ZO ``lambda``, ``seed`` the
default ZO seed. The ZO settings are the ``zo_*`` fields, so ``HfArgumentParser`` reads them as
``--zo_method lozo --zo_rank 2`` next to ``--learning_rate 1e-6 --max_steps 20000``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from l2l.integrations.objectives import OBJECTIVES
from l2l.methods.base import NONFINITE_POLICIES
from l2l.methods.factory import METHODS


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~l2l.integrations.hf_trainer.ZOTrainer`."""

    zo_method: str = field(default="mezo", metadata=_help(f"ZO method: {', '.join(METHODS)}"))
    zo_eps: float = field(default=1e-3, metadata=_help("perturbation scale epsilon"))
    zo_tuner: str | None = field(
        default=None,
        metadata=_help("learned tuner (folder or Hub repo id) scaling each block's perturbation"),
    )
    zo_tuner_revision: str | None = field(
        default=None, metadata=_help("revision of a Hub --zo_tuner")
    )
    zo_normalize: bool = field(
        default=True, metadata=_help("normalise the tuner's scales so E||u||^2 = d")
    )
    zo_rank: int = field(default=2, metadata=_help("LOZO rank r"))
    zo_nu: int = field(default=50, metadata=_help("LOZO steps between V redraws"))
    zo_momentum: float = field(default=0.9, metadata=_help("LOZO-M momentum beta (lozo-m only)"))
    zo_hessian_smooth: float = field(default=1e-8, metadata=_help("HiZOO EMA rate alpha"))
    zo_objective: str = field(
        default="lm",
        metadata=_help(
            f"what a ZO step measures: {', '.join(OBJECTIVES)} (lm: the Trainer's compute_loss; "
            "see l2l.integrations.objectives)"
        ),
    )
    zo_seed: int | None = field(
        default=None, metadata=_help("base seed of the perturbations (default: --seed)")
    )
    zo_nonfinite: str = field(
        default="raise",
        metadata=_help(f"on a NaN/inf loss: {', '.join(NONFINITE_POLICIES)} (weights untouched)"),
    )
    # a ZO step has no gradient to clip; 0 also keeps a meaningless grad_norm out of the logs
    max_grad_norm: float = field(
        default=0.0, metadata=_help("unused by ZO (no gradients); must stay 0")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.zo_method in METHODS, f"zo_method must be one of {', '.join(METHODS)}"),
            (self.zo_eps > 0, "zo_eps must be > 0"),
            (self.zo_objective in OBJECTIVES, f"zo_objective must be one of {OBJECTIVES}"),
            (self.zo_nonfinite in NONFINITE_POLICIES, f"zo_nonfinite: {NONFINITE_POLICIES}"),
            (self.zo_rank >= 1 and self.zo_nu >= 1, "zo_rank and zo_nu must be >= 1"),
            (0.0 <= self.zo_momentum < 1.0, "zo_momentum must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self._zo_values()})")
        if self.max_grad_norm:
            raise ValueError(
                f"max_grad_norm={self.max_grad_norm}: a ZO step computes no gradient to clip; "
                "leave it at 0 (bound the step with learning_rate and zo_eps instead)"
            )
        if self.fp16:
            raise ValueError(
                "fp16=True scales gradients with a GradScaler, and a ZO step has no gradients: "
                "load the model in float16 or bfloat16 instead (e.g. dtype=torch.bfloat16), or "
                "use bf16=True for bfloat16 autocast"
            )

    def _zo_values(self) -> str:
        keys = ("zo_method", "zo_eps", "zo_objective", "zo_nonfinite", "zo_rank", "zo_nu")
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys + ("zo_momentum",))

    @property
    def zo_base_seed(self) -> int:
        return self.seed if self.zo_seed is None else self.zo_seed

    def zo_config(self) -> dict:
        """The ZO settings and the TrainingArguments that shape the steps (for results.json)."""
        keys = [name for name in self.__dataclass_fields__ if name.startswith("zo_")]
        keys += [
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_steps",
            "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "seed",
        ]  # fmt: skip
        return {k: _plain(getattr(self, k)) for k in keys}


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
