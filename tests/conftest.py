"""Shared pytest fixtures. Keep this small and general.

Every test runs with its own ``L2L_HOME`` (an empty zoo and registry) that
sees the checkout's shared asset cache (:data:`helpers.ASSET_HOME`): no test writes into the
user's ``~/.cache/l2l``.
"""

from __future__ import annotations

import pytest
from helpers import isolated_home


@pytest.fixture(autouse=True)
def l2l_home(tmp_path_factory, monkeypatch):
    """This test's ``L2L_HOME`` (outside ``tmp_path``, which tests may expect to be empty)."""
    home = isolated_home(tmp_path_factory.mktemp("l2l-home"))
    monkeypatch.setenv("L2L_HOME", str(home))
    return home


@pytest.fixture
def tiny_model():
    """A fresh ``(model, tokenizer)`` for the built-in ``tiny-llama`` (same weights every time)."""
    from llm.models import load_model

    return load_model("tiny-llama")
