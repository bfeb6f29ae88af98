"""End to end: ``pretrain-tuner`` meta-trains a tuner for tiny-llama, in process.

The tuner it writes reloads, attaches to every ZO method and to ``finetune`` (by folder, by
local zoo name and from a loopback Hub after ``--push_to_hub``); ``--resume`` continues the
global step from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import isolated_home, write_classification_task
from hub_server import HubServer, set_offline
from safetensors.torch import load_file

from l2l import LOZO, ZOSGD, HiZOO
from l2l.blocks import ParamBlocks
from l2l.tuner import ARTIFACT_FILES, Tuner
from llm.models import load_model
from pretrain_tuner.cli import main
from pretrain_tuner.config import parse
from tuner_zoo.resolve import resolve_tuner

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune(argv: list[str]) -> int:
    from finetune.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_classification_task(tmp_path_factory.mktemp("task") / "reviews.jsonl", n=40)


def pretrain_args(task: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    return [
        "--model", "tiny-llama",
        "--task", str(task),
        "--output", str(out),
        "--steps", str(steps),
        "--batch_size", "4",
        "--n_train", "24",
        "--lr_update", "1e-3",
        "--checkpoint_every", "1",
        "--accelerator", "cpu",
        "--devices", "1",
        "--no_progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, task_file) -> tuple[Path, Path]:
    """(tuner folder, L2L_HOME) of one 3-step meta-training run, registered as 'tiny-meta'."""
    root = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("L2L_HOME", str(isolated_home(root / "l2l-home")))
        assert main(pretrain_args(task_file, root / "tuner", "--name", "tiny-meta")) == 0
    return root / "tuner", root / "l2l-home"


def csv_steps(out: Path) -> list[int]:
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("meta_loss")]


def checkpoint_step(out: Path) -> int:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return int(ckpt["global_step"])


def test_writes_tuner_checkpoint_and_logs(trained):
    out, _ = trained
    for name in ARTIFACT_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["base_model"] == "l2l/tiny-llama"
    assert config["metrics"]["steps"] == 3  # one global step per meta-step
    assert config["recipe"]["lr_update"] == 1e-3
    assert checkpoint_step(out) == 3
    assert csv_steps(out) == [0, 1, 2]  # logged every step by default
    weights = load_file(str(out / "model.safetensors"))
    fresh = Tuner.for_blocks(ParamBlocks.from_module(load_model("tiny-llama")[0]), "x")
    assert not torch.equal(weights["w1"], fresh.w1.detach()), "meta-training changed nothing"


@pytest.mark.parametrize(
    "cls,kwargs", [(ZOSGD, {}), (HiZOO, {}), (LOZO, {"rank": 2}), (LOZO, {"momentum": 0.9})]
)
def test_tuner_attaches_to_every_method(trained, cls, kwargs):
    from llm.tasks import load_task, loss_batch

    out, _ = trained
    tuner = Tuner.load_folder(out)
    model, tokenizer = load_model("tiny-llama")
    tuner.check_compatible(ParamBlocks.from_module(model), model_id="l2l/tiny-llama")
    examples = load_task(Path(tuner.config.recipe["tasks"][0]), n_train=4).train
    batch = loss_batch(examples, tokenizer)
    opt = cls(model, lr=1e-3, block_scale=tuner, record=True, **kwargs)
    losses = [float(opt.step(lambda: model(**batch).loss)) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(r.scales is not None and len(r.scales) == tuner.num_blocks for r in opt.records)


def test_registered_in_local_zoo_and_used_by_finetune(trained, task_file, tmp_path, monkeypatch):
    out, home = trained
    monkeypatch.setenv("L2L_HOME", str(isolated_home(home)))
    assert resolve_tuner("tiny-meta", offline=True) == home / "zoo" / "tiny-meta"
    run = tmp_path / "run"
    argv = ["--tuner", "tiny-meta", "--task", str(task_file), "--output", str(run)]
    argv += ["--steps", "2", "--batch_size", "4", "--n_train", "16", "--n_test", "4"]
    argv += ["--eval_examples", "2", "--accelerator", "cpu", "--no_progress"]
    assert finetune(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "tiny-llama" and results["tuner"]["spec"] == "tiny-meta"


def csv_losses(out: Path) -> dict[int, str]:
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): r["loss_plus"] for r in csv.DictReader(f) if r.get("loss_plus")}


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


@pytest.mark.parametrize("stop", [2, 6])  # mid-epoch, and at the epoch end where the reset falls
def test_interrupted_then_resumed_equals_uninterrupted(task_file, tmp_path, monkeypatch, stop):
    """6 batches an epoch, a reset every epoch: 8 steps in one run == ``stop`` steps, then
    ``--resume`` to 8: the same batches (losses), the same tuner, the same base model."""
    monkeypatch.setenv("L2L_HOME", str(isolated_home(tmp_path / "home")))
    common = ("--name", "none", "--reset_every", "1")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(pretrain_args(task_file, whole, *common, steps=8)) == 0
    assert main(pretrain_args(task_file, parts, *common, steps=stop)) == 0
    assert checkpoint_step(parts) == stop
    assert main(pretrain_args(task_file, parts, *common, "--resume", steps=8)) == 0
    assert checkpoint_step(parts) == 8
    assert csv_steps(parts) == list(range(8))  # the first run's rows are kept
    assert json.loads((parts / "config.json").read_text())["metrics"]["steps"] == 8
    assert csv_losses(parts) == csv_losses(whole)
    a, b = load_file(str(parts / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = model_weights(parts), model_weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_fail_before_training(task_file, tmp_path, capsys):
    out = tmp_path / "tuner"
    assert main(pretrain_args(task_file, out, "--resume")) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    assert main(pretrain_args(task_file, out, "--precision", "16-mixed")) == 2
    assert "--precision 16-mixed: not supported" in capsys.readouterr().err
    assert main(pretrain_args(tmp_path / "missing.jsonl", out)) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert main(pretrain_args(task_file, out, "--strategy", "fsdp_cpu_offload")) == 2
    assert "use --strategy fsdp (FSDP2" in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_push_to_hub_then_finetune_downloads_it(task_file, tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_HOME", str(isolated_home(tmp_path / "home")))
    monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
    set_offline(monkeypatch, False)
    repo = "test-user/tiny-llama-tuner"
    with HubServer() as hub:
        hub.configure(monkeypatch, cache_dir=tmp_path / "hf" / "hub")
        out = tmp_path / "tuner"
        argv = pretrain_args(task_file, out, "--name", "none", "--push_to_hub", repo, steps=1)
        assert main(argv) == 0
        files = hub.files(repo)
        assert set(ARTIFACT_FILES) <= set(files)
        assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()

        run = tmp_path / "run"
        argv = ["--tuner", repo, "--task", str(task_file), "--output", str(run), "--steps", "2"]
        argv += ["--batch_size", "4", "--n_train", "16", "--n_test", "4", "--eval_examples", "2"]
        argv += ["--accelerator", "cpu", "--no_progress"]
        assert finetune(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "tiny-llama"  # the tuner's base model, resolved offline
    folder = Path(results["tuner"]["folder"])
    assert folder.is_relative_to(tmp_path / "hf" / "hub")
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_help_explains_every_flag_in_the_shared_vocabulary(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "`" not in text
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text) if e.startswith("  --")]
    flags = [e for e in entries if not e.startswith(("--config", "--print_config"))]
    assert len(flags) > 30
    for entry in flags:
        assert "(default: " in entry or "(required)" in entry, entry
    for flag in ("--task", "--steps", "--model_revision", "--overwrite", "--batch_size"):
        assert any(e.startswith((flag + " ", flag + ",")) for e in flags), flag
    assert any(e.startswith("--devices") and "(default: 1)" in e for e in flags)
    for old in ("--tasks", "--max-steps", "--max_steps", "--revision ", "--force"):
        assert old not in text


def test_print_config_is_a_recipe_that_reruns(task_file, tmp_path, capsys):
    argv = ["--model", "tiny-llama", "--task", f"[{task_file},tweets]", "--output", "out"]
    argv += ["--steps", "7", "--no_normalize", "--devices", "2"]
    assert main([*argv, "--print_config"]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(capsys.readouterr().out)
    again = parse(["--config", str(recipe)])
    assert again == parse(argv)
    assert again.tasks == [str(task_file), "tweets"] and again.steps == 7
    assert again.normalize is False and again.devices == 2


def test_the_card_gets_the_meta_loss_curve_from_the_log(tmp_path):
    from pretrain_tuner.cli import meta_loss_curve

    log = tmp_path / "metrics.csv"
    assert meta_loss_curve(log) is None
    rows = ["epoch,meta_loss,sigma_mean,step"]
    rows += [f"0,{1.0 if step < 10 else 0.5},1.0,{step}" for step in range(4, 20, 5)]  # 5..20
    rows.append("0,,1.0,19")  # a row of other metrics only
    log.write_text("\n".join(rows) + "\n")
    assert meta_loss_curve(log, windows=2) == "1-10: 1.000; 11-20: 0.500"


@pytest.mark.parametrize(
    "argv0, recorded",
    [
        ("/venv/bin/pretrain-tuner", True),
        ("/src/pretrain_tuner/cli.py", True),  # python -m pretrain_tuner.cli
        ("/venv/bin/pytest", False),
    ],
)
def test_the_recipe_records_the_command_when_run_from_the_command_line(
    argv0, recorded, monkeypatch
):
    from pretrain_tuner.cli import _from_command_line

    monkeypatch.setattr(sys, "argv", [argv0, "--steps", "5"])
    assert _from_command_line() is recorded
