"""The learned tuner: batched maths, positivity, gradients, the on-disk folder and its errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import l2l.tuner.io as tuner_io
from l2l.blocks import ParamBlocks
from l2l.tuner import (
    ARTIFACT_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Tuner,
    TunerConfig,
    TunerFormatError,
    TunerMismatchError,
)
from l2l.tuner.config import DEFAULT_FEATURE_SCALES


class TinyLM(nn.Module):
    """Embedding tied to the output head, one block, a norm: 5 distinct parameter blocks."""

    def __init__(self, vocab: int = 11, width: int = 6, ffn: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, ffn)
        self.down = nn.Linear(ffn, width, bias=False)
        self.norm = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


def blocks_of(model: nn.Module) -> ParamBlocks:
    return ParamBlocks.from_module(model)


def initial_features(blocks: ParamBlocks) -> torch.Tensor:
    """(B, 5) features at the initial state: statistics, losses 0, sigma 1."""
    mean, var = blocks.statistics()
    zeros = torch.zeros_like(mean)
    return torch.stack([mean, var, zeros, zeros, torch.ones_like(mean)], dim=1)


def random_features(num_blocks: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 1e-3, 3.0, 3.0, 1.0])
    return torch.randn(num_blocks, 5, generator=gen) * scale + torch.tensor([0, 2e-3, 2, 2, 1])


@pytest.fixture
def blocks() -> ParamBlocks:
    torch.manual_seed(0)
    return blocks_of(TinyLM())


@pytest.fixture
def tuner(blocks: ParamBlocks) -> Tuner:
    return Tuner.for_blocks(blocks, "org/tiny-lm", "abc123", model_type="tiny", seed=1)


def test_tied_weights_are_one_block(blocks: ParamBlocks, tuner: Tuner) -> None:
    assert blocks.aliases[0] == ["embed.weight", "head.weight"]
    assert tuner.num_blocks == len(blocks) == 5
    assert tuner.w1.shape == (5, 64, 5) and tuner.w2.shape == (5, 64) and tuner.b2.shape == (5,)


@pytest.mark.parametrize("scaling", ["raw", "asinh"])
def test_batched_forward_equals_per_block_mlps(blocks: ParamBlocks, scaling: str) -> None:
    tuner = Tuner.for_blocks(blocks, "org/tiny-lm", feature_scaling=scaling)
    torch.manual_seed(3)
    mlps = [
        nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1)) for _ in range(len(blocks))
    ]
    for i, mlp in enumerate(mlps):
        tuner.load_block_mlp(i, mlp)
    features = random_features(len(blocks))
    inputs = (
        features
        if scaling == "raw"
        else torch.asinh(features / torch.tensor(DEFAULT_FEATURE_SCALES))
    )
    expected = torch.stack([mlp(inputs[i]).abs().squeeze() for i, mlp in enumerate(mlps)])
    sigma = tuner(features)
    assert sigma.shape == (len(blocks),) and sigma.dtype == torch.float32
    torch.testing.assert_close(sigma, expected.detach(), rtol=1e-5, atol=1e-6)
    for i, mlp in enumerate(mlps):  # block_mlp exports the same function back
        torch.testing.assert_close(tuner.block_mlp(i)(inputs[i]), mlp(inputs[i]))


def test_sigma_is_about_one_at_the_initial_state(blocks: ParamBlocks, tuner: Tuner) -> None:
    sigma = tuner(initial_features(blocks))
    assert torch.all((sigma > 0.95) & (sigma < 1.05)), sigma


def test_a_tuner_can_start_at_the_weight_rms_heuristic(blocks: ParamBlocks, tuner: Tuner) -> None:
    """``start_at`` (``pretrain-tuner --init weight-rms``): the initial sigmas are the weight-RMS
    scales up to one common factor, each as close to it as a default tuner's are to 1 (within
    5%), so a fresh tuner perturbs as the heuristic does; bad scales are refused."""
    from l2l.scales import weight_rms_scale

    features = initial_features(blocks)
    rms = weight_rms_scale(features)
    assert float(rms.max() / rms.min()) > 3  # the blocks differ: the test can tell
    sigma = tuner.start_at(rms)(features).detach().double()
    ratio = sigma / rms
    assert float(ratio.max() / ratio.min()) < 1.1, ratio
    assert abs(float(sigma.log().mean())) < 0.02  # scaled around 1
    for bad in (rms[:-1], -rms, rms * float("nan")):
        with pytest.raises(ValueError, match="positive finite block scales"):
            tuner.start_at(bad)


def test_sigma_is_positive_even_when_the_mlp_outputs_zero(
    blocks: ParamBlocks, tuner: Tuner
) -> None:
    with torch.no_grad():
        tuner.w2.zero_()
        tuner.b2.copy_(torch.tensor([0.0, -0.5, 0.5, -1e-12, 2.0]))
    sigma = tuner(random_features(len(blocks)))
    assert torch.all(sigma > 0)
    torch.testing.assert_close(sigma, torch.tensor([1e-8, 0.5, 0.5, 1e-8, 2.0]))


def test_gradient_flows_into_every_weight(blocks: ParamBlocks, tuner: Tuner) -> None:
    features = random_features(len(blocks))
    loss = (tuner(features) * torch.arange(1.0, 6.0)).sum()
    loss.backward()
    for name, param in tuner.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_forward_rejects_wrong_feature_shape(tuner: Tuner) -> None:
    with pytest.raises(ValueError, match=r"shape \(4, 5\), expected \(5, 5\)"):
        tuner(torch.zeros(4, 5))


def test_save_load_round_trip(tmp_path: Path, blocks: ParamBlocks, tuner: Tuner) -> None:
    tuner.config.recipe = {"tasks": ["copa"], "steps": 10, "lr_mlp": 0.1}
    tuner.config.metrics = {"final_loss": 0.25}
    folder = tmp_path / "tuner"
    tuner.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["tuner"]  # no staging leftovers
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key in ("base_model", "revision", "model_type", "block_names", "block_shapes", "fingerprint",
                "features", "feature_scaling", "eps", "normalize", "recipe", "metrics",
                "library_name", "library_version", "created_at"):  # fmt: skip
        assert key in config, key
    assert config["base_model"] == "org/tiny-lm" and config["revision"] == "abc123"
    assert config["fingerprint"] == blocks.fingerprint()
    assert config["library_name"] == "l2l-zo" and config["recipe"]["tasks"] == ["copa"]
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: l2l-zo" in card
    assert "base_model: org/tiny-lm" in card and "- zeroth-order" in card and "copa" in card
    loaded = Tuner.from_pretrained(folder)
    features = random_features(len(blocks))
    torch.testing.assert_close(loaded(features), tuner(features), rtol=0, atol=0)
    assert loaded.config == tuner.config


def test_save_overwrites_a_tuner_folder_and_keeps_foreign_files(
    tmp_path: Path, tuner: Tuner
) -> None:
    folder = tmp_path / "out"
    tuner.save_pretrained(folder)
    (folder / "train.log").write_text("keep me")
    with torch.no_grad():
        tuner.b2.add_(1.0)
    tuner.save_pretrained(folder)
    assert (folder / "train.log").read_text() == "keep me"
    torch.testing.assert_close(Tuner.from_pretrained(folder).b2, tuner.b2)


def _crash(*args: object, **kwargs: object) -> None:
    Path(str(args[1])).write_bytes(b"half a file")  # the writer got halfway, then died
    raise OSError("disk full")


def test_save_is_atomic_on_crash(tmp_path: Path, tuner: Tuner, monkeypatch) -> None:
    monkeypatch.setattr(tuner_io, "save_file", _crash)
    with pytest.raises(OSError, match="disk full"):
        tuner.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no target, no staging folder


def test_crash_while_overwriting_keeps_the_old_tuner(
    tmp_path: Path, tuner: Tuner, monkeypatch
) -> None:
    folder = tmp_path / "tuner"
    tuner.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(tuner_io, "save_file", _crash)
    with pytest.raises(OSError):
        tuner.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["tuner"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_names_the_file(tmp_path: Path, tuner: Tuner, damage: str) -> None:
    tuner.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07garbage" * 50)
    with pytest.raises(TunerFormatError, match=r"model\.safetensors.*force_download=True"):
        Tuner.from_pretrained(tmp_path)


def test_missing_config_key_names_key_and_file(tmp_path: Path, tuner: Tuner) -> None:
    tuner.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["block_shapes"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(TunerFormatError, match=r"config\.json: missing key 'block_shapes'"):
        Tuner.from_pretrained(tmp_path)


def test_config_that_is_not_json(tmp_path: Path, tuner: Tuner) -> None:
    tuner.save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"base_model": ')
    with pytest.raises(TunerFormatError, match=r"config\.json is not valid JSON"):
        Tuner.from_pretrained(tmp_path)


def test_edited_block_list_fails_the_fingerprint(tmp_path: Path, tuner: Tuner) -> None:
    tuner.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["block_shapes"][1] = [99, 6]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(TunerFormatError, match=r"config\.json: 'fingerprint'.*edited"):
        Tuner.from_pretrained(tmp_path)


def test_weights_with_wrong_shapes_vs_config(tmp_path: Path, blocks: ParamBlocks) -> None:
    Tuner.for_blocks(blocks, "org/tiny-lm").save_pretrained(tmp_path / "a")
    small = ParamBlocks(blocks.names[:3], blocks.params[:3], blocks.aliases[:3])
    Tuner.for_blocks(small, "org/tiny-lm").save_pretrained(tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).replace(tmp_path / "b" / WEIGHTS_NAME)
    with pytest.raises(TunerFormatError, match=r"'w1' has shape \(5, 64, 5\).*shape \(3, 64, 5\)"):
        Tuner.from_pretrained(tmp_path / "b")


def test_config_from_a_newer_library_is_refused(tuner: Tuner) -> None:
    data = tuner.config.to_dict() | {"format_version": 99}
    with pytest.raises(TunerFormatError, match="format_version.*upgrade l2l-zo"):
        TunerConfig.from_dict(data, source="x/config.json")


def test_unknown_config_keys_are_ignored(tuner: Tuner, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        config = TunerConfig.from_dict(tuner.config.to_dict() | {"future_key": 1})
    assert config == tuner.config and "future_key" in caplog.text


class WiderLM(TinyLM):
    def __init__(self) -> None:
        super().__init__(ffn=12)


class UntiedLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.head.weight = nn.Parameter(torch.zeros(11, 6))


class RenamedLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.ffn_up = self.up
        del self.up


@pytest.mark.parametrize(
    ("model_cls", "message"),
    [
        (
            WiderLM,
            r"block 1 'up\.weight': the tuner expects shape \(10, 6\), the model has \(12, 6\)",
        ),
        (UntiedLM, r"block 5 'head\.weight' \(11, 6\) of the model has no tuner entry"),
        (RenamedLM, r"block 1: the tuner expects 'up\.weight' \(10, 6\) but the model has 'down"),
    ],
)
def test_mismatch_names_the_first_bad_block(tuner: Tuner, model_cls: type, message: str) -> None:
    with pytest.raises(TunerMismatchError, match=message) as info:
        tuner.check_compatible(blocks_of(model_cls()), model_id="org/other")
    assert "org/tiny-lm" in str(info.value) and "meta-train" in str(info.value)
    assert "pretrain-tuner" not in str(info.value)  # l2l names no command; the apps add that


def test_missing_block_is_named(blocks: ParamBlocks, tuner: Tuner) -> None:
    fewer = ParamBlocks(blocks.names[:4], blocks.params[:4], blocks.aliases[:4])
    with pytest.raises(
        TunerMismatchError, match=r"block 4 'norm\.weight' \(6,\) expected by the tuner"
    ):
        tuner.check_compatible(fewer)


def test_instruct_variant_with_same_blocks_is_accepted(tuner: Tuner, caplog) -> None:
    torch.manual_seed(123)  # different weights, same names and shapes
    instruct = blocks_of(TinyLM())
    with caplog.at_level(logging.INFO, logger="l2l.tuner.model"):
        tuner.check_compatible(instruct, model_id="org/tiny-lm-instruct")
    assert "org/tiny-lm-instruct" in caplog.text and "match" in caplog.text
    assert tuner(initial_features(instruct)).shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_statistics_match_float64(dtype):
    """Large blocks use chunked sum/dot (E[x^2] - E[x]^2), small ones float64 var_mean; both
    must match a float64 reference, also for a block whose mean dwarfs its spread."""
    from l2l.blocks import EXACT_STATS, STATS_PART

    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(64, generator=gen) * 0.1 + 1.0,  # a norm weight: exact path
        torch.randn(STATS_PART + 12345, generator=gen) * 0.02,  # several parts
        torch.randn(2 * EXACT_STATS, generator=gen) * 0.01 + 1.0,  # mean >> std
    ]
    blocks = ParamBlocks.from_params([nn.Parameter(t.to(dtype)) for t in tensors])
    mean, var = blocks.statistics()
    for i, t in enumerate(tensors):
        ref_var, ref_mean = torch.var_mean(t.to(dtype).double(), correction=0)
        assert float(mean[i]) == pytest.approx(float(ref_mean), rel=1e-5, abs=1e-9)
        # the fast path is ~1e-6; the mean >> std block must have fallen back to the exact one
        assert float(var[i]) == pytest.approx(float(ref_var), rel=1e-4)


def test_weight_rms_scale_is_each_blocks_rms_and_drives_a_step():
    from helpers import lm_closure, tiny_lm

    from l2l import ZOSGD
    from l2l.scales import weight_rms_scale

    model = tiny_lm()
    opt = ZOSGD(model, lr=1e-3, block_scale=weight_rms_scale, record=True)
    sigma, scales = opt.block_scales()
    rms = torch.stack([p.detach().double().square().mean().sqrt() for p in opt.blocks.params])
    torch.testing.assert_close(sigma, rms.clamp_min(1e-8), rtol=1e-4, atol=1e-8)
    numels = opt.blocks.numels.double()
    assert float((numels * scales.square()).sum() / numels.sum()) == pytest.approx(1.0)
    opt.step(lm_closure(model))
    assert opt.records[0].scales == pytest.approx(scales.tolist())


def test_the_previous_sigma_feature_stays_where_the_tuner_computes_it(monkeypatch):
    """On the accelerator's path a step's sigma is the next step's feature as it is, on the
    weights' device (no upload per step), and with the same float32 values as the record."""
    from helpers import lm_closure, tiny_lm

    import l2l.z as zdef
    from l2l import ZOSGD

    monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", zdef.ACCELERATOR_POLICY | {"cpu"})
    model = tiny_lm()
    tuner = Tuner.for_blocks(blocks_of(model), "org/tiny-lm", seed=1)
    seen, outs = [], []
    original = tuner.step_sigma

    def step_sigma(blocks, prev_losses, prev_sigma):
        seen.append(prev_sigma)
        outs.append(original(blocks, prev_losses, prev_sigma))
        return outs[-1]

    monkeypatch.setattr(tuner, "step_sigma", step_sigma)
    opt = ZOSGD(model, lr=1e-3, block_scale=tuner, normalize=False, record=True)
    for _ in range(3):
        opt.step(lm_closure(model))
    assert len(seen) == 3 and torch.equal(seen[0], torch.ones(len(opt.blocks)))
    for step in (1, 2):
        assert seen[step].data_ptr() == outs[step - 1].data_ptr()  # not a host round trip
        assert seen[step].dtype == torch.float32
        assert seen[step].tolist() == opt.records[step - 1].scales  # normalize=False: raw sigma


def test_a_skipped_step_leaves_no_stale_sigma_for_another_provider(monkeypatch):
    """A tuner's sigma of a skipped (non-finite) step is not the next feature of whatever
    provides the scales next."""
    from helpers import lm_closure, tiny_lm

    import l2l.z as zdef
    from l2l import ZOSGD
    from l2l.scales import weight_rms_scale

    monkeypatch.setattr(zdef, "ACCELERATOR_POLICY", zdef.ACCELERATOR_POLICY | {"cpu"})
    model = tiny_lm()
    tuner = Tuner.for_blocks(blocks_of(model), "org/tiny-lm", seed=1)
    opt = ZOSGD(model, lr=1e-3, block_scale=tuner, normalize=False, nonfinite="skip", record=True)
    closure = lm_closure(model)
    opt.step(lambda: closure() * float("nan"))
    assert opt.nonfinite_steps == 1
    opt.block_scale = weight_rms_scale
    opt.step(closure)
    assert opt._prev_sigma.dtype == torch.float32
    assert opt._prev_sigma.tolist() == pytest.approx(opt.records[-1].scales, rel=1e-7)


def test_a_tuner_away_from_the_weights_is_warned_about():
    from helpers import tiny_lm

    from l2l import ZOSGD

    model = tiny_lm()
    tuner = Tuner.for_blocks(blocks_of(model), "org/tiny-lm").to("meta")
    with pytest.warns(RuntimeWarning, match=r"block_scale is on meta and the weights on cpu"):
        ZOSGD(model, lr=1e-3, block_scale=tuner)
