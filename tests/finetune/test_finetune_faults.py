"""Fault injection for ``finetune`` (issue 15, the items that concern it): bad values, a folder
holding a run, changed inputs on --resume, SIGINT/SIGTERM sent to a child process, full disks
(patched writers), and the smaller user errors. Each test names its item.

Runs take seconds: the built-in tiny-llama, a few steps, one thread.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import finetune_argv, write_classification_task
from hub_server import set_offline
from safetensors import SafetensorError

import llm.models
from finetune.cli import main
from l2l import Trajectory
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ("--model", "tiny-llama")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    set_offline(monkeypatch, True)


@pytest.fixture
def task_file(tmp_path):
    return write_classification_task(tmp_path / "reviews.jsonl")


def save_tuner(folder: Path, seed: int = 1) -> Path:
    model, _ = llm.models.load_model("tiny-llama")
    tuner = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=seed)
    tuner.save_pretrained(folder)
    return folder


def failing(argv: list[str], capsys) -> str:
    """Run ``finetune argv``: exit 2 with one ``finetune: error:`` line; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the error must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(llm.models, "load_model", refuse)


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------ 2. bad values, before any work


@pytest.mark.parametrize(
    "flag,value,allowed",
    [
        ("lr", "nan", "a finite number > 0"),
        ("lr", "inf", "a finite number > 0"),
        ("lr", ".nan", "a finite number > 0"),  # YAML's NaN: parsed as a float, then refused
        ("lr", "-1", "a finite number > 0"),
        ("eps", "inf", "a finite number > 0"),
        ("eps", "0", "a finite number > 0"),
        ("steps", "-3", "an integer >= 1"),
        ("steps", "0", "an integer >= 1"),
        ("batch_size", "0", "an integer >= 1"),
        ("weight_decay", ".inf", "a finite number >= 0"),
        ("momentum", "1", "a number in [0, 1)"),
        ("hessian_smooth", "2", "a number in [0, 1]"),
        ("max_length", "1", "an integer >= 2"),
        ("n_train", "0", "an integer >= 1"),
        ("devices", "0", "a count >= 1"),
        ("checkpoint_every", "-1", "an integer >= 0"),
        ("method", "adam", "one of mezo, hizoo, lozo, lozo-m"),
        ("dtype", "int8", "one of float32, bfloat16, float16"),
    ],
)
def test_bad_value_is_refused_naming_flag_value_and_range(
    flag, value, allowed, task_file, tmp_path, capsys, no_model_load
):
    out = tmp_path / "out"
    err = failing(finetune_argv(task_file, out, *TINY, f"--{flag}", value), capsys)
    named = re.match(rf"finetune: error: --{flag} (\S+): expected (.*)", err)
    assert named and named[2].startswith(allowed), err
    assert named[1] == value.lstrip(".") or float(named[1]) == float(value), err  # -1 as -1.0
    assert not out.exists()


def test_bad_value_in_a_recipe_file(task_file, tmp_path, capsys, no_model_load):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: {task_file}\nmodel: tiny-llama\nlr: .nan\n")
    err = failing(["--config", str(recipe), "--output", str(tmp_path / "out")], capsys)
    assert "--lr nan: expected a finite number > 0" in err


def test_fsdp_is_refused(task_file, tmp_path, capsys, no_model_load):
    argv = finetune_argv(task_file, tmp_path / "out", *TINY, "--strategy", "fsdp")
    err = failing(argv, capsys)
    assert "--strategy fsdp is not supported" in err and "shard nothing" in err


# ------------------------------------------------------- 3. a folder holding a finished run


def test_finished_run_is_only_replaced_with_overwrite(task_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(finetune_argv(task_file, out, *TINY, "--save_model", steps=2)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    err = failing(finetune_argv(task_file, out, *TINY, "--seed", "1", steps=3), capsys)
    assert "holds a finished run (2 steps)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    argv = finetune_argv(task_file, out, *TINY, "--seed", "1", "--overwrite", steps=3)
    assert main(argv) == 0
    assert not (out / "model").exists(), "the old run's model/ is still there"
    results = read_results(out)
    assert results["steps_done"] == 3 and results["config"]["seed"] == 1
    assert len(Trajectory.load(out / "trajectory.json").records) == 3


def test_unfinished_run_needs_resume_or_overwrite(task_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(finetune_argv(task_file, out, *TINY, steps=2)) == 0
    results = read_results(out)
    (out / "results.json").write_text(json.dumps(dict(results, status="interrupted")))
    err = failing(finetune_argv(task_file, out, *TINY, steps=2), capsys)
    assert "continue it with --resume, replace it with --overwrite" in err


# ------------------------------------------------------- 5. --resume refuses changed inputs


@pytest.fixture
def saved_run(task_file, tmp_path):
    """A finished 2-step run with a tuner (its folder, the tuner's, and the argv used)."""
    tuner = save_tuner(tmp_path / "tuner")
    out = tmp_path / "out"
    argv = finetune_argv(task_file, out, *TINY, "--tuner", str(tuner), steps=2)
    assert main(argv) == 0
    return out, tuner, argv


def resume_argv(argv: list[str], *extra: str, steps: int = 4) -> list[str]:
    argv = list(argv)
    argv[argv.index("--steps") + 1] = str(steps)
    return [*argv, "--resume", *extra]


def assert_unchanged(out: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_resume_refuses_other_tuner_weights(saved_run, capsys):
    out, tuner, argv = saved_run
    before = snapshot(out)
    save_tuner(tuner, seed=7)  # same folder, other weights
    err = failing(resume_argv(argv), capsys)
    assert "the tuner's weights differ" in err
    assert_unchanged(out, before)


def test_resume_refuses_an_edited_data_file(saved_run, task_file, capsys):
    out, _, argv = saved_run
    before = snapshot(out)
    task_file.write_text(task_file.read_text().replace("Review 3:", "Review three:"))
    err = failing(resume_argv(argv), capsys)
    assert "the task's examples" in err
    assert_unchanged(out, before)


@pytest.mark.parametrize(
    "flag,value",
    [("--eval_examples", "2"), ("--n_test", "4"), ("--on_nonfinite", "skip"), ("--seed", "3")],
)
def test_resume_refuses_any_changed_setting(saved_run, flag, value, capsys):
    out, _, argv = saved_run
    before = snapshot(out)
    err = failing(resume_argv(argv, flag, value), capsys)
    assert f"{flag.lstrip('-')} was" in err and "now" in err
    assert_unchanged(out, before)


def test_resume_refuses_a_shorter_trajectory(saved_run, capsys):
    out, _, argv = saved_run
    data = json.loads((out / "trajectory.json").read_text())
    data["records"] = data["records"][:-1]  # a step missing
    (out / "trajectory.json").write_text(json.dumps(data))
    err = failing(resume_argv(argv), capsys)
    assert "holds 1 records before step 2 but the saved state covers 2" in err


def test_resume_refuses_a_longer_trajectory_of_another_run(saved_run, task_file, capsys):
    out, tuner, argv = saved_run
    other = out.parent / "other"
    assert main(finetune_argv(task_file, other, *TINY, "--tuner", str(tuner), steps=3)) == 0
    # the same model, 3 records, but another run's: its first two steps differ (lr)
    data = json.loads((other / "trajectory.json").read_text())
    for record in data["records"]:
        record["lr"] *= 2
    (out / "trajectory.json").write_text(json.dumps(data))
    err = failing(resume_argv(argv), capsys)
    assert "is not the trajectory of the saved state" in err


def test_resume_after_a_save_cut_between_its_files(saved_run, task_file, capsys):
    """The trajectory is written before state.json: records past the saved step, whose
    prefix is the saved one, are dropped and the run continues exactly."""
    out, tuner, argv = saved_run
    whole = out.parent / "whole"
    assert main(finetune_argv(task_file, whole, *TINY, "--tuner", str(tuner), steps=4)) == 0
    (out / "trajectory.json").write_bytes((whole / "trajectory.json").read_bytes())  # 4 > 2
    assert main(resume_argv(argv)) == 0
    a = Trajectory.load(out / "trajectory.json").records
    assert a == Trajectory.load(whole / "trajectory.json").records
    assert read_results(out)["train_loss"] == read_results(whole)["train_loss"]


# ------------------------------------------------------- 6. SIGINT and SIGTERM, child process

CHILD = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores it
from finetune.run import Run
marker, point, *argv = sys.argv[1:]
seen = {"evaluate": 0}
def wait():
    Path(marker).touch()
    time.sleep(300)
evaluate, closure_for = Run.evaluate, Run.closure_for
def patched_evaluate(self, split):
    seen["evaluate"] += 1
    if (point, seen["evaluate"]) in (("zero-shot", 1), ("final", 2)):
        wait()
    return evaluate(self, split)
def patched_closure_for(self, step):
    if point == "steps" and step == 2:
        wait()
    return closure_for(self, step)
Run.evaluate, Run.closure_for = patched_evaluate, patched_closure_for
from finetune.cli import main
sys.exit(main(argv))
"""


def interrupt_child(tmp_path: Path, argv: list[str], point: str, signum: int):
    """Run finetune in a child, send ``signum`` once it reaches ``point``; (code, stderr)."""
    marker = tmp_path / f"at-{point}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), point, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the child never reached " + point
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize(
    "signum,point",
    [
        (signal.SIGINT, "zero-shot"),
        (signal.SIGTERM, "steps"),
        (signal.SIGINT, "final"),
    ],
    ids=["sigint-before-first-step", "sigterm-mid-steps", "sigint-final-eval"],
)
def test_interrupt_saves_the_last_step_and_says_so(signum, point, task_file, tmp_path):
    out = tmp_path / "out"
    argv = finetune_argv(task_file, out, *TINY, "--checkpoint_every", "0", steps=4)
    code, err = interrupt_child(tmp_path, argv, point, signum)
    assert code == 130, err
    if point == "zero-shot":
        assert "interrupted before the first step: nothing was saved" in err
        assert not out.exists()
        return
    done = 2 if point == "steps" else 4
    assert f"{done} steps are saved in {out}" in err, err
    results = read_results(out)
    assert results["status"] == "interrupted" and results["steps_done"] == done
    assert len(Trajectory.load(out / "trajectory.json").records) == done
    state = json.loads((out / "state.json").read_text())
    assert state["zo"]["step_count"] == done
    if point == "final":
        assert "during the final evaluation" in err
    assert main([*argv, "--resume"]) == 0  # and the run completes from there
    assert read_results(out)["status"] == "finished"


def test_steps_are_saved_before_the_final_evaluation(task_file, tmp_path):
    """SIGKILL (no handler runs) during the final evaluation: every step is already on disk."""
    out = tmp_path / "out"
    argv = finetune_argv(task_file, out, *TINY, "--checkpoint_every", "0", steps=3)
    code, _ = interrupt_child(tmp_path, argv, "final", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert read_results(out)["steps_done"] == 3
    assert len(Trajectory.load(out / "trajectory.json").records) == 3
    assert main([*argv, "--resume"]) == 0 and read_results(out)["status"] == "finished"


# ------------------------------------------------------------------- 7. a full disk


def raise_disk_full_in_safetensors(monkeypatch):
    """safetensors' writer on a full disk: its own error type, the OS error in the text."""
    import transformers.modeling_utils as modeling_utils

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a real full disk leaves
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)


def test_save_model_on_a_full_disk(task_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = finetune_argv(task_file, out, *TINY, "--save_model", steps=2)
    with monkeypatch.context() as patch:
        raise_disk_full_in_safetensors(patch)
        err = failing(argv, capsys)
    assert f"cannot write {out / 'model'}: no space left on the device" in err
    results = read_results(out)
    assert results["status"] == "failed" and "no space left" in results["error"]
    assert not (out / "model").exists() and not [p for p in out.iterdir() if p.name[0] == "."]
    assert len(Trajectory.load(out / "trajectory.json").records) == 2  # the steps are kept
    assert main([*argv, "--resume"]) == 0  # with space again, --resume writes the model
    assert read_results(out)["status"] == "finished" and (out / "model").is_dir()


def test_disk_full_from_the_start_is_noticed_before_the_work(
    task_file, tmp_path, monkeypatch, capsys, no_model_load
):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # a full disk fails when written data is flushed
    out = tmp_path / "out"
    err = failing(finetune_argv(task_file, out, *TINY), capsys)
    assert err == f"finetune: error: cannot write {out}: no space left on the device. Free " + (
        "space or pick another --output; files written before are intact (every file is "
        "replaced atomically)."
    )
    assert not out.exists()


def test_save_model_without_room_for_the_weights(task_file, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    out = tmp_path / "out"
    err = failing(finetune_argv(task_file, out, *TINY, "--save_model"), capsys)
    assert "--save_model needs about" in err and "but only 1.0 KB are free" in err
    assert not out.exists()


# ------------------------------------------------------------- 8/9. smaller user errors


def test_pth_tuner_points_to_import_pth(task_file, tmp_path, capsys, monkeypatch):
    import tuner_zoo.resolve

    def no_lookup(*args, **kwargs):
        raise AssertionError("a .pth path was looked up as a tuner name or Hub repo id")

    monkeypatch.setattr(tuner_zoo.resolve, "resolve_tuner", no_lookup)
    pth = tmp_path / "llama1B_finetuner.pth"
    pth.write_bytes(b"\x80\x02}q\x00.")
    err = failing(finetune_argv(task_file, tmp_path / "out", "--tuner", str(pth)), capsys)
    assert "tuner-zoo import-pth" in err and str(pth) in err


def test_non_utf8_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    err = failing(finetune_argv(data, tmp_path / "out", *TINY), capsys)
    assert f"{data} line 2: not UTF-8 text" in err


def test_directory_as_data(tmp_path, capsys, no_model_load):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    err = failing(finetune_argv(folder, tmp_path / "out", *TINY), capsys)
    assert f"--task {folder} is a directory" in err


def test_batch_larger_than_the_training_set_is_refused(task_file, tmp_path, capsys):
    argv = finetune_argv(task_file, tmp_path / "out", *TINY, "--batch_size", "40")
    err = failing(argv, capsys)
    assert "--batch_size 40 is larger than the training set (32 examples" in err
    assert not (tmp_path / "out").exists()


def test_one_class_training_data_warns(tmp_path, capsys):
    data = write_classification_task(tmp_path / "one.jsonl", labels=("good",))
    out = tmp_path / "out"
    assert main(finetune_argv(data, out, *TINY, steps=1)) == 0
    assert "finetune: warning: every training example" in capsys.readouterr().err
    assert "accuracy 1.0" in read_results(out)["warnings"][0]


def test_late_setup_error_leaves_no_folder(task_file, tmp_path, capsys):
    """The tuner does not fit tiny-opt: found after the write probe, which left nothing."""
    tuner = save_tuner(tmp_path / "tuner")
    out = tmp_path / "a" / "b" / "out"
    argv = finetune_argv(task_file, out, "--model", "tiny-opt", "--tuner", str(tuner))
    assert "does not fit this model" in failing(argv, capsys)
    assert not (tmp_path / "a").exists()
