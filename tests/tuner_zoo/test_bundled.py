"""The bundled smollm2-135m tuner: present, loadable without the network, and built for
SmolLM2-135M's exact parameter blocks (checked on a meta-device model: no weights needed)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from l2l import ParamBlocks
from l2l.tuner import Tuner
from llm.shapes import shape_config
from tuner_zoo import BUNDLED_DIR, resolve_tuner


def test_bundled_tuner_matches_smollm2_blocks():
    folder = resolve_tuner("smollm2-135m", offline=True)
    assert folder == BUNDLED_DIR / "smollm2-135m"
    tuner = Tuner.load_folder(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config("smollm2-135m"))
    blocks = ParamBlocks.from_module(model)
    tuner.check_compatible(blocks, model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert tuner.num_blocks == len(blocks) == 272
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model"].startswith("HuggingFaceTB/SmolLM2-135M")
    tasks = config["recipe"]["tasks"]
    assert "movie-reviews" not in tasks and "amazon-reviews" not in tasks  # evaluated as unseen
    assert config["recipe"]["command"].startswith("pretrain-tuner ")
    card = (folder / "README.md").read_text()
    assert "pretrain-tuner" in card and config["fingerprint"][:16] in card


def test_bundled_tuner_gives_positive_finite_scales():
    tuner = Tuner.load_folder(BUNDLED_DIR / "smollm2-135m")
    features = torch.tensor([[0.0, 1e-3, 2.0, 2.1, 1.0]]).repeat(tuner.num_blocks, 1)
    sigma = tuner(features)
    assert sigma.shape == (272,) and bool(torch.isfinite(sigma).all()) and bool((sigma > 0).all())
