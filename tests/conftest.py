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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (for modules of width-32 models: thread start-up costs more than it
    saves, and CI cores are shared); use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    """A fresh ``(model, tokenizer)`` for the built-in ``tiny-llama`` (same weights every time)."""
    from llm.models import load_model

    return load_model("tiny-llama")
