"""The output folder of a fine-tuning run: crash-safe files, and what may replace what.

Files of a run (each replaced atomically, :mod:`l2l.io`): :data:`RESULTS`, :data:`TRAJECTORY`,
:data:`STATE` and the folder :data:`MODEL_DIR`. A folder holding a run is only continued with
``--resume`` or replaced with ``--overwrite`` (which removes every file of the old run first);
before any expensive work :func:`check_writable` proves a file can be written there, and leaves
no folder behind when it had to create one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from l2l.io import write_json as _write_json
from llm.cli import UsageError

RESULTS, TRAJECTORY, STATE, MODEL_DIR = "results.json", "trajectory.json", "state.json", "model"
LOGS_DIR = "logs"  # the loggers' files (--logger)
RUN_FILES = (RESULTS, TRAJECTORY, STATE, MODEL_DIR, LOGS_DIR)
#: Bytes the write probe writes and fsyncs: a full disk fails there, not after the training.
PROBE_BYTES = 64 * 1024
# how writers that are not Python file objects (safetensors' Rust writer) report a full disk
_DISK_FULL = re.compile(r"no space left|storagefull|code: 28\b|disk quota", re.IGNORECASE)


class OutputError(OSError):
    """The output folder cannot be written (permissions, disk full, not a folder)."""

    def __str__(self) -> str:  # the message, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


def explain_write_error(path: Path, err: BaseException) -> OutputError:
    """An :class:`OutputError` that names ``path`` and says what to do about ``err`` (an
    ``OSError``, or a writer's own error whose message reports the OS error)."""
    if isinstance(err, OutputError):
        return err
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _DISK_FULL.search(str(err))):
        why, code = "no space left on the device", errno.ENOSPC
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system)"
    else:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return OutputError(
        code or errno.EIO,
        f"cannot write {path}: {why}. Free space or pick another --output; files "
        "written before are intact (every file is replaced atomically).",
    )


def check_writable(folder: Path) -> None:
    """Prove that ``folder`` can take a file (write :data:`PROBE_BYTES`, fsync, delete it),
    before any expensive work. Folders it creates for the probe are removed again."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputError(errno.ENOTDIR, f"--output {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OutputError:
        raise
    except OSError as e:
        raise explain_write_error(folder, e) from e
    finally:
        for path in created:  # innermost first; a folder someone else filled meanwhile stays
            try:
                path.rmdir()
            except OSError:
                break


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse to start when the file system of ``folder`` has less than ``need`` bytes free."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OutputError(
            errno.ENOSPC,
            f"{what} needs about {_size(need)} in {folder} but only {_size(free)} are free: free "
            "space or pick another --output",
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def saved_run(folder: Path) -> dict[str, Any] | None:
    """``{"status", "steps_done", "files"}`` of the run in ``folder``, or None if none is there."""
    files = [name for name in RUN_FILES if (folder / name).exists()]
    if not folder.is_dir() or not files:
        return None
    try:
        results = json.loads((folder / RESULTS).read_text())
    except (OSError, ValueError):
        results = {}
    return dict(status=results.get("status"), steps_done=results.get("steps_done"), files=files)


def check_output(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """The output rules: ``--resume`` needs a saved run; a saved run is only replaced with
    ``--overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(errno.ENOTDIR, f"--output {folder} exists and is not a folder")
    run = saved_run(folder)
    if resume:
        if not (folder / STATE).is_file():
            raise UsageError(
                f"--resume: no saved run in {folder} ({STATE} is missing); start without --resume"
            )
        return
    if run is None or overwrite:
        return
    done = run["steps_done"]
    if run["status"] == "finished":
        raise UsageError(
            f"--output {folder} holds a finished run ({done} steps): pass --overwrite to replace "
            "it, or pick another --output"
        )
    at = f"{run['status']} after {done} steps" if done is not None else "unfinished"
    raise UsageError(
        f"--output {folder} holds a run ({at}): continue it with --resume, replace it with "
        "--overwrite, or pick another --output"
    )


def clear_run(folder: Path) -> None:
    """Remove every file of a run from ``folder`` (other files are not the run's and stay)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`l2l.io.write_json`), with an error that says what to do."""
    try:
        _write_json(path, data)
    except OSError as e:
        raise explain_write_error(path, e) from e


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found at {path}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupted ({e}); delete it or start without --resume") from e
