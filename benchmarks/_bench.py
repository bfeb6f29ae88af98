"""What the step benchmarks share: a ZO method from its label (``mezo``, ``lozo+tuner``).

``step_cost.py``, ``step_ops.py`` and ``profile_step.py`` name a method as one of
:data:`l2l.methods.factory.METHODS`, optionally followed by ``+tuner``: a freshly initialised
learned tuner (``block_scale``) on the model's device, where ``finetune`` places it.
"""

from __future__ import annotations

from typing import Any


def bench_method(label: str, model, *, lr: float = 1e-7, eps: float = 1e-3, **common: Any):
    """The optimizer a benchmark label names, over ``model``'s parameters."""
    from l2l.blocks import ParamBlocks
    from l2l.methods.factory import METHODS, make_method
    from l2l.tuner import Tuner

    name, plus, scale = label.partition("+")
    if name not in METHODS or (plus and scale != "tuner"):
        raise ValueError(f"{label!r}: a method ({', '.join(METHODS)}), optionally +tuner")
    if plus:
        tuner = Tuner.for_blocks(ParamBlocks.from_module(model), base_model="bench")
        common["block_scale"] = tuner.to(next(model.parameters()).device)
    return make_method(name, model, lr=lr, eps=eps, **common)
