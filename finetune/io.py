"""Crash-safe output files of a fine-tuning run."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from l2l.io import write_json as _write_json


class OutputError(OSError):
    """The output folder cannot be written (permissions, disk full, not a folder)."""


def explain_write_error(path: Path, err: OSError) -> OutputError:
    """An :class:`OutputError` that names ``path`` and says what to do about ``err``."""
    if isinstance(err, OutputError):
        return err
    if err.errno == errno.ENOSPC:
        why = "no space left on the device"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system)"
    else:
        why = err.strerror or str(err)
    return OutputError(
        err.errno,
        f"cannot write {path}: {why}. Free space or pick another --output; files "
        "written before are intact (every file is replaced atomically).",
    )


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any expensive work."""
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputError(errno.ENOTDIR, f"--output {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OutputError:
        raise
    except OSError as e:
        raise explain_write_error(folder, e) from e


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
