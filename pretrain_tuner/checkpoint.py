"""Checkpoints of meta-training: written atomically, read without unpickling code, and tied to
the run that wrote them.

* :class:`AtomicCheckpointIO` writes ``last.ckpt`` to a temporary file in the same folder,
  fsyncs it and renames it over the old one, so a full disk (or a crash) during a save leaves
  the previous checkpoint whole. It loads with ``weights_only=True`` always, whatever
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: a checkpoint of this command holds tensors and
  plain values only, so a file that needs more is not one of ours and is refused.
* The run manifest (:func:`run_manifest`), stored in every checkpoint, records what decides the
  result: every setting but those a resumed run may change, the hash of the meta-training
  batches and of the initial tuner. :func:`check_resume` compares it with the resumed run's
  before any training.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from l2l.io import atomic_file
from llm.cli import UsageError

MANIFEST_KEY = "run_manifest"
MANIFEST_VERSION = 1
DISTRIBUTED_METADATA = "meta.pt"  # the non-tensor part of a distributed (FSDP2) checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (truncated, not ours, or holding code)."""


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True`` pinned; an unreadable or unsafe file is a
    :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        what = str(err).split("\n", 1)[0].strip()
        raise CheckpointError(
            f"{path}: refusing to load it: it holds objects a pretrain-tuner checkpoint never "
            f"holds ({what}), so it was not written by this command; start a new run with "
            "--overwrite (or another --output)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).split("\n", 1)[0].strip()
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged: {reason}); nothing "
            "was changed. Start over with --overwrite, or put a good copy in its place"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O with atomic saves and safe loads (module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        # serialised in memory first, as Lightning's own writer does: torch's zip writer turns
        # a failed write into an opaque RuntimeError, a plain file write raises the OSError
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with atomic_file(path) as tmp, open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
        except OSError as err:
            raise OSError(
                f"could not write the checkpoint {path} ({err.strerror or err}); the previous "
                "checkpoint is unchanged"
            ) from None

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict:
        return safe_load(path, map_location=map_location or "cpu")


def read_checkpoint_meta(path: Path) -> dict:
    """The non-tensor part of a checkpoint file (memory-mapped) or folder (FSDP2), safely."""
    if path.is_dir():
        return safe_load(path / DISTRIBUTED_METADATA)
    return safe_load(path, mmap=True)


def saved_step(path: Path) -> int | None:
    """The meta-step of the checkpoint at ``path``; None when there is no readable one."""
    try:
        return int(read_checkpoint_meta(path).get("global_step", 0))
    except (OSError, ValueError):
        return None


def _sha256(chunks: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def batches_hash(batches: Sequence[Sequence[Any]]) -> str:
    """sha256 of the meta-training batches (every example's prompt, candidates and answers)."""
    rows = [
        json.dumps([e.prompt, e.candidates, e.answer, e.references]).encode()
        for batch in batches
        for e in batch
    ]
    return _sha256(rows + [str(len(b)).encode() for b in batches])


def tensors_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters (names, dtypes, shapes and bytes)."""
    rows = []
    for name, p in module.named_parameters():
        data = p.detach().to("cpu").contiguous().flatten().view(torch.uint8).numpy().tobytes()
        rows += [f"{name}:{p.dtype}:{tuple(p.shape)}".encode(), data]
    return _sha256(rows)


def run_manifest(settings: dict, data_sha256: str, tuner_sha256: str, run_id: str) -> dict:
    return dict(
        version=MANIFEST_VERSION,
        run_id=run_id,
        settings=settings,
        data_sha256=data_sha256,
        tuner_sha256=tuner_sha256,
    )


def _differences(saved: dict, now: dict, added: dict | None = None) -> list[str]:
    changed, added = [], added or {}
    for key in sorted(set(saved["settings"]) | set(now["settings"])):
        old, new = saved["settings"].get(key, added.get(key)), now["settings"].get(key)
        if old != new:
            changed.append(f"--{key} is {new!r}, the checkpoint's run used {old!r}")
    if saved["data_sha256"] != now["data_sha256"]:
        changed.append("the meta-training data differ (a task file was edited or replaced)")
    if saved["tuner_sha256"] != now["tuner_sha256"]:
        changed.append("the initial tuner differs")
    return changed


def check_resume(
    path: Path, meta: dict, manifest: dict, steps: int | None, added: dict | None = None
) -> None:
    """Check that the checkpoint at ``path`` (its non-tensor part ``meta``) continues this run:
    the same manifest, and ``steps`` (if set) past its step. A setting in ``added`` (name: the
    value runs had before it existed) that the checkpoint lacks counts as that value. Raises
    :class:`UsageError`."""
    saved = meta.get(MANIFEST_KEY)
    if not isinstance(saved, dict) or saved.get("version") != MANIFEST_VERSION:
        raise UsageError(
            f"--resume: {path} has no run manifest (version {MANIFEST_VERSION}), so it cannot "
            "be checked against this run; start over with --overwrite"
        )
    changed = _differences(saved, manifest, added)
    if changed:
        raise UsageError(
            f"--resume: {'; '.join(changed)}. A resumed run must use the same settings and "
            "data: rerun with the checkpoint's, or start a new run with --overwrite"
        )
    done = int(meta.get("global_step", 0))
    if steps is not None and steps <= done:
        raise UsageError(
            f"--steps {steps}: the checkpoint is at meta-step {done} already; pass --steps "
            f"above {done} to continue"
        )
