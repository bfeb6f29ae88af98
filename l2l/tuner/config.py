"""The tuner's configuration (``config.json``): what it was trained for and how to read its inputs.

A tuner is only meaningful for the parameter blocks it was meta-trained on, so the config records
the base model (id, revision, ``model_type``), every block's name and shape and their
fingerprint (:func:`l2l.blocks.block_fingerprint`), next to the feature spec, the ZO settings it
was trained with, the training recipe, metrics and the library that wrote it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from l2l.blocks import block_fingerprint

logger = logging.getLogger(__name__)

# File names of the artifact folder.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

LIBRARY_NAME = "l2l-zo"
FORMAT_VERSION = 1

# Columns of the feature matrix the engine passes to the tuner, in this order (ZO Fine-tuner):
# mean(theta_b), var(theta_b), L+ and L- of the previous step, sigma_b of the previous step.
FEATURE_NAMES = ("param_mean", "param_var", "loss_plus_prev", "loss_minus_prev", "sigma_prev")

# "asinh": x_k -> asinh(x_k / s_k), odd and smooth, linear for |x| << s_k and logarithmic beyond,
# so a variance of 1e-6..1e-1 and losses of 0.1..10 all land in O(1) inputs for the Tanh layer.
# "raw": the paper's (and the public release's) unscaled inputs.
FEATURE_SCALINGS = ("asinh", "raw")
DEFAULT_FEATURE_SCALES = (1e-2, 1e-4, 1.0, 1.0, 1.0)

# Keys a config.json must carry; every other field has a default.
REQUIRED_KEYS = (
    "format_version",
    "base_model",
    "block_names",
    "block_shapes",
    "fingerprint",
    "hidden_size",
    "features",
    "feature_scaling",
    "feature_scales",
)


class TunerFormatError(ValueError):
    """A tuner file is unreadable, incomplete or inconsistent (the message names the file)."""


class TunerNotFoundError(FileNotFoundError):
    """No tuner at that path / name / repo id, or the Hub could not be reached for it."""


TRAIN_HINT = "meta-train a tuner for the model"


_DEFAULT_SOURCE = "the tuner config"


def library_version() -> str:
    """Installed version of ``l2l-zo`` (``0.1.0`` when running from a bare checkout)."""
    try:
        return metadata.version(LIBRARY_NAME)
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class TunerConfig:
    """Everything ``config.json`` holds. ``fingerprint`` is filled from names/shapes if empty."""

    base_model: str
    block_names: list[str]
    block_shapes: list[list[int]]
    revision: str | None = None
    model_type: str | None = None
    fingerprint: str = ""
    hidden_size: int = 64
    features: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    feature_scaling: str = "asinh"
    feature_scales: list[float] = field(default_factory=lambda: list(DEFAULT_FEATURE_SCALES))
    sigma_floor: float = 1e-8
    eps: float = 1e-3
    normalize: bool = True
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    library_name: str = LIBRARY_NAME
    library_version: str = field(default_factory=library_version)
    created_at: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.block_shapes = [[int(d) for d in s] for s in self.block_shapes]
        self.block_names = list(self.block_names)
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()
        self.validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def compute_fingerprint(self) -> str:
        return block_fingerprint(self.block_names, [tuple(s) for s in self.block_shapes])

    def validate(self, source: str = _DEFAULT_SOURCE) -> None:
        """Raise :class:`TunerFormatError` on inconsistent values (``source`` names the file)."""
        problems = self._problems()
        if problems:
            raise TunerFormatError(
                f"{source}: {problems[0]}. Re-create the tuner with Tuner.for_blocks(...) or "
                "re-download it with force_download=True."
            )

    def _problems(self) -> list[str]:
        problems = []
        if len(self.block_names) != len(self.block_shapes):
            problems.append(
                f"'block_names' has {len(self.block_names)} entries but 'block_shapes' has "
                f"{len(self.block_shapes)}: expected one shape per block"
            )
        elif self.fingerprint != self.compute_fingerprint():
            problems.append(
                f"'fingerprint' is {self.fingerprint[:12]}... but the block names and shapes hash "
                f"to {self.compute_fingerprint()[:12]}...: the block list was edited"
            )
        if not self.block_names:
            problems.append("'block_names' is empty: expected at least one block")
        if list(self.features) != list(FEATURE_NAMES):
            problems.append(f"'features' is {list(self.features)}, expected {list(FEATURE_NAMES)}")
        if self.feature_scaling not in FEATURE_SCALINGS:
            problems.append(
                f"'feature_scaling' is {self.feature_scaling!r}, expected one of {FEATURE_SCALINGS}"
            )
        if len(self.feature_scales) != len(FEATURE_NAMES) or min(self.feature_scales) <= 0:
            problems.append(
                f"'feature_scales' is {self.feature_scales}, expected {len(FEATURE_NAMES)} "
                "positive numbers"
            )
        if int(self.hidden_size) < 1:
            problems.append(f"'hidden_size' is {self.hidden_size}, expected a positive integer")
        if self.sigma_floor < 0:
            problems.append(f"'sigma_floor' is {self.sigma_floor}, expected >= 0")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = _DEFAULT_SOURCE) -> TunerConfig:
        """Build and validate a config; errors name ``source`` and the offending key."""
        if not isinstance(data, dict):
            raise TunerFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise TunerFormatError(
                f"{source}: missing key {missing[0]!r} (required keys: {', '.join(REQUIRED_KEYS)}). "
                "The file is incomplete: re-download it with force_download=True or re-save the "
                "tuner with Tuner.save_pretrained()."
            )
        version = data["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TunerFormatError(
                f"{source}: 'format_version' is {version!r} but this l2l-zo "
                f"({library_version()}) reads versions <= {FORMAT_VERSION}: upgrade l2l-zo"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("%s: ignoring unknown keys %s", source, unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            config = cls(**kwargs)
        except TunerFormatError as err:  # name the file instead of the generic source
            raise TunerFormatError(str(err).replace(_DEFAULT_SOURCE, source, 1)) from None
        except (TypeError, ValueError) as err:
            raise TunerFormatError(f"{source}: invalid value ({err})") from err
        return config

    @classmethod
    def load(cls, path: str | Path) -> TunerConfig:
        """Read and validate ``config.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise TunerFormatError(
                f"{path} does not exist: a tuner folder holds {', '.join(ARTIFACT_FILES)}"
            ) from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TunerFormatError(
                f"{path} is not valid JSON ({err}): the file is corrupted; re-download it with "
                "force_download=True or re-save the tuner"
            ) from err
        config = cls.from_dict(data, source=str(path))
        return config
