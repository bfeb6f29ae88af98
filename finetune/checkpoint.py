"""What ``--resume`` checks: the run it continues is the run it would compute again.

A save records, next to the optimizer's small state (``state.json``, see :mod:`finetune.run`),

* the run's *identity*: the SHA-256 of the tuner's weights, of the task's examples (every split,
  in order) and the generator of z (a pure function of seed, block and element, the same on
  every device);
* how many trajectory records it covers and their SHA-256.

:func:`check_resume` refuses, with a message that names what differs, a changed setting (all of
them but :data:`finetune.config.RESUME_MAY_CHANGE`), a changed identity, and a trajectory that
does not hold exactly the saved records. A trajectory may carry records *after* the saved
step when the last save was cut off between its two files (the trajectory is written first);
those are dropped, since the records up to the saved step match the saved digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from finetune.config import RESUME_MAY_CHANGE
from l2l import Trajectory
from l2l.methods.base import StepRecord
from llm.cli import UsageError

IDENTITY_KEYS = {
    "tuner_sha256": "the tuner's weights",
    "data_sha256": "the task's examples (the data file or the task's source changed)",
    "z_generator": "the generator of z (another l2l version draws other directions)",
}


def tensors_digest(module: torch.nn.Module | None) -> str | None:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state (None: no module)."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_digest(task) -> str:
    """SHA-256 of the task's train, dev and test examples, in order."""
    splits = {s: [asdict(e) for e in task.split(s)] for s in ("train", "dev", "test")}
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def records_digest(records: list[StepRecord]) -> str:
    text = json.dumps([r.to_dict() for r in records], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def records_summary(records: list[StepRecord]) -> dict[str, Any]:
    """What ``state.json`` keeps about the trajectory it belongs to."""
    return dict(count=len(records), sha256=records_digest(records))


def _fail(folder: Path, what: str) -> UsageError:
    return UsageError(
        f"--resume: {what}; resume with the same inputs and settings, or start again with "
        f"--overwrite or a new --output (the run in {folder} is unchanged)"
    )


def check_settings(folder: Path, saved: dict, now: dict) -> None:
    for key, value in now.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            raise _fail(folder, f"{key} was {saved.get(key)!r}, now {value!r}")
    if now["steps"] < saved.get("steps_done", 0):
        raise _fail(folder, f"--steps {now['steps']} is below the {saved['steps_done']} steps done")


def check_identity(folder: Path, saved: dict | None, now: dict) -> None:
    if saved is None:
        raise _fail(folder, "state.json records no tuner and data hashes to check")
    for key, what in IDENTITY_KEYS.items():
        if saved.get(key) != now.get(key):
            raise _fail(folder, f"{what} differ from the saved run's ({key})")


def records_to_replay(folder: Path, state: dict, traj: Trajectory) -> list[StepRecord]:
    """The records up to the saved step, checked against the digest the save recorded."""
    done = int(state["zo"]["step_count"])
    expected = state.get("records") or {}
    kept = [r for r in traj.records if r.step < done]
    steps = [r.step for r in kept]
    if steps != sorted(set(steps)):
        raise _fail(folder, f"{folder / 'trajectory.json'} holds repeated or unordered steps")
    if len(kept) != expected.get("count"):
        raise _fail(
            folder,
            f"{folder / 'trajectory.json'} holds {len(kept)} records before step {done} but the "
            f"saved state covers {expected.get('count')}: the trajectory is not this run's",
        )
    if records_digest(kept) != expected.get("sha256"):
        raise _fail(
            folder, f"{folder / 'trajectory.json'} is not the trajectory of the saved state"
        )
    return kept


def check_resume(
    folder: Path,
    state: dict,
    traj: Trajectory,
    *,
    config: dict,
    identity: dict,
    fingerprint: str,
) -> list[StepRecord]:
    """Every check of the module docstring; returns the records to replay."""
    if traj.fingerprint != fingerprint:
        raise _fail(folder, f"{folder / 'trajectory.json'} was recorded on another model")
    saved = dict(state["results"]["config"], steps_done=state["results"].get("steps_done", 0))
    check_settings(folder, saved, config)
    check_identity(folder, state.get("identity"), identity)
    return records_to_replay(folder, state, traj)
