"""The (seed, scalars) trajectory rebuilds fine-tuned weights bit-for-bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import lm_closure, same_bits, snapshot, tiny_lm

from l2l import LOZO, ZOSGD, HiZOO, Trajectory, replay

CASES = [
    (ZOSGD, {"weight_decay": 0.01}),
    (HiZOO, {"hessian_smooth": 1e-3}),
    (LOZO, {"rank": 2, "nu": 3}),
    (LOZO, {"rank": 2, "nu": 3, "momentum": 0.8}),
]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_is_bit_for_bit(cls, kw, dtype, tmp_path):
    model = tiny_lm("llama", dtype=dtype)
    provider = lambda f: 1.0 + f[:, 1].sqrt()  # noqa: E731 - any positive block scale
    opt = cls(model, lr=1e-3, eps=1e-3, record=True, block_scale=provider, **kw)
    closure = lm_closure(model)
    for _ in range(8):
        opt.step(closure)
    path = Trajectory.from_optimizer(opt).save(tmp_path / "traj.json")
    fresh = tiny_lm("llama", dtype=dtype)
    assert not same_bits(snapshot(fresh), snapshot(model))
    replay(fresh, path)
    assert same_bits(snapshot(fresh), snapshot(model))


def test_trajectory_is_tiny_and_validated(tmp_path):
    model = tiny_lm("opt")
    opt = ZOSGD(model, lr=1e-3, record=True)
    for _ in range(50):
        opt.step(lm_closure(model))
    path = Trajectory.from_optimizer(opt).save(tmp_path / "t.json")
    assert path.stat().st_size < 50 * 200  # ~140 bytes a step without a tuner
    with pytest.raises(ValueError, match="same model"):
        replay(tiny_lm("llama"), path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an l2l trajectory"):
        Trajectory.load(path)
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="not a valid trajectory"):
        Trajectory.load(path)
    with pytest.raises(ValueError, match="record=True"):
        Trajectory.from_optimizer(ZOSGD(model))
