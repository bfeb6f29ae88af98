"""Crash-safe writing of a tuner folder and strict reading of its safetensors file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from l2l.io import atomic_directory as _atomic_directory
from l2l.tuner.config import ARTIFACT_FILES, TunerFormatError


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """A tuner folder written crash-safely (:func:`l2l.io.atomic_directory`): a folder holding
    only tuner files is replaced whole, one that also holds a user's files gets the tuner files
    moved in one by one."""
    with _atomic_directory(target, owned=ARTIFACT_FILES) as staged:
        yield staged


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write contiguous CPU copies of ``tensors`` as safetensors with ``{"format": "pt"}``."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(flat, str(path), metadata={"format": "pt"})


def _corrupted(path: Path, reason: str) -> TunerFormatError:
    return TunerFormatError(
        f"{path}: {reason}. The file is truncated or corrupted: re-download it "
        "(Tuner.from_pretrained(..., force_download=True)) "
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
