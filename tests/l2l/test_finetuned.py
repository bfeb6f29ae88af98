"""A fine-tune shared as kilobytes: weights hash, card, push + replay + verify (loopback Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import lm_closure, same_bits, snapshot, tiny_lm
from hub_server import HubServer, set_offline

from l2l import MeZO, Trajectory
from l2l.finetuned import (
    CARD_NAME,
    FinetuneFormatError,
    FinetuneInfo,
    WeightsMismatchError,
    finetune_info,
    load_finetuned,
    push_finetuned,
    read_card,
    render_card,
    weights_sha256,
)
from l2l.methods.factory import make_method

BASE = "l2l/tiny-llama"


def fine_tune(folder: Path, method: str = "mezo", steps: int = 3, with_hash: bool = True):
    """A few recorded ZO steps on the tiny model; writes a finetune-style output folder."""
    model = tiny_lm()
    opt = make_method(method, model, lr=1e-3, eps=1e-3, seed=5, record=True, nu=2)
    closure = lm_closure(model)
    for _ in range(steps):
        opt.step(closure)
    folder.mkdir(parents=True, exist_ok=True)
    Trajectory.from_optimizer(opt).save(folder / "trajectory.json")
    results = dict(
        model=BASE,
        method=method,
        task="tweets",
        config=dict(dtype="float32", objective="classification", tuner="none"),
        eval_before=dict(accuracy=0.5, n=10, split="test"),
        eval_after=dict(accuracy=0.7, n=10, split="test"),
        train_loss=[5.7, 5.6, 5.5],
        tuner=None,
    )
    if with_hash:
        results["weights_sha256"] = weights_sha256(model)
    (folder / "results.json").write_text(json.dumps(results))
    return model


def test_weights_hash_sees_every_bit_name_and_dtype() -> None:
    model = tiny_lm()
    digest = weights_sha256(model)
    assert digest == weights_sha256(tiny_lm()) == weights_sha256(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = sorted(state)[3]
    flat = state[name].view(-1).view(torch.int32)
    flat[0] ^= 1  # one bit of one weight
    assert weights_sha256(state) != digest
    state = dict(model.state_dict())
    assert weights_sha256({k + "_": v for k, v in state.items()}) != digest
    assert weights_sha256({k: v.double() for k, v in state.items()}) != digest


def test_card_records_the_run_and_reads_back(tmp_path: Path) -> None:
    fine_tune(tmp_path)
    info = finetune_info(tmp_path)
    assert info.base_model == BASE and info.method == "mezo" and info.steps == 3
    assert info.task == "tweets" and info.objective == "classification"
    assert info.dtype == "float32" and info.trainer == "finetune"
    assert info.metrics == {"accuracy_before": 0.5, "accuracy_after": 0.7, "train_loss_last": 5.5}
    assert info.trajectory["format"] == "l2l-trajectory" and "records" not in info.trajectory
    card = render_card(info)
    assert (
        card.startswith("---\n") and info.weights_sha256 in card and "base_model: " + BASE in card
    )
    (tmp_path / CARD_NAME).write_text(card)
    assert read_card(tmp_path / CARD_NAME) == info
    assert FinetuneInfo.from_dict(info.to_dict(), "x") == info


@pytest.mark.parametrize("method", ["mezo", "hizoo", "lozo-m"])
def test_load_finetuned_rebuilds_the_weights_bit_for_bit(tmp_path: Path, method: str) -> None:
    trained = fine_tune(tmp_path, method=method)
    rebuilt = load_finetuned(tmp_path, model=tiny_lm())
    assert same_bits(snapshot(rebuilt), snapshot(trained))


def test_another_base_model_is_refused(tmp_path: Path) -> None:
    fine_tune(tmp_path)
    with pytest.raises(WeightsMismatchError, match=f"base model {BASE}.*discard it"):
        load_finetuned(tmp_path, model=tiny_lm(seed=1))  # same blocks, other weights
    with pytest.raises(FinetuneFormatError, match="cannot replay.*blocks"):
        load_finetuned(tmp_path, model=tiny_lm("opt"))


def test_an_edited_trajectory_is_refused(tmp_path: Path) -> None:
    fine_tune(tmp_path)
    info = finetune_info(tmp_path)
    (tmp_path / CARD_NAME).write_text(render_card(info))
    data = json.loads((tmp_path / "trajectory.json").read_text())
    data["records"][0]["grad"] *= 2
    (tmp_path / "trajectory.json").write_text(json.dumps(data))
    with pytest.raises(FinetuneFormatError, match="edited after the push"):
        load_finetuned(tmp_path, model=tiny_lm())


def test_a_run_without_a_weights_hash(tmp_path: Path) -> None:
    trained = fine_tune(tmp_path, with_hash=False)
    with pytest.raises(FinetuneFormatError, match="verify=False"):
        load_finetuned(tmp_path, model=tiny_lm())
    rebuilt = load_finetuned(tmp_path, model=tiny_lm(), verify=False)
    assert same_bits(snapshot(rebuilt), snapshot(trained))
    with pytest.raises(FinetuneFormatError, match="weights_sha256=.*model="):
        push_finetuned(tmp_path, "test-user/never-pushed")


def test_a_folder_without_a_trajectory(tmp_path: Path) -> None:
    with pytest.raises(FinetuneFormatError, match="no trajectory.json"):
        load_finetuned(tmp_path, model=tiny_lm())


# ------------------------------------------------------------------ the loopback Hub


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
        set_offline(monkeypatch, False)
        server.configure(monkeypatch, cache_dir=tmp_path / "hf" / "hub")
        yield server


@pytest.mark.network
def test_push_then_load_rebuilds_bit_for_bit(tmp_path: Path, hub: HubServer) -> None:
    trained = fine_tune(tmp_path / "run", steps=4)
    url = push_finetuned(tmp_path / "run", "test-user/tiny-mezo")
    assert "test-user/tiny-mezo" in url
    files = hub.files("test-user/tiny-mezo")
    assert sorted(files) == ["README.md", "results.json", "trajectory.json"]
    assert sum(len(v) for v in files.values()) < 20_000  # kilobytes, no weights
    assert files["trajectory.json"] == (tmp_path / "run" / "trajectory.json").read_bytes()
    rebuilt = load_finetuned("test-user/tiny-mezo", model=tiny_lm())
    assert same_bits(snapshot(rebuilt), snapshot(trained))


@pytest.mark.network
def test_push_from_a_trajectory_replays_to_find_the_hash(tmp_path: Path, hub: HubServer) -> None:
    model = tiny_lm()
    opt = MeZO(model, lr=1e-3, seed=2, record=True)
    for _ in range(2):
        opt.step(lm_closure(model))
    trajectory = Trajectory.from_optimizer(opt)
    push_finetuned(
        trajectory, "test-user/from-trajectory", results={"model": BASE}, model=tiny_lm()
    )
    card = hub.files("test-user/from-trajectory")["README.md"].decode()
    assert weights_sha256(model) in card
    with pytest.raises(WeightsMismatchError):  # a wrong base is caught before the upload
        push_finetuned(
            trajectory, "test-user/wrong-base", results={"model": BASE}, model=tiny_lm(seed=3),
            weights_sha256=weights_sha256(model),
        )  # fmt: skip
    assert hub.files("test-user/wrong-base") == {}
