"""Models split over devices with accelerate (``device_map``), tested on what a CPU box has.

A real split needs several GPUs; here every entry of the map is ``"cpu"`` and
``force_hooks=True`` makes accelerate install its dispatch hooks anyway (they patch the
``forward`` of each mapped module, as on a GPU split). What this checks: the ZO methods perturb
and update a dispatched model exactly as they do the plain one (the perturber wraps the hooked
forwards), ``load_model``/``finetune --device-map`` go through accelerate, and offloaded weights
(which live on ``meta`` and are streamed in by hooks) are refused with a clear message.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import dispatch_model
from helpers import lm_closure, snapshot, tiny_lm
from torch import nn

from finetune.cli import main
from l2l import LOZO, ZOSGD, HiZOO
from l2l import z as zdef
from llm.models import check_no_offload, load_model

METHODS = {
    "mezo": (ZOSGD, {}),
    "hizoo": (HiZOO, {}),
    "lozo": (LOZO, {"rank": 2, "nu": 2}),
    "lozo-m": (LOZO, {"rank": 2, "nu": 2, "momentum": 0.9}),
}


def split_map(model) -> dict[str, str]:
    """One entry per top-level piece, as accelerate maps a model over GPUs."""
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    names += [f"model.layers.{i}" for i in range(len(model.model.layers))]
    return {n: "cpu" for n in names}


@pytest.mark.parametrize("chunk", [zdef.CHUNK_ELEMENTS, 257], ids=["whole", "chunked"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_dispatched_model_steps_like_the_plain_one(method, chunk, monkeypatch):
    monkeypatch.setattr(zdef, "CHUNK_ELEMENTS", chunk)  # 257: chunked lm_head/embedding
    cls, kw = METHODS[method]
    plain = tiny_lm("llama")
    split = dispatch_model(copy.deepcopy(plain), split_map(plain), force_hooks=True)
    assert hasattr(split.lm_head, "_hf_hook") and hasattr(split.model.layers[0], "_hf_hook")
    assert split.lm_head.weight is split.model.embed_tokens.weight  # still tied
    losses = []
    for model in (plain, split):
        opt = cls(model, lr=1e-3, eps=1e-2, seed=5, **kw)
        closure = lm_closure(model)
        losses.append([float(opt.step(closure)) for _ in range(3)])
    assert losses[0] == losses[1]
    after_plain, after_split = snapshot(plain), snapshot(split)
    assert after_plain.keys() == after_split.keys()
    for name, value in after_plain.items():
        assert torch.equal(value, after_split[name]), name
    assert not torch.equal(
        after_plain["lm_head.weight"], snapshot(tiny_lm("llama"))["lm_head.weight"]
    )


def test_load_model_with_a_device_map():
    model, _ = load_model("tiny-llama", device_map="auto")
    assert model.hf_device_map and set(model.hf_device_map.values()) <= {"cpu"}
    plain, _ = load_model("tiny-llama")
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="device_map must be one of auto"):
        load_model("tiny-llama", device_map="everywhere")
    with pytest.raises(ValueError, match="not both"):
        load_model("tiny-llama", device="cpu", device_map="auto")


def test_offloaded_weights_are_refused():
    model, _ = load_model("tiny-opt")
    norm = model.model.decoder.final_layer_norm
    norm.weight = nn.Parameter(torch.empty(norm.weight.shape, device="meta"))
    with pytest.raises(ValueError, match=r"offloaded.*'model.decoder.final_layer_norm.weight'"):
        check_no_offload(model)


def test_finetune_device_map(tmp_path, capsys):
    common = ["--model", "tiny-llama", "--task", "tweets", "--n_train", "16", "--n_test", "4"]
    common += ["--steps", "2", "--batch_size", "4", "--eval_examples", "2", "--no_progress"]
    common += ["--accelerator", "cpu", "--tuner", "none"]
    runs = []
    for extra in ([], ["--device_map", "auto"]):
        out = tmp_path / f"out{len(runs)}"
        assert main([*common, "--output", str(out), *extra]) == 0
        runs.append((out / "results.json").read_text())
    a, b = (json.loads(r) for r in runs)
    assert a["train_loss"] == b["train_loss"] and b["peak_memory_bytes"] > 0
    assert (
        main([*common, "--output", str(tmp_path / "x"), "--device_map", "auto", "--devices", "2"])
        == 2
    )
    assert "does not combine with --devices > 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
