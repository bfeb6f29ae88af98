"""Shared pytest fixtures. Keep this small and general."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_model():
    """A fresh ``(model, tokenizer)`` for the built-in ``tiny-llama`` (same weights every time)."""
    from llm.models import load_model

    return load_model("tiny-llama")
