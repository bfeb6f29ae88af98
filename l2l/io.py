"""Crash-safe writes: every file and folder appears whole or not at all.

A file is written to a hidden temporary sibling, fsynced and renamed over the target
(:func:`atomic_file`, :func:`write_json`); a folder is built in a hidden sibling and swapped into
place with renames only (:func:`atomic_directory`). Staging happens in the target's own folder,
so the final rename never crosses a filesystem, and a failure (a full disk, an interrupt) leaves
the previous version intact and no temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The one environment variable for l2l's own files: the local tuner zoo, its registry, and the
#: offline assets (converted models, prepared data). Default ``~/.cache/l2l``.
ENV_HOME = "L2L_HOME"


def l2l_home() -> Path:
    """``$L2L_HOME`` or ``~/.cache/l2l``: the root of every file l2l keeps for the user."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "l2l"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    The caller writes the temporary file (with any writer: ``torch.save``, safetensors, ...).
    On an exception it is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`atomic_file`)."""
    return write_text(path, json.dumps(data, indent=indent))


def _fsync_tree(folder: Path) -> None:
    """fsync every file and give the tree ordinary permissions (mkdtemp and some writers use
    0700/0600, which would make a published folder private)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _swap_into_place(staged: Path, target: Path, owned: Collection[str] | None) -> None:
    """Make ``staged`` appear at ``target`` with renames only.

    A missing target, or one holding only names in ``owned`` (every name when ``owned`` is None),
    is replaced as a whole (the old folder is renamed aside, then deleted). A target that also
    holds other files (logs, a user's checkpoints) is never deleted: the staged files are moved
    in one by one, ``config.json`` last, each with an atomic ``os.replace``.
    """
    if not target.exists():
        os.rename(staged, target)
        return
    existing = {p.name for p in target.iterdir()}
    if owned is None or existing <= set(owned):
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, aside / target.name)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(aside / target.name, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    names = sorted((p.name for p in staged.iterdir()), key=lambda n: n == "config.json")
    for name in names:
        os.replace(staged / name, target / name)
    shutil.rmtree(staged, ignore_errors=True)


@contextmanager
def atomic_directory(
    target: str | os.PathLike, owned: Collection[str] | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on success it replaces ``target``.

    ``owned``: the file names this writer produces. A target holding anything else is updated
    file by file instead of replaced, so nothing of a user's is deleted. ``None``: the target is
    the writer's alone and is replaced whole. On any exception (or a crash) the staging folder
    is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staged
        _fsync_tree(staged)
        _swap_into_place(staged, target, owned)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
