"""Doors into the training loops people already use (transformers is imported only here).

* :mod:`l2l.integrations.hf_trainer`: ``ZOTrainer`` / ``ZOTrainingArguments`` for
  ``transformers.Trainer``;
* Lightning and plain PyTorch need no adapter: a ZO method is a ``torch.optim.Optimizer`` whose
  ``step(closure)`` runs forwards only (see ``examples/lightning_zo.py`` and
  ``examples/pytorch_zo.py``).

``from l2l.integrations import ZOTrainer`` works too; transformers is imported on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ZOTrainer": "l2l.integrations.hf_trainer",
    "ZOStep": "l2l.integrations.hf_trainer",
    "ZOTrainingArguments": "l2l.integrations.hf_args",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'l2l.integrations' has no attribute {name!r}")
