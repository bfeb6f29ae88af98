"""The examples run end to end on the tiny model: plain PyTorch, Lightning, the Trainer recipe."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import same_bits, snapshot

from l2l import Trajectory, replay
from l2l.finetuned import weights_sha256
from llm.models import load_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def replayed(trajectory: Path):
    model, _ = load_model("tiny-llama")
    replay(model, Trajectory.load(trajectory))
    return model


def test_plain_pytorch_example(tmp_path: Path, capsys) -> None:
    model = example("pytorch_zo").main(steps=4, output=str(tmp_path / "trajectory.json"))
    trajectory = Trajectory.load(tmp_path / "trajectory.json")
    assert [r.lr for r in trajectory.records] == pytest.approx(
        [1e-3 * (1 - t / 4) for t in range(4)]
    )
    assert same_bits(snapshot(replayed(tmp_path / "trajectory.json")), snapshot(model))
    assert all(p.grad is None for p in model.parameters())
    assert capsys.readouterr().out.count("loss") == 4


def test_lightning_example(tmp_path: Path) -> None:
    module = example("lightning_zo").main(["--steps", "4", "--output", str(tmp_path)])
    trajectory = Trajectory.load(tmp_path / "trajectory.json")
    assert [r.step for r in trajectory.records] == [0, 1, 2, 3]
    assert [r.lr for r in trajectory.records] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])
    assert same_bits(snapshot(replayed(tmp_path / "trajectory.json")), snapshot(module.model))
    assert all(p.grad is None for p in module.model.parameters())
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [float(r["train_loss"]) for r in rows if r.get("train_loss")]


def test_mezo_trainer_recipe(tmp_path: Path) -> None:
    metrics = example("mezo_trainer").main(
        [
            "--model", "tiny-llama", "--task", "tweets", "--n_train", "32", "--n_dev", "16",
            "--output_dir", str(tmp_path), "--max_steps", "4", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "8", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "True",
        ]
    )  # fmt: skip
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "l2l/tiny-llama" and results["objective"] == "classification"
    assert results["steps"] == 4 and "eval_accuracy" in results["metrics"]
    rebuilt = replayed(tmp_path / "trajectory.json")
    assert weights_sha256(rebuilt) == results["weights_sha256"]
