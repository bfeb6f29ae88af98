"""The learned per-block perturbation tuner (ZO Fine-tuner) and its on-disk artifact.

A tuner on disk is a folder: ``config.json`` + ``model.safetensors`` + ``README.md``.
"""

from l2l.scales import scale_features
from l2l.tuner.card import render_model_card
from l2l.tuner.config import (
    ARTIFACT_FILES,
    CARD_NAME,
    CONFIG_NAME,
    FEATURE_NAMES,
    FEATURE_SCALINGS,
    WEIGHTS_NAME,
    TunerConfig,
    TunerFormatError,
    TunerNotFoundError,
)
from l2l.tuner.hub import fetch_tuner_snapshot
from l2l.tuner.io import atomic_directory
from l2l.tuner.model import Tuner, TunerMismatchError

__all__ = [
    "ARTIFACT_FILES",
    "CARD_NAME",
    "CONFIG_NAME",
    "FEATURE_NAMES",
    "FEATURE_SCALINGS",
    "WEIGHTS_NAME",
    "Tuner",
    "TunerConfig",
    "TunerFormatError",
    "TunerMismatchError",
    "TunerNotFoundError",
    "atomic_directory",
    "fetch_tuner_snapshot",
    "render_model_card",
    "scale_features",
]
