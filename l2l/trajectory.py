"""The tiny checkpoint MeZO's paper describes: initial weights + one (seed, scalars) per step.

A :class:`Trajectory` is written as JSON (floats as exact shortest-repr decimals, so every
projected gradient round-trips bit-for-bit). :func:`replay` rebuilds the fine-tuned parameters from
the initial ones by re-running each recorded update with the same code the optimizer used, so the
result is bit-for-bit the same on the same device type (CPU and CUDA random streams differ).
For 20k MeZO steps without a tuner it is ~3 MB of JSON (~140 bytes a step); with a tuner each step
also stores one scale per block.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2l.io import write_json
from l2l.methods.base import StepRecord, ZOOptimizer

FORMAT = "l2l-trajectory"
VERSION = 1


@dataclass
class Trajectory:
    method: str
    hparams: dict[str, Any]
    fingerprint: str
    records: list[StepRecord] = field(default_factory=list)

    @classmethod
    def from_optimizer(cls, opt: ZOOptimizer) -> Trajectory:
        if opt.records is None:
            raise ValueError("the optimizer was built without record=True: nothing to save")
        return cls(type(opt).__name__, opt.hparams(), opt.blocks.fingerprint(), list(opt.records))

    def to_dict(self) -> dict[str, Any]:
        return dict(
            format=FORMAT,
            version=VERSION,
            method=self.method,
            hparams=self.hparams,
            fingerprint=self.fingerprint,
            records=[r.to_dict() for r in self.records],
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a truncated file."""
        return write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a valid trajectory file (JSON error: {e})") from e
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an l2l trajectory (format={data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: trajectory version {data.get('version')} != {VERSION}")
        records = [StepRecord(**r) for r in data["records"]]
        return cls(data["method"], data["hparams"], data["fingerprint"], records)


def _method_class(name: str) -> type[ZOOptimizer]:
    from l2l import methods

    cls = getattr(methods, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ZOOptimizer)):
        raise ValueError(f"unknown ZO method {name!r} in trajectory")
    return cls


@torch.no_grad()
def replay(params: nn.Module | Any, trajectory: Trajectory | str | os.PathLike) -> ZOOptimizer:
    """Apply a recorded trajectory in place to ``params`` (a module or tensors at their initial
    values). Returns the optimizer in its final state (e.g. to continue training)."""
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    hp = dict(trajectory.hparams)
    opt = _method_class(trajectory.method)(params, **hp)
    if opt.blocks.fingerprint() != trajectory.fingerprint:
        raise ValueError(
            "the parameters do not match the trajectory's blocks (fingerprint "
            f"{opt.blocks.fingerprint()[:12]} != {trajectory.fingerprint[:12]}): replay needs the "
            "same model the trajectory was recorded on"
        )
    apply_records(opt, trajectory.records)
    return opt


@torch.no_grad()
def apply_records(opt: ZOOptimizer, records: list[StepRecord]) -> None:
    """Re-apply recorded updates to ``opt``'s parameters (at the values the records start
    from), appending them to ``opt.records`` when it keeps them. Used by replay and resume."""
    for record in records:
        opt._apply(record)
        opt.step_count = record.step + 1
        if opt.records is not None:
            opt.records.append(record)
