"""The tiny checkpoint MeZO's paper describes: initial weights + one (seed, scalars) per step.

A :class:`Trajectory` is written as JSON (floats as exact shortest-repr decimals, so every
projected gradient round-trips bit-for-bit). :func:`replay` rebuilds the fine-tuned parameters from
the initial ones by re-running each recorded update with the same code the optimizer used. z is a
pure function of the step seed (:mod:`l2l.z`, the same numbers on every device), and the file
names its generator: a trajectory is replayed with the z it was recorded with, or refused.
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
from l2l.z import GENERATOR

FORMAT = "l2l-trajectory"
#: 2: z from the counter-based generator named in the file (1: torch's per-device generators).
VERSION = 2


@dataclass
class Trajectory:
    method: str
    hparams: dict[str, Any]
    fingerprint: str
    records: list[StepRecord] = field(default_factory=list)
    generator: str = GENERATOR  # the z the records were computed with

    @classmethod
    def from_optimizer(cls, opt: ZOOptimizer) -> Trajectory:
        if opt.records is None:
            raise ValueError("the optimizer was built without record=True: nothing to save")
        return cls(type(opt).__name__, opt.hparams(), opt.blocks.fingerprint(), list(opt.records))

    def to_dict(self) -> dict[str, Any]:
        return dict(
            format=FORMAT,
            version=VERSION,
            generator=self.generator,
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
        _check_version(path, data.get("version"), data.get("generator"))
        records = [StepRecord(**r) for r in data["records"]]
        return cls(data["method"], data["hparams"], data["fingerprint"], records, data["generator"])


def _check_version(path, version: Any, generator: Any) -> None:
    """Refuse a trajectory whose records were computed with another z than this l2l's."""
    if version == 1:
        raise ValueError(
            f"{path} is a version-1 trajectory: its z came from torch's per-device random "
            "generators (torch.Generator + normal_), whose numbers differ between CPU and CUDA "
            "and between GPU models and which this l2l no longer uses, so its recorded steps "
            "cannot be replayed exactly. Replay it with the l2l-zo release that wrote it, on the "
            f"device type that recorded it, or fine-tune again to get a version-{VERSION} "
            f"trajectory (z from {GENERATOR!r})"
        )
    if version != VERSION:
        raise ValueError(
            f"{path}: trajectory format version {version!r}, but this l2l-zo reads version "
            f"{VERSION}: upgrade l2l-zo to read a newer file"
        )
    if generator != GENERATOR:
        raise ValueError(
            f"{path}: its steps were computed with z generator {generator!r}, this l2l-zo draws "
            f"z with {GENERATOR!r}: replaying would apply the recorded steps to a different z. "
            "Use the l2l-zo release that wrote it"
        )


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
    _check_version("the trajectory", VERSION, trajectory.generator)
    hp = dict(trajectory.hparams)
    if trajectory.method == "HiZOO":
        hp.setdefault("sqrt", "torch")  # recorded before HiZOO's sqrt(H) was correctly rounded
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
