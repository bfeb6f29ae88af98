"""l2l: learned zeroth-order fine-tuning for large language models (plain PyTorch)."""

from l2l.blocks import ParamBlocks, block_fingerprint
from l2l.finetuned import load_finetuned, push_finetuned, weights_sha256
from l2l.methods import (
    LOZO,
    ZOSGD,
    HiZOO,
    MeZO,
    NonFiniteLossError,
    StepRecord,
    ZOOptimizer,
    hessian_diag_estimate,
    normalisation,
)
from l2l.trajectory import Trajectory, apply_records, replay

__version__ = "0.1.0"

__all__ = [
    "LOZO",
    "ZOSGD",
    "HiZOO",
    "MeZO",
    "NonFiniteLossError",
    "ParamBlocks",
    "StepRecord",
    "Trajectory",
    "ZOOptimizer",
    "block_fingerprint",
    "hessian_diag_estimate",
    "load_finetuned",
    "normalisation",
    "push_finetuned",
    "apply_records",
    "replay",
    "weights_sha256",
]
