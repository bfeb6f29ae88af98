"""The ZO methods, one file each."""

from l2l.methods.base import NonFiniteLossError, StepRecord, ZOOptimizer
from l2l.methods.hizoo import HiZOO, hessian_diag_estimate
from l2l.methods.lozo import LOZO
from l2l.methods.mezo import ZOSGD
from l2l.scales import normalisation

MeZO = ZOSGD

__all__ = [
    "HiZOO",
    "LOZO",
    "MeZO",
    "NonFiniteLossError",
    "StepRecord",
    "ZOOptimizer",
    "ZOSGD",
    "hessian_diag_estimate",
    "normalisation",
]
