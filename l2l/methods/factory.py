"""Build a ZO method from its name and flat settings (what every front end configures).

``finetune``, the transformers ``ZOTrainer`` and user scripts all name a method as one of
:data:`METHODS` and pass the settings they have; the ones a method does not use are ignored.
"""

from __future__ import annotations

from typing import Any

from l2l.methods.base import ZOOptimizer
from l2l.methods.hizoo import HiZOO
from l2l.methods.lozo import LOZO
from l2l.methods.mezo import ZOSGD

METHODS = ("mezo", "hizoo", "lozo", "lozo-m")


def make_method(
    method: str,
    params: Any,
    *,
    lr: float,
    eps: float,
    weight_decay: float = 0.0,
    rank: int = 2,
    nu: int = 50,
    momentum: float = 0.9,
    hessian_smooth: float = 1e-8,
    **common: Any,
) -> ZOOptimizer:
    """The optimizer of ``method`` over ``params`` (a module or tensors).

    ``rank``/``nu`` are LOZO's, ``momentum`` LOZO-M's beta (``"lozo"`` runs without momentum),
    ``hessian_smooth`` HiZOO's EMA rate; ``common`` goes to :class:`ZOOptimizer` (``seed``,
    ``block_scale``, ``normalize``, ``nonfinite``, ``record``, ``loss_reduce``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ZO method {method!r}: choose one of {', '.join(METHODS)}")
    kwargs = dict(lr=lr, eps=eps, weight_decay=weight_decay, **common)
    if method == "mezo":
        return ZOSGD(params, **kwargs)
    if method == "hizoo":
        return HiZOO(params, hessian_smooth=hessian_smooth, **kwargs)
    beta = momentum if method == "lozo-m" else 0.0
    return LOZO(params, rank=rank, nu=nu, momentum=beta, **kwargs)
