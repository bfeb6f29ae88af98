"""``finetune``'s typed settings: --help, --list_tasks, recipe files, and the tuner's defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import finetune_argv, write_classification_task
from hub_server import set_offline

from finetune.cli import build_parser, main, parse, setup
from finetune.config import FinetuneConfig
from l2l import Trajectory
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
from llm.models import load_model


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    set_offline(monkeypatch, True)


@pytest.fixture
def task_file(tmp_path):
    return write_classification_task(tmp_path / "reviews.jsonl")


def save_tuner(folder, **config):
    """A tiny-llama tuner with non-trivial sigmas and the given config (eps, normalize, ...)."""
    model, _ = load_model("tiny-llama")
    tuner = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=1, **config)
    with torch.no_grad():
        tuner.b2.copy_(torch.linspace(0.5, 2.0, tuner.num_blocks))
    tuner.save_pretrained(folder)
    return folder


def test_help_explains_every_flag_with_its_default(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and "`" not in text  # no raw RST markup
    help_of = {a.dest: a for a in build_parser()._actions}
    for field in dataclasses.fields(FinetuneConfig):
        action = help_of[field.name]
        assert f"--{field.name}" in text
        assert action.help and len(action.help) > 10, f"--{field.name} has no help"
    for line in ("(default: 100)", "(default: none)", "(default: mezo)", "(default: true)"):
        assert line in text


def test_list_tasks_needs_no_task(capsys):
    assert main(["--list_tasks"]) == 0
    out = capsys.readouterr().out
    assert "tweets" in out and "sst2" in out and ".jsonl" in out


def test_print_config_is_a_recipe_that_reads_back(task_file, tmp_path, capsys):
    argv = ["--task", str(task_file), "--lr", "3e-4", "--no_progress", "--method", "lozo"]
    assert main([*argv, "--print_config"]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(capsys.readouterr().out)
    assert parse(["--config", str(recipe)]) == parse(argv)
    assert parse(["--config", str(recipe), "--steps", "7"]).steps == 7  # flags after win


def test_dashed_flag_points_to_its_underscore_spelling(task_file, capsys):
    assert main(["--task", str(task_file), "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetune: error: unrecognized arguments: --batch-size")
    assert "--batch_size" in err and "\n" not in err


# ------------------------------------------------------------- the tuner's eps and normalize


def test_tuner_eps_and_normalize_reach_the_optimizer(task_file, tmp_path):
    tuner = save_tuner(tmp_path / "tuner", eps=3.7e-3, normalize=False)
    argv = finetune_argv(task_file, tmp_path / "out", "--tuner", str(tuner), steps=2)
    run = setup(parse(argv))
    assert run.opt.group["eps"] == 3.7e-3 and run.opt.normalize is False
    scales = [run.opt.block_scales()]
    raw, effective = scales[0]
    assert torch.equal(raw, effective)  # normalisation off: the tuner's sigmas as they are

    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["resolved"]["eps"] == {"value": 3.7e-3, "source": "tuner"}
    assert results["resolved"]["normalize"] == {"value": False, "source": "tuner"}
    assert results["resolved"]["lr"] == {"value": 1e-3, "source": "user"}
    hparams = Trajectory.load(tmp_path / "out" / "trajectory.json").hparams
    assert hparams["eps"] == 3.7e-3 and hparams["normalize"] is False


def test_user_values_override_the_tuner(task_file, tmp_path):
    tuner = save_tuner(tmp_path / "tuner", eps=3.7e-3, normalize=False)
    argv = finetune_argv(task_file, tmp_path / "out", "--tuner", str(tuner), "--eps", "2e-3")
    run = setup(parse([*argv, "--normalize"]))
    assert run.opt.group["eps"] == 2e-3 and run.opt.normalize is True
    assert run.results["resolved"]["eps"]["source"] == "user"
    assert run.results["resolved"]["normalize"] == {"value": True, "source": "user"}


def test_without_a_tuner_the_defaults_apply(task_file, tmp_path):
    argv = finetune_argv(task_file, tmp_path / "out", "--model", "tiny-llama")
    argv.remove("--lr"), argv.remove("1e-3")
    run = setup(parse(argv))
    assert run.results["resolved"] == {
        "lr": {"value": 1e-6, "source": "default"},
        "eps": {"value": 1e-3, "source": "default"},
        "normalize": {"value": True, "source": "default"},
    }
