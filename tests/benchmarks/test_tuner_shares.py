"""``benchmarks/tuner_shares.py``: each block's share of the perturbation at a run's start."""

from __future__ import annotations

import torch
from helpers import benchmark_module

from l2l.blocks import ParamBlocks
from l2l.scales import block_features
from l2l.tuner import Tuner


def test_shares_follow_parameter_counts_for_mezo_and_the_tuner_s_sigma(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(30, 4), torch.nn.Linear(4, 2))
    blocks = ParamBlocks.from_module(model)
    with benchmark_module("tuner_shares") as module:
        mezo = module.shares(module.start_scales("mezo", blocks), blocks.numels)
        torch.testing.assert_close(mezo, blocks.numels.double() / blocks.numels.sum())
        tuner = Tuner.for_blocks(blocks, base_model="test")
        tuner.start_at(torch.tensor([1.0, 10.0, 10.0]))  # the Linear's blocks 10x the embedding's
        tuner.save_pretrained(tmp_path / "t")
        sigma = module.start_scales(str(tmp_path / "t"), blocks)
        share = module.shares(sigma, blocks.numels)
    features = block_features(blocks, (0.0, 0.0), torch.ones(3))  # a run's first step
    with torch.no_grad():
        torch.testing.assert_close(sigma, tuner(features).double())
    assert float(sigma[1] / sigma[0]) > 5  # the Linear's blocks scaled up, as started
    energy = blocks.numels.double() * sigma.square()
    torch.testing.assert_close(share, energy / energy.sum())
    assert float(share[1] + share[2]) > 0.5 > float(mezo[1] + mezo[2])
