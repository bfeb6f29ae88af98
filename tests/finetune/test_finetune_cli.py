"""End to end: the ``finetune`` CLI on the built-in tiny models, in process.

Every run writes into ``tmp_path``; the local zoo (``L2L_HOME``) and the HF cache point at
temporary folders, and the Hub is offline.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import finetune_argv, write_classification_task
from hub_server import set_offline
from safetensors.torch import load_file

from finetune.cli import main
from finetune.run import Run
from l2l import Trajectory, replay
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
from llm.models import load_model
from tuner_zoo.resolve import register_local

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("mezo", "hizoo", "lozo", "lozo-m")
STEPS = 3


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_classification_task(tmp_path_factory.mktemp("task") / "reviews.jsonl")


@pytest.fixture(scope="module")
def tuner_dir(tmp_path_factory) -> Path:
    """A tuner for tiny-llama whose sigmas are far from 1, so it visibly changes the run."""
    model, _ = load_model("tiny-llama")
    tuner = Tuner.for_blocks(
        ParamBlocks.from_module(model), "l2l/tiny-llama", model_type="llama", seed=1
    )
    with torch.no_grad():
        tuner.b2.copy_(torch.linspace(0.5, 2.0, tuner.num_blocks))
    folder = tmp_path_factory.mktemp("tuner") / "tiny-llama-tuner"
    tuner.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> None:
    """A private local zoo and HF cache; the Hub is offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    set_offline(monkeypatch, True)


def args_for(task: Path | str, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return finetune_argv(task, out, *extra, steps=steps)


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_replays_to_saved_model(out: Path, model_name: str) -> None:
    """trajectory.json on a fresh base model == the saved fine-tuned weights, bit for bit."""
    model, _ = load_model(model_name)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    replay(model, out / "trajectory.json")
    state, saved = model.state_dict(), saved_weights(out)
    assert saved, "the saved model has no tensors"
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), f"{name} differs from the replayed trajectory"
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "training changed nothing"


def no_temp_files(out: Path) -> list[str]:
    return [p.name for p in out.rglob(".*")]


# ---------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("with_tuner", [False, True], ids=["no-tuner", "tuner"])
@pytest.mark.parametrize("method", METHODS)
def test_run_writes_results_and_a_replayable_trajectory(
    method, with_tuner, task_file, tuner_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    tuner = str(tuner_dir) if with_tuner else "none"
    extra = ["--model", "tiny-llama", "--method", method, "--tuner", tuner, "--save_model"]
    assert main(args_for(task_file, out, *extra)) == 0
    assert "results in" in capsys.readouterr().out

    results = read_results(out)
    assert (results["method"], results["model"], results["steps"]) == (method, "tiny-llama", STEPS)
    assert results["task"] == str(task_file)
    assert results["status"] == "finished" and results["steps_done"] == STEPS
    assert len(results["train_loss"]) == STEPS
    assert all(math.isfinite(v) for v in results["train_loss"])
    for key in ("eval_before", "eval_after"):
        assert results[key]["n"] == 6 and 0.0 <= results[key]["accuracy"] <= 1.0
    assert results["wall_time_s"] > 0 and results["peak_memory_bytes"] > 0
    if with_tuner:
        assert results["tuner"]["folder"] == str(tuner_dir)
        assert results["tuner"]["base_model"] == "l2l/tiny-llama"
    else:
        assert results["tuner"] is None

    traj = Trajectory.load(out / "trajectory.json")
    assert [r.step for r in traj.records] == list(range(STEPS))
    assert all((r.scales is not None) == with_tuner for r in traj.records)
    assert_replays_to_saved_model(out, "tiny-llama")
    assert no_temp_files(out) == []


def test_weight_rms_scale_differs_from_plain_mezo_and_replays(task_file, tmp_path):
    """``--tuner weight-rms``: per-block scales from each block's weight RMS, recorded in the
    trajectory (replay rebuilds the model), and a different run from the plain method."""
    runs = {}
    for spec in ("none", "weight-rms"):
        out = tmp_path / spec
        extra = ["--model", "tiny-llama", "--tuner", spec, "--save_model"]
        assert main(args_for(task_file, out, *extra)) == 0
        runs[spec] = read_results(out)
        traj = Trajectory.load(out / "trajectory.json")
        assert all((r.scales is not None) == (spec != "none") for r in traj.records)
        assert_replays_to_saved_model(out, "tiny-llama")
    assert runs["weight-rms"]["tuner"] == {"spec": "weight-rms", "heuristic": True}
    assert runs["weight-rms"]["weights_sha256"] != runs["none"]["weights_sha256"]
    scales = Trajectory.load(tmp_path / "weight-rms" / "trajectory.json").records[0].scales
    assert max(scales) > 10 * min(scales), "norm weights (~1) and projections (~0.02) differ"


def test_tuner_by_local_zoo_name_brings_its_base_model(task_file, tuner_dir, tmp_path):
    register_local("tiny-test-tuner", tuner_dir)
    out = tmp_path / "out"
    extra = ["--tuner", "tiny-test-tuner", "--eval_every", "2", "--save_model"]
    assert main(args_for(task_file, out, *extra)) == 0  # no --model: the tuner's base model
    results = read_results(out)
    assert results["model"] == "tiny-llama"
    assert results["tuner"]["spec"] == "tiny-test-tuner"
    assert [e["step"] for e in results["evals"]] == [2]
    assert results["evals"][0]["split"] == "dev"
    assert_replays_to_saved_model(out, "tiny-llama")


def test_offline_sentiment_task(tmp_path):
    # the data is built once from a PyPI sdist into ~/.cache/l2l (llm.assets)
    out = tmp_path / "out"
    assert main(args_for("tweets", out, "--model", "tiny-opt", steps=2)) == 0
    results = read_results(out)
    assert results["task"] == "tweets" and len(results["train_loss"]) == 2
    assert results["eval_before"]["n"] == 6


# ---------------------------------------------------------------------------------- resume


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C during the L- forward of ``step`` (the parameters are perturbed right then)."""
    original = Run.closure_for

    def closure_for(self, at):
        closure = original(self, at)
        if at != step:
            return closure
        calls = []

        def interrupted():
            calls.append(at)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return closure()

        return interrupted

    monkeypatch.setattr(Run, "closure_for", closure_for)


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_then_resumed_equals_uninterrupted(
    method, task_file, tuner_dir, tmp_path, monkeypatch, capsys
):
    extra = ["--model", "tiny-llama", "--method", method, "--tuner", str(tuner_dir)]
    extra += ["--save_model", "--nu", "2"]  # LOZO redraws V across the interruption
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args_for(task_file, whole, *extra, steps=5)) == 0

    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert main(args_for(task_file, parts, *extra, steps=5)) == 130
    assert "--resume" in capsys.readouterr().err
    stopped = read_results(parts)
    assert stopped["status"] == "interrupted" and stopped["steps_done"] == 3
    assert len(Trajectory.load(parts / "trajectory.json").records) == 3
    assert not (parts / "model").exists()

    assert main(args_for(task_file, parts, *extra, "--resume", steps=5)) == 0
    resumed, reference = read_results(parts), read_results(whole)
    assert resumed["train_loss"] == reference["train_loss"]
    assert resumed["eval_after"] == reference["eval_after"]
    assert resumed["status"] == "finished" and resumed["steps_done"] == 5
    a, b = saved_weights(parts), saved_weights(whole)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_resume_refuses_changed_settings(task_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args_for(task_file, out, "--model", "tiny-llama", steps=2)) == 0
    before = (out / "results.json").read_bytes()
    code = main(args_for(task_file, out, "--model", "tiny-llama", "--resume", "--lr", "0.1"))
    assert code == 2
    assert "lr was 0.001, now 0.1" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


# ---------------------------------------------------------------------------------- bad input


def run_failing(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: ")
    return err


def test_unknown_task_lists_close_names(tmp_path, capsys):
    err = run_failing(args_for("tweet", tmp_path / "out", "--model", "tiny-llama"), capsys)
    assert "unknown task 'tweet'" in err and "did you mean tweets" in err
    assert not (tmp_path / "out").exists()


def test_unknown_tuner(task_file, tmp_path, capsys):
    argv = args_for(task_file, tmp_path / "out", "--model", "tiny-llama", "--tuner", "no-such")
    err = run_failing(argv, capsys)
    assert "no tuner called 'no-such'" in err
    assert not (tmp_path / "out").exists()


def test_tuner_for_another_model(task_file, tuner_dir, tmp_path, capsys):
    argv = args_for(task_file, tmp_path / "out", "--model", "tiny-opt", "--tuner", str(tuner_dir))
    err = run_failing(argv, capsys)
    assert "tuner for l2l/tiny-llama does not fit this model" in err
    assert "block 0: the tuner expects 'model.embed_tokens.weight'" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "lines,expected",
    [
        (['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"}', '{"text": "c", '],
         "line 3: malformed JSON"),
        (['{"text": "a", "lable": "x"}'], "has no column 'label'"),
    ],
    ids=["bad-json-line", "missing-column"],
)  # fmt: skip
def test_malformed_task_file(lines, expected, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    err = run_failing(args_for(data, tmp_path / "out", "--model", "tiny-llama"), capsys)
    assert str(data) in err and expected in err


def nan_at(monkeypatch, step: int) -> None:
    """The model's loss at ``step`` comes out NaN."""
    original = Run.closure_for

    def closure_for(self, at):
        closure = original(self, at)
        return (lambda: closure() * float("nan")) if at == step else closure

    monkeypatch.setattr(Run, "closure_for", closure_for)


def test_nonfinite_loss_stops_with_consistent_files(task_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    nan_at(monkeypatch, 2)
    argv = args_for(task_file, out, "--model", "tiny-llama", "--checkpoint_every", "1", steps=4)
    err = run_failing(argv, capsys)
    assert "non-finite loss at step 2" in err and "--on_nonfinite" in err

    results = read_results(out)  # complete JSON, written after the last good step
    assert results["status"] == "failed" and results["steps_done"] == 3
    assert all(math.isfinite(v) for v in results["train_loss"][:2])
    assert math.isnan(results["train_loss"][2]) and len(results["train_loss"]) == 3
    assert len(Trajectory.load(out / "trajectory.json").records) == 2
    assert json.loads((out / "state.json").read_text())["zo"]["step_count"] == 3
    assert no_temp_files(out) == []


def test_nonfinite_loss_skip_policy(task_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nan_at(monkeypatch, 1)
    argv = args_for(task_file, out, "--model", "tiny-llama", "--on_nonfinite", "skip", steps=3)
    assert main(argv) == 0
    results = read_results(out)
    assert results["nonfinite_steps"] == 1 and len(results["train_loss"]) == 3
    assert [r.step for r in Trajectory.load(out / "trajectory.json").records] == [0, 2]


def test_output_under_a_file(task_file, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    err = run_failing(args_for(task_file, blocker / "out", "--model", "tiny-llama"), capsys)
    assert f"cannot write {blocker / 'out'}" in err
    err = run_failing(args_for(task_file, blocker, "--model", "tiny-llama"), capsys)
    assert f"--output {blocker} exists and is not a folder" in err
    assert blocker.read_text() == "x"


def test_output_without_write_permission(task_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        err = run_failing(args_for(task_file, locked / "out", "--model", "tiny-llama"), capsys)
        assert "permission denied" in err
    finally:
        locked.chmod(0o700)


def test_disk_full_keeps_previous_results(task_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(args_for(task_file, out, "--model", "tiny-llama", steps=2)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    argv = args_for(task_file, out, "--model", "tiny-llama", "--resume", steps=4)
    err = run_failing(argv, capsys)  # the disk fills before the first new save
    assert "no space left on the device" in err and "trajectory.json" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert no_temp_files(out) == []


# ---------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["finetune", "pretrain-tuner"])
def test_console_script_help(script):
    exe = Path(sys.executable).with_name(script)
    if not exe.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable}")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: {script}" in proc.stdout and "--output" in proc.stdout


def test_peft_lora_trains_only_the_adapters(task_file, tuner_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    argv = args_for(task_file, out, "--model", "tiny-llama", "--peft", "lora", "--save_model")
    assert main(argv) == 0
    results = read_results(out)
    assert results["status"] == "finished" and len(results["train_loss"]) == STEPS
    traj = Trajectory.load(out / "trajectory.json")
    saved = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    base, _ = load_model("tiny-llama")
    assert traj.fingerprint != ParamBlocks.from_module(base).fingerprint()  # adapters only
    argv = args_for(task_file, tmp_path / "x", "--peft", "lora", "--tuner", str(tuner_dir))
    assert "use --tuner none with --peft" in run_failing(argv, capsys)
    argv = args_for(task_file, tmp_path / "x", "--peft", "lora", "--tuner", "weight-rms")
    assert "LoRA's B starts at zero" in run_failing(argv, capsys)
    assert not (tmp_path / "x").exists()


def test_logger_csv_writes_metrics_and_the_schedule_reaches_the_records(tmp_path, capsys):
    import csv

    out = tmp_path / "run"
    argv = finetune_argv("tweets", out, "--model", "tiny-llama", steps=6)
    argv += ["--lr", "1e-3", "--lr_schedule", "cosine", "--warmup_steps", "2"]
    argv += ["--log_every", "2", "--logger", "csv", "--no_progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "step 2/6 train_loss" in printed and "step 6/6" in printed  # plain lines, no bar
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert {"train_loss", "lr", "projected_grad", "steps_per_s"} <= rows[0].keys()
    lrs = [r["lr"] for r in json.loads((out / "trajectory.json").read_text())["records"]]
    # warmup 1/3, 2/3 of lr, then cosine from lr down over the remaining 4 steps
    expected = [1e-3 / 3, 2e-3 / 3] + [
        1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)
    ]
    assert lrs == pytest.approx(expected)
    assert float(rows[0]["lr"]) == pytest.approx(expected[1])
