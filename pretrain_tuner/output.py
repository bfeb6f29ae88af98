"""The output folder and the zoo name of a run, checked before any work.

A folder holding a run (a tuner's ``config.json``, ``checkpoints/`` or ``logs/``) is continued
only with ``--resume`` and replaced only with ``--overwrite``; replacing moves the old run aside
(a rename in the same parent folder) until the new one has finished or saved a checkpoint, and
puts it back if the new run fails. A folder holding anything else is never written into.
A taken zoo name is refused before training, unless ``--overwrite`` replaces the entry or it is
this very run's (same ``run_id``) being resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm.cli import UsageError
from pretrain_tuner.checkpoint import saved_step
from pretrain_tuner.config import PretrainConfig

RUN_MARKERS = ("config.json", "checkpoints", "logs")


def _describe(output: Path) -> str:
    if (output / "config.json").is_file():
        return "a finished run (config.json)"
    if (output / "checkpoints").exists():
        return "an unfinished run (checkpoints/)"
    return "the logs of a run that saved no checkpoint (logs/)"


def check_output(config: PretrainConfig, output: Path, checkpoint: Path) -> None:
    """Refuse an output folder the settings would lose or mix up (:class:`UsageError`)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file: choose a folder")
    if config.resume:
        if not checkpoint.exists():
            raise UsageError(
                f"--resume: no checkpoint at {checkpoint}; run without --resume to start"
            )
        return
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not any((output / name).exists() for name in RUN_MARKERS):
        first = sorted(p.name for p in output.iterdir())[:3]
        raise UsageError(
            f"--output {output} is not empty ({', '.join(first)}, ...) and holds no "
            "pretrain-tuner run: choose a new or empty folder"
        )
    if not config.overwrite:
        resume = " or --resume to continue it" if checkpoint.exists() else ""
        raise UsageError(
            f"--output {output} holds {_describe(output)}: pass --overwrite to replace it"
            f"{resume}, or choose another --output"
        )


def zoo_target(config: PretrainConfig, output: Path) -> tuple[str, Path] | None:
    from tuner_zoo.resolve import zoo_dir, zoo_name

    name = zoo_name(config.name, output)
    return None if name is None else (name, zoo_dir() / name)


def _run_id_of(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (config.get("recipe") or {}).get("run_id")


def check_zoo_name(config: PretrainConfig, output: Path, run_id: str | None) -> None:
    """Refuse a taken zoo name before training (see the module docstring)."""
    target = zoo_target(config, output)
    if target is None:
        return
    name, folder = target
    if not (folder.exists() or folder.is_symlink()) or config.overwrite:
        return
    if config.resume and run_id is not None and _run_id_of(folder) == run_id:
        return  # the entry this run registered before
    replace = "" if config.resume else ", or --overwrite to replace it"
    raise UsageError(
        f"the local zoo already has a tuner called {name!r} ({folder}): pass --name OTHER "
        f"(--name none to skip registering){replace}"
    )


def replace_aside(output: Path) -> Path | None:
    """Move the old run in ``output`` aside (``--overwrite``); returns where, or None."""
    if not output.exists():
        return None
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    os.rename(output, aside / output.name)
    return aside


def restore_aside(aside: Path, output: Path) -> None:
    """Put the old run back after a failed replacement (the new run's files are removed)."""
    if output.exists():
        shutil.rmtree(output)
    os.rename(aside / output.name, output)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def replacing(output: Path, checkpoint: Path, enabled: bool) -> Iterator[None]:
    """``--overwrite`` (``enabled``): the old run is aside while the new one trains; it is
    deleted when the new run finishes or is interrupted after saving a checkpoint, and put
    back when the new run fails or is interrupted before saving one."""
    aside = replace_aside(output) if enabled else None
    if aside is None:
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        if saved_step(checkpoint) is None:
            restore_aside(aside, output)
        else:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    except BaseException:
        restore_aside(aside, output)
        raise
    shutil.rmtree(aside, ignore_errors=True)
