"""Crash-safe writing of a tuner folder and strict reading of its safetensors file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from l2l.tuner.config import ARTIFACT_FILES, TunerFormatError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    """fsync every file and give the tree ordinary permissions (mkdtemp and some writers use
    0700/0600, which would make a published tuner private)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _swap_into_place(staged: Path, target: Path) -> None:
    """Make ``staged`` appear at ``target`` with renames only.

    A missing or empty target, or one holding only tuner files, is replaced as a whole (the old
    folder is renamed aside, then deleted). A target that also holds other files (logs, a user's
    checkpoints) is never deleted: the tuner files are moved in one by one, config.json last, each
    with an atomic ``os.replace``.
    """
    if not target.exists():
        os.rename(staged, target)
        return
    existing = {p.name for p in target.iterdir()}
    if existing <= set(ARTIFACT_FILES):
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
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on success it replaces ``target``.

    On any exception (or a crash) the staging folder is removed and ``target`` is untouched, so a
    reader never sees a half-written tuner. The staging folder is a hidden sibling so the final
    rename stays on one filesystem.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staged
        _fsync_tree(staged)
        _swap_into_place(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write contiguous CPU copies of ``tensors`` as safetensors with ``{"format": "pt"}``."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(flat, str(path), metadata={"format": "pt"})


def _corrupted(path: Path, reason: str) -> TunerFormatError:
    return TunerFormatError(
        f"{path}: {reason}. The file is truncated or corrupted: re-download it "
        "(Tuner.from_pretrained(..., force_download=True) or `tuner-zoo download NAME --force`) "
        "or save the tuner again"
    )


def read_weights(
    path: Path, expected: dict[str, tuple[int, ...]], config_name: str = "config.json"
) -> dict[str, torch.Tensor]:
    """Load exactly the tensors in ``expected`` (name -> shape) as float32 CPU tensors."""
    if not path.is_file():
        raise TunerFormatError(
            f"{path} does not exist: a tuner folder holds {', '.join(ARTIFACT_FILES)}"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            _check_names(path, names, set(expected))
            tensors = {name: handle.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, TunerFormatError):
            raise
        raise _corrupted(path, f"not a readable safetensors file ({err})") from err
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise TunerFormatError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but {config_name} "
                f"describes shape {shape}: the weights and the config belong to different tuners"
            )
        if not tensor.is_floating_point():
            raise TunerFormatError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected float"
            )
        if not torch.isfinite(tensor).all():
            raise _corrupted(path, f"tensor {name!r} contains NaN or inf")
        tensors[name] = tensor.float()
    return tensors


def _check_names(path: Path, actual: set[str], expected: set[str]) -> None:
    if actual != expected:
        missing, extra = sorted(expected - actual), sorted(actual - expected)
        raise TunerFormatError(
            f"{path}: expected tensors {sorted(expected)}, missing {missing}, unexpected {extra}: "
            "this is not an l2l tuner weights file"
        )
