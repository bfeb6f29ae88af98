"""What a shared fine-tune records about itself, and the hash that pins its weights.

A ZO fine-tune is its trajectory: replayed onto the base model it rebuilds the weights. The
record (:class:`FinetuneInfo`) names that base model (id, revision, dtype), how the trajectory
was made (method, tuner and its fingerprint, task, objective) and the sha256 of the weights it
must rebuild (:func:`weights_sha256`), so a replay on another machine is checked, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRAJECTORY_NAME = "trajectory.json"
RESULTS_NAME = "results.json"
CARD_NAME = "README.md"
FINETUNE_FILES = (TRAJECTORY_NAME, RESULTS_NAME, CARD_NAME)
HASH_ALGORITHM = "sha256 over state_dict tensors sorted by name: name, dtype, shape, raw bytes"

#: the numeric evaluation metrics a results file may hold (before/after fine-tuning)
EVAL_METRICS = ("accuracy", "f1", "exact_match")


class FinetuneFormatError(ValueError):
    """A fine-tune folder or repo lacks a file or a field the replay needs."""


class WeightsMismatchError(ValueError):
    """The replayed weights do not hash to the value recorded with the fine-tune."""


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's raw bytes as a buffer (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def weights_sha256(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 of a module's ``state_dict`` (or of a name -> tensor mapping).

    Tensors are taken in sorted name order; each contributes its name, dtype, shape and raw
    bytes, so the digest changes with any bit of any weight, a renamed or retyped tensor.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\0{dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Numeric metrics of a results file: a ``metrics`` dict (ZOTrainer) or finetune's
    ``eval_before``/``eval_after`` evaluations and its last training loss."""
    out = {k: float(v) for k, v in (results.get("metrics") or {}).items() if _is_number(v)}
    for when, key in (("before", "eval_before"), ("after", "eval_after")):
        for name, value in (results.get(key) or {}).items():
            if name in EVAL_METRICS and _is_number(value):
                out[f"{name}_{when}"] = float(value)
    losses = [v for v in results.get("train_loss") or [] if _is_number(v)]
    if losses:
        out.setdefault("train_loss_last", float(losses[-1]))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class FinetuneInfo:
    """The card's machine-readable record of one fine-tune (its YAML ``l2l_finetune`` block)."""

    base_model: str
    method: str
    steps: int
    trajectory_sha256: str
    weights_sha256: str | None = None
    base_model_revision: str | None = None
    dtype: str | None = None
    task: str | None = None
    objective: str | None = None
    tuner: dict[str, Any] | None = None
    peft: str | None = None
    trainer: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trajectory: dict[str, Any] = field(default_factory=dict)  # its header: all but the records
    hash_algorithm: str = HASH_ALGORITHM
    library_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> FinetuneInfo:
        known = {f.name for f in fields(cls)}
        missing = [
            k for k in ("base_model", "method", "steps", "trajectory_sha256") if k not in data
        ]
        if missing:
            raise FinetuneFormatError(f"{source}: the fine-tune record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_results(
        cls,
        results: Mapping[str, Any],
        trajectory_header: Mapping[str, Any],
        steps: int,
        trajectory_sha256: str,
        weights_sha256: str | None = None,
        task: str | None = None,
    ) -> FinetuneInfo:
        """The record of a run from its ``results.json`` (written by ``finetune`` or ZOTrainer)."""
        from l2l import __version__

        config = results.get("config") or {}

        def pick(*keys: str) -> Any:
            for key in keys:
                for source in (results, config):
                    if source.get(key) is not None:
                        return source[key]
            return None

        base_model = pick("base_model", "model")
        if not base_model:
            raise FinetuneFormatError(
                f"{RESULTS_NAME} names no base model (a 'base_model' or 'model' field): replay "
                "needs it"
            )
        return cls(
            base_model=str(base_model),
            method=str(pick("method") or trajectory_header.get("method")),
            steps=int(steps),
            trajectory_sha256=trajectory_sha256,
            weights_sha256=weights_sha256 or pick("weights_sha256"),
            base_model_revision=pick("base_model_revision", "model_revision"),
            dtype=pick("dtype"),
            task=task or pick("task"),
            objective=pick("objective"),
            tuner=results.get("tuner"),
            peft=pick("peft"),
            trainer=pick("trainer") or "finetune",
            metrics=_metrics(results),
            trajectory=dict(trajectory_header),
            library_version=__version__,
        )


def trajectory_header(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a trajectory file but its records (format, version, method, hparams,
    fingerprint and whatever provenance the format records, such as the z generator)."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if k != "records"}
