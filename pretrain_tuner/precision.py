"""Lightning precision for meta-training: low precision for the base model, float32 for the tuner.

Lightning's ``bf16-true`` casts the whole LightningModule (the tuner included) to bfloat16 and
makes bfloat16 the default dtype inside every step; ``bf16-mixed`` runs the whole step under
autocast. The tuner's update ``lr_tuner * dL/domega`` is far below bfloat16's resolution at its
weights, and dtype-less tensors built inside the step (z's scratch buffers, the block features,
the initial sigma) would silently change dtype. So:

* :class:`BaseModelHalfPrecision` (``bf16-true``) converts only ``module.model``, the base
  model, before the strategy wraps the module (DDP builds its buckets, FSDP2 its shards, from
  the converted parameters), and keeps float32 the default dtype in the step;
* :class:`Float32Tuner` runs the tuner's forward outside autocast on float32 features (the
  ``bf16-mixed`` case; under ``bf16-true`` autocast is off anyway).

:func:`precision_plugin` picks the plugin for a ``--precision`` value; :func:`default_precision`
resolves ``auto`` from the accelerator the run will use (not from whether a GPU exists).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch import nn


def resolve_accelerator(accelerator: str) -> str:
    """``cpu`` or ``cuda``: what ``--accelerator`` runs on (``auto``: a GPU when there is one)."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else accelerator


def default_precision(accelerator: str) -> str:
    """``--precision auto``: bf16-mixed on a GPU, 32-true on the CPU (CPU bfloat16 is slow)."""
    return "bf16-mixed" if resolve_accelerator(accelerator) == "cuda" else "32-true"


class BaseModelHalfPrecision(HalfPrecision):
    """``bf16-true`` for the base model only: the tuner, and every tensor the step creates
    without a dtype, stay float32."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        module.model.to(dtype=self._desired_input_dtype)
        return module

    def tensor_init_context(self) -> AbstractContextManager:
        return nullcontext()

    def module_init_context(self) -> AbstractContextManager:
        return nullcontext()

    def forward_context(self) -> AbstractContextManager:
        return nullcontext()


def precision_plugin(precision: str, accelerator: str) -> Precision:
    """The Lightning plugin for ``--precision`` (``auto`` resolved by :func:`default_precision`)."""
    if precision == "auto":
        precision = default_precision(accelerator)
    if precision == "bf16-true":
        return BaseModelHalfPrecision("bf16-true")
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", resolve_accelerator(accelerator))
    if precision in ("32-true", "32"):
        return Precision()
    raise ValueError(f"--precision {precision}: use one of 32-true, bf16-mixed, bf16-true")


class Float32Tuner(nn.Module):
    """``tuner`` evaluated in float32, outside autocast (same parameters, no copy).

    It is built per step around the module's tuner, so the tuner's parameter names (and the
    checkpoints) stay those of the tuner itself.
    """

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.tuner = tuner

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.tuner(features.float())
