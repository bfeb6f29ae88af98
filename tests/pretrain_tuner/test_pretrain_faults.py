"""Fault injection for ``pretrain-tuner``: bad values, full disks, planted and truncated
checkpoints, edited inputs, finished outputs, taken zoo names, an unreachable Hub, signals.

Each test names the item of the fault list it reproduces. The standard: a bad value is refused
before any work with one line naming the flag, the value and what is allowed (exit 2); a
failure leaves the last good state intact; a finished run is only replaced with --overwrite;
--resume refuses a changed input; SIGINT and SIGTERM save the last completed step and say so.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handler binds stderr now, not a test's capsys
import pytest
import torch
from helpers import isolated_home, write_classification_task
from hub_server import configure_client, free_port, set_offline, skip_retry_waits

import llm.models
from pretrain_tuner.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_classification_task(tmp_path / "reviews.jsonl", n=24)


def args(task: Path, out: Path, *extra: str, steps: int = 1) -> list[str]:
    return [
        "--model", "tiny-llama", "--task", str(task), "--output", str(out),
        "--steps", str(steps), "--batch_size", "4", "--n_train", "16", "--name", "none",
        "--checkpoint_every", "1", "--accelerator", "cpu", "--no_progress", *extra,
    ]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("pretrain-tuner: error: ")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture
def no_model(monkeypatch):
    """Loading the base model fails the test: the check must come before any work."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded: the check came after work started")

    monkeypatch.setattr(llm.models, "load_model", refuse)


# --- 2: bad values are refused before any work ---------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr_model", "nan"),
        ("--lr_tuner", "inf"),
        ("--steps", "-3"),
        ("--steps", "0"),
        ("--batch_size", "0"),
        ("--max_length", "1"),
        ("--momentum", "1.5"),
        ("--devices", "0"),
        ("--eps", "-0.001"),
    ],
)
def test_bad_value_refused_before_work(task_file, tmp_path, capsys, no_model, flag, value):
    out = tmp_path / "out"
    assert main(args(task_file, out, f"{flag}={value}")) == 2
    line = one_error_line(capsys)
    assert f"{flag} {value}:" in line or f"{flag}: expected" in line, line
    assert value in line
    assert not out.exists()


def test_config_file_values_are_checked_too(task_file, tmp_path, capsys, no_model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr_model: .nan\nsteps: 2\n")
    assert main([*args(task_file, tmp_path / "out"), "--config", str(recipe)]) == 2
    assert "--lr_model nan: must be a finite number >= 0" in one_error_line(capsys)


# --- 1: atomic checkpoints; a truncated checkpoint is refused, nothing deleted --------------


def full_disk(monkeypatch, folder: Path, after_bytes: int = 4096) -> None:
    """Every file opened for writing under ``folder`` takes ``after_bytes`` and then fails
    with ENOSPC, as a full disk does."""
    real_open = builtins.open

    class FullDiskFile:
        def __init__(self, handle):
            self._handle, self._written = handle, 0

        def write(self, data):
            room = max(after_bytes - self._written, 0)
            self._handle.write(bytes(memoryview(data)[:room]))
            self._written += min(room, len(data))
            if len(data) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def patched(file, mode="r", *a, **k):
        handle = real_open(file, mode, *a, **k)
        inside = isinstance(file, (str, os.PathLike)) and Path(file).is_relative_to(folder)
        return FullDiskFile(handle) if inside and ("w" in mode or "a" in mode) else handle

    monkeypatch.setattr(builtins, "open", patched)


def test_disk_full_during_save_keeps_the_last_good_checkpoint(
    task_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=1)) == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    good = ckpt.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as patch:
        (tmp_path / "tmp").mkdir()
        patch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # on the same (full) disk
        full_disk(patch, tmp_path)
        assert main(args(task_file, out, "--resume", steps=3)) == 2
    assert "could not write the checkpoint" in one_error_line(capsys)
    assert ckpt.read_bytes() == good and step_of(ckpt) == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # no temporary left

    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or replace(a, b))
    assert main(args(task_file, out, "--resume", steps=2)) == 0
    assert step_of(ckpt) == 2
    staged = [Path(a) for a, b in renames if Path(b) == ckpt]
    assert staged and all(a.parent == ckpt.parent for a in staged)  # renamed from beside it


def test_resume_on_a_truncated_checkpoint_deletes_nothing(task_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=2)) == 0
    ckpt, metrics = out / "checkpoints" / "last.ckpt", out / "logs" / "metrics.csv"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args(task_file, out, "--resume", steps=4)) == 2
    assert "is not a readable checkpoint" in one_error_line(capsys)
    assert metrics in before
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- 4: --resume never unpickles code ----------------------------------------------------------


def _planted(marker: str) -> None:  # pragma: no cover - must never run
    Path(marker).write_text("pickle code ran")


class Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_planted, (self.marker,))


def test_resume_refuses_a_planted_pickle_even_when_forced(task_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    out, marker = tmp_path / "out", tmp_path / "ran.txt"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 1, "payload": Planted(marker)}, out / "checkpoints" / "last.ckpt")
    assert main(args(task_file, out, "--resume", steps=2)) == 2
    assert "refusing to load it" in one_error_line(capsys)
    assert not marker.exists()


# --- 5: --resume refuses changed inputs ---------------------------------------------------------


def test_resume_refuses_changed_settings_and_data(task_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=1)) == 0
    capsys.readouterr()
    assert main(args(task_file, out, "--resume", "--lr_tuner", "0.2", steps=2)) == 2
    assert "--lr_tuner is 0.2, the checkpoint's run used 0.1" in one_error_line(capsys)
    assert main(args(task_file, out, "--resume", steps=1)) == 2
    assert "--steps 1: the checkpoint is at meta-step 1 already" in one_error_line(capsys)
    edited = task_file.read_text().replace("great fun", "good fun")
    assert edited != task_file.read_text()
    task_file.write_text(edited)
    assert main(args(task_file, out, "--resume", steps=2)) == 2
    assert "the meta-training data differ" in one_error_line(capsys)
    assert step_of(out / "checkpoints" / "last.ckpt") == 1


def test_resume_of_a_checkpoint_from_before_a_setting_existed(task_file, tmp_path, capsys):
    """A checkpoint whose manifest predates ``--init`` and ``--anchor`` resumes at the values it
    ran with (constant, 0), and refuses others."""
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=1)) == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    manifest = next(v for v in saved.values() if isinstance(v, dict) and "settings" in v)
    del manifest["settings"]["init"], manifest["settings"]["anchor"]
    torch.save(saved, ckpt)
    capsys.readouterr()
    assert main(args(task_file, out, "--resume", "--anchor", "0.5", steps=2)) == 2
    assert "--anchor is 0.5, the checkpoint's run used 0.0" in one_error_line(capsys)
    assert main(args(task_file, out, "--resume", "--init", "weight-rms", steps=2)) == 2
    assert "--init is 'weight-rms', the checkpoint's run used 'constant'" in one_error_line(capsys)
    assert main(args(task_file, out, "--resume", steps=2)) == 0
    assert step_of(ckpt) == 2


# --- 3: a finished run is replaced only with --overwrite, and then wholly -----------------------


def test_finished_output_needs_overwrite_and_then_nothing_old_remains(
    task_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=2)) == 0
    (out / "model").mkdir()
    (out / "model" / "stale.safetensors").write_bytes(b"from an earlier run")
    before = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert main(args(task_file, out, steps=1)) == 2
    assert "holds a finished run (config.json): pass --overwrite" in one_error_line(capsys)
    assert (out / "config.json").read_bytes() == before

    assert main(args(task_file, out, "--overwrite", steps=1)) == 0
    assert not (out / "model").exists()
    assert json.loads((out / "config.json").read_text())["metrics"]["steps"] == 1
    assert step_of(out / "checkpoints" / "last.ckpt") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # aside removed


def test_failed_overwrite_puts_the_old_run_back(task_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(args(task_file, out, steps=1)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import pretrain_tuner.module as module

    def broken(self, batch, batch_idx):
        raise ValueError("simulated failure in the first meta-step")

    monkeypatch.setattr(module.MetaTunerModule, "training_step", broken)
    assert main(args(task_file, out, "--overwrite", steps=1)) == 2
    assert "simulated failure" in one_error_line(capsys)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- 8: a taken zoo name is found before training; an unreachable Hub is one line ---------------


def test_taken_zoo_name_is_refused_before_training(task_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("L2L_HOME", str(isolated_home(tmp_path / "home")))
    first = tmp_path / "first"
    assert main([*args(task_file, first), "--name", "taken"]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(llm.models, "load_model", lambda *a, **k: pytest.fail("trained anyway"))
        assert main([*args(task_file, tmp_path / "second"), "--name", "taken"]) == 2
    line = one_error_line(capsys)
    assert "already has a tuner called 'taken'" in line and "--name OTHER" in line
    assert "--overwrite" in line and "--force" not in line
    assert not (tmp_path / "second").exists()
    assert main([*args(task_file, tmp_path / "second"), "--name", "taken", "--overwrite"]) == 0
    # resuming the run that registered the name updates its own entry, and no other run's
    assert (
        main([*args(task_file, tmp_path / "second", steps=2), "--name", "taken", "--resume"]) == 0
    )
    capsys.readouterr()
    assert main([*args(task_file, first, steps=2), "--name", "taken", "--resume"]) == 2
    line = one_error_line(capsys)
    assert "--name OTHER" in line and "--overwrite" not in line


def test_push_to_an_unreachable_hub_is_one_line(task_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
    set_offline(monkeypatch, False)
    configure_client(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path / "hf" / "hub")
    skip_retry_waits(monkeypatch)
    out = tmp_path / "out"
    assert main([*args(task_file, out), "--push_to_hub", "test-user/tuner"]) == 2
    line = one_error_line(capsys)
    assert "could not push" in line and f"tuner-zoo push {out} test-user/tuner" in line
    assert (out / "model.safetensors").is_file()  # the tuner is kept locally


# --- 6: SIGINT and SIGTERM save the last completed step and say so -----------------------------

CHILD = """
import sys, time
import llm.models, pretrain_tuner.module as module
mode = sys.argv.pop(1)
if mode == "loading":  # stall while the model loads: before the first meta-step
    def stall(*a, **k):
        print("loading", flush=True)
        time.sleep(120)
    llm.models.load_model = stall
else:
    step = module.MetaTunerModule.training_step
    def announced(self, batch, batch_idx):
        out = step(self, batch, batch_idx)
        print(f"step {self.global_step}", flush=True)
        time.sleep(0.2)
        return out
    module.MetaTunerModule.training_step = announced
from pretrain_tuner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def interrupted(argv: list[str], mode: str, wait_for: str, signum: int, home: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", L2L_HOME=str(isolated_home(home)))
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith(wait_for):
                proc.send_signal(signum)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


# SIGTERM (what a batch scheduler sends) in the default run; SIGINT with the multi-process tests
@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGINT, marks=pytest.mark.distributed), signal.SIGTERM]
)
def test_signal_during_training_saves_the_step_it_reports(task_file, tmp_path, signum):
    out = tmp_path / "out"
    argv = args(task_file, out, "--checkpoint_every", "1000", steps=200)
    code, err = interrupted(argv, "train", "step 2", signum, tmp_path / "home")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("pretrain-tuner: interrupted")]
    step = step_of(out / "checkpoints" / "last.ckpt")
    assert f"meta-step {step} is saved in {out / 'checkpoints' / 'last.ckpt'}" in line
    assert step >= 2 and "--resume" in line


@pytest.mark.distributed  # a second process, like the multi-process tests
def test_signal_before_the_first_step_says_nothing_was_saved(task_file, tmp_path):
    out = tmp_path / "out"
    code, err = interrupted(
        args(task_file, out), "loading", "loading", signal.SIGTERM, tmp_path / "home"
    )
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert "pretrain-tuner: interrupted before any meta-step was saved: nothing was written" in err
    assert not out.exists()


def test_a_run_can_start_from_the_weight_rms_heuristic(task_file, tmp_path):
    """``--init weight-rms`` meta-trains from the heuristic's block scales, and the tuner's
    recorded recipe says so."""
    import json

    out = tmp_path / "out"
    assert main(args(task_file, out, "--init", "weight-rms", steps=1)) == 0
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["init"] == "weight-rms"
    from safetensors.torch import load_file

    b2 = load_file(out / "model.safetensors")["b2"]  # each block's output: its scale
    assert float(b2.max() / b2.min()) > 3, b2  # norms (RMS ~1) against projections (~0.02)
