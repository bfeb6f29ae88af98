"""The (seed, scalars) trajectory rebuilds fine-tuned weights bit-for-bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import Quadratic, lm_closure, same_bits, snapshot, tiny_lm

from l2l import LOZO, ZOSGD, HiZOO, Trajectory, replay
from l2l import z as zdef
from l2l import z_reference as zref

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


def test_trajectory_names_its_generator_and_refuses_others(tmp_path):
    model = tiny_lm("opt")
    opt = ZOSGD(model, lr=1e-3, record=True)
    opt.step(lm_closure(model))
    path = Trajectory.from_optimizer(opt).save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["generator"] == zdef.GENERATOR
    assert Trajectory.load(path).generator == zdef.GENERATOR
    for changes, message in [
        ({"version": 1}, "version-1 trajectory.*torch's per-device random generators"),
        ({"version": 3}, "version 3.*upgrade l2l-zo"),
        ({"generator": "philox-v9"}, "z generator 'philox-v9'.*different z"),
    ]:
        path.write_text(json.dumps({**data, **changes}))
        with pytest.raises(ValueError, match=message):
            Trajectory.load(path)
    foreign = Trajectory.from_optimizer(opt)
    foreign.generator = "philox-v9"
    with pytest.raises(ValueError, match="z generator 'philox-v9'"):
        replay(tiny_lm("opt"), foreign)


def _reference_gaussian(step_seed, block, start, shape, device, transient=False):
    numel = torch.Size(shape).numel()
    return torch.from_numpy(zref.gaussian(step_seed, block, start, numel)).view(shape).to(device)


def _reference_bits(key, start, numel, device, out=None):
    words = [zdef._signed64(zref.splitmix64(key, start + j)) for j in range(numel)]
    bits = torch.tensor(words, dtype=torch.int64, device=device)
    return bits if out is None else out.view(-1).copy_(bits).view(out.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", [(ZOSGD, {"weight_decay": 0.01}), (HiZOO, {})])
def test_reference_generator_replays_a_trajectory_bit_for_bit(cls, kw, dtype, monkeypatch):
    """The fine-tuned model is its trajectory: replayed with z (and the rounding bits) from the
    plain reference generator, the weights come out identical, whatever the chunking."""
    model = Quadratic().to(dtype)
    opt = cls(model, lr=2e-3, eps=1e-3, record=True, **kw)
    for _ in range(6):
        opt.step(model)
    monkeypatch.setattr(zdef, "gaussian", _reference_gaussian)
    monkeypatch.setattr(zdef, "counter_bits", _reference_bits)
    monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", 7)  # several chunks per block
    fresh = Quadratic().to(dtype)
    assert not same_bits(snapshot(fresh), snapshot(model))
    replay(fresh, Trajectory.from_optimizer(opt))
    for name, value in snapshot(model).items():
        np.testing.assert_array_equal(
            snapshot(fresh)[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            value.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            err_msg=name,
        )
