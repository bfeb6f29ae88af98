"""Loading a recorded base model with transformers (the default of ``load_finetuned``)."""

from __future__ import annotations

from torch import nn


def load_base_model(name: str, revision: str | None = None, dtype: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name, revision, dtype)`` in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype or "float32")
    return model.eval()
