"""Lightning precision and multi-device defaults of ``pretrain-tuner``.

Under bf16-true and bf16-mixed the tuner stays float32 and learns, its forward runs outside
autocast with float32 the default dtype, and the tuner it saves is float32, while the base
model runs in bfloat16. ``--precision auto`` follows the accelerator the run uses, and several
devices get a DDP that tolerates the meta-step's parameters unused by one of its backwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_classification_task
from safetensors.torch import load_file

import l2l.tuner
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
from llm.models import load_model
from pretrain_tuner.cli import main
from pretrain_tuner.config import parse
from pretrain_tuner.precision import default_precision
from pretrain_tuner.trainer import strategy


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_classification_task(tmp_path / "reviews.jsonl", n=24)


@pytest.fixture
def seen_in_tuner(monkeypatch) -> list[tuple]:
    """(weight dtype, default dtype, autocast on) at every call of the tuner."""
    seen: list[tuple] = []
    forward = l2l.tuner.Tuner.forward

    def recording(self, features):
        seen.append((self.w1.dtype, torch.get_default_dtype(), torch.is_autocast_enabled("cpu")))
        return forward(self, features)

    monkeypatch.setattr(l2l.tuner.Tuner, "forward", recording)
    return seen


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_tuner_stays_float32_and_learns(task_file, tmp_path, seen_in_tuner, precision):
    out = tmp_path / "out"
    argv = ["--model", "tiny-llama", "--task", str(task_file), "--output", str(out)]
    argv += ["--steps", "3", "--batch_size", "4", "--n_train", "16", "--name", "none"]
    argv += ["--lr_update", "1e-2", "--lr_tuner", "1.0", "--precision", precision]
    argv += ["--accelerator", "cpu", "--no_progress"]
    assert main(argv) == 0
    assert len(seen_in_tuner) == 3
    assert set(seen_in_tuner) == {(torch.float32, torch.float32, False)}
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    fresh = Tuner.for_blocks(ParamBlocks.from_module(load_model("tiny-llama")[0]), "x")
    changed = (weights["w1"] != fresh.w1.detach()).float().mean()
    assert changed > 0.5, f"only {changed:.0%} of the tuner's first-layer weights changed"
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model_dtypes = {v.dtype for k, v in state.items() if k.startswith("model.")}
    assert model_dtypes == {torch.bfloat16 if precision == "bf16-true" else torch.float32}
    assert {v.dtype for k, v in state.items() if k.startswith("tuner.")} == {torch.float32}


def test_default_precision_follows_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_precision("cpu") == "32-true"
    assert default_precision("auto") == "bf16-mixed"
    assert default_precision("gpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") == "32-true"


def config(*extra: str):
    return parse(["--model", "m", "--task", "t", "--output", "o", "--accelerator", "cpu", *extra])


def test_one_device_by_default_and_ddp_for_several():
    assert config().devices == 1 and strategy(config()) == "auto"
    for flags in (("--devices", "2"), ("--num_nodes", "2"), ("--strategy", "ddp")):
        ddp = strategy(config(*flags))
        assert type(ddp).__name__ == "DDPStrategy", flags
        assert ddp._ddp_kwargs["find_unused_parameters"] is True
    assert type(strategy(config("--strategy", "fsdp"))).__name__ == "FSDP2"
