"""The bookkeeping of ``benchmarks/quality.py``: lr selection, the summary's statistics, and the
process pool that runs (and resumes) the runs. The runs themselves are ``finetune`` runs, tested
in ``test_finetune_cli.py``."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import benchmark_module


@pytest.fixture(scope="module")
def quality():
    with benchmark_module("quality") as module:
        yield module


def run(losses, acc_after, acc_before=0.5, lr=1e-5, dev=None) -> dict:
    r = dict(
        train_loss=losses,
        eval_before={"accuracy": acc_before},
        eval_after={"accuracy": acc_after},
        wall_time_s=float(len(losses)),
        peak_memory_bytes=2**20,
        config={"lr": lr},
        spec={"lr": lr},
    )
    if dev is not None:
        r["eval_dev"] = {"accuracy": dev}
    return r


def test_lr_is_chosen_on_dev_accuracy_then_loss(quality):
    runs = [
        run([3.0] * 10, acc_after=0.9, lr=1e-5, dev=0.6),  # best test accuracy: not looked at
        run([2.0] * 10, acc_after=0.5, lr=3e-5, dev=0.7),
        run([1.0] * 10, acc_after=0.5, lr=1e-4, dev=0.7),  # same dev accuracy, lower loss
    ]
    assert quality.best_lr(runs) == 1e-4
    runs[2]["eval_dev"]["accuracy"] = 0.65
    assert quality.best_lr(runs) == 3e-5
    args = argparse.Namespace(tasks=["a"])
    budget = dict(lrs=[1e-5, 3e-5, 1e-4], select_steps=10)
    table = quality.selection_table(
        {("mezo", "none"): runs}, {("mezo", "none"): 3e-5}, args, budget
    )
    assert "| mezo | 0.600 / 3.000 | **0.700 / 2.000** | 0.650 / 1.000 |" in table
    partial = quality.selection_table({("mezo", "tuner"): [None, runs[1], None]}, {}, args, budget)
    assert "| mezo+tuner | - | 0.700 / 2.000 | - |" in partial  # not chosen: the row is incomplete


def test_final_loss_and_steps_to_reach(quality):
    r = run([float(x) for x in range(20, 0, -1)], acc_after=0.5)  # 20, 19, ..., 1
    assert quality.final_loss(r) == pytest.approx(1.5)  # mean of the last 10%: 2 and 1
    assert quality.steps_to_reach(r, 15.5) == 10  # 10-step mean of 20..11 is 15.5
    assert quality.steps_to_reach(r, 16.0) == 9  # running mean of the first 9: 20..12 is 16
    assert quality.steps_to_reach(r, 0.5) is None


def test_summary_counts_tuner_wins_per_task_and_seed(quality):
    args = argparse.Namespace(budget="small", model="m", tuner="t", tasks=["a", "b"], jobs=1)
    budget = dict(steps=10, seeds=[0, 1], batch=8)
    runs = {
        ("a", "mezo"): [run([2.0] * 10, 0.60), run([2.0] * 10, 0.60)],
        ("a", "mezo+tuner"): [run([1.0] * 10, 0.70), run([3.0] * 10, 0.60)],
        ("b", "mezo"): [run([2.0] * 10, 0.50), run([2.0] * 10, 0.50)],
        ("b", "mezo+tuner"): [run([1.0] * 10, 0.50), run([1.0] * 10, 0.54)],
    }
    text = quality.summarise(runs, args, budget, wall=60.0)
    assert "lowest final loss of all methods in 3/4 (task, seed) pairs (75.0%" in text
    assert "mezo+tuner vs mezo: lower final loss in 3/4" in text
    assert "mean test-accuracy difference +3.5 points" in text  # (10 + 0 + 0 + 4) / 4
    assert "| a | mezo+tuner | 1e-05 | 2.0000 ± 1.0000 | 0.500 -> 0.650 ± 0.050 |" in text
    # a tuner variant alone is compared with nothing: no share of wins
    only = {k: v for k, v in runs.items() if k[1] == "mezo+tuner"}
    assert "lowest final loss" not in quality.summarise(only, args, budget, wall=60.0)


def test_summary_of_read_runs_states_where_they_ran(quality):
    """--summarise describes the runs' own machine, threads and dates, not its own invocation."""
    args = argparse.Namespace(budget="small", model="m", tuner="t", tasks=["a"], jobs=4, ran=0)
    budget = dict(steps=10, seeds=[0], batch=8)
    runs = {("a", "mezo"): [run([2.0] * 10, 0.60)], ("a", "mezo+tuner"): [run([1.0] * 10, 0.7)]}
    for day, (r,) in zip(("2026-12-01", "2026-12-03"), runs.values(), strict=True):
        r["provenance"] = dict(date=f"{day}T10:00:00+00:00", machine="vm, 2 CPUs", torch="2.x")
        r["provenance"]["threads"] = 1
    text = quality.summarise(runs, args, budget, wall=1.0)
    assert (
        "none ran in this invocation): 2 run(s) on vm, 2 CPUs, torch 2.x, 1 torch thread(s)" in text
    )
    assert "2026-12-01 to 2026-12-03" in text and "4 run(s) at a time" not in text


def test_run_all_resumes_and_reports_failures(quality, tmp_path):
    args = argparse.Namespace(jobs=2)
    done = tmp_path / "done.json"
    done.write_text(json.dumps({"cached": True}))
    jobs = [
        (done, dict, {"cached": False}),  # its JSON exists: read, not rerun
        (tmp_path / "new.json", dict, {"x": 1}),  # runs in a fresh process
    ]
    assert quality.run_all(jobs, args, "test") == [{"cached": True}, {"x": 1}]
    bad = [(tmp_path / "bad.json", int, "not a number"), (tmp_path / "ok.json", dict, {})]
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed:\nbad.json: ValueError"):
        quality.run_all(bad, args, "test")


def test_a_finished_tuner_run_is_reused_only_with_the_same_tuner(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "tuner_digest", lambda spec: {"a": "aaa", "b": "bbb"}[spec])
    spec = quality.Spec("movie-reviews", "mezo", "tuner", 1e-5, 0, 200)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"tuner": {"weights_sha256": "aaa"}, "x": 1}))
    job = (path, quality.run_one, spec, argparse.Namespace(tuner="a", jobs=1), {})
    assert quality.run_all([job], job[3], "test") == [{"tuner": {"weights_sha256": "aaa"}, "x": 1}]
    other = (path, quality.run_one, spec, argparse.Namespace(tuner="b", jobs=1), {})
    with pytest.raises(SystemExit, match="made with another tuner.*--tuner b has bbb"):
        quality.run_all([other], other[3], "test")
    path.write_text(json.dumps({"tuner": {"spec": "a"}}))  # a run that recorded no digest
    with pytest.raises(SystemExit, match="not recorded"):
        quality.run_all([job], job[3], "test")
    plain = quality.Spec("movie-reviews", "mezo", "none", 1e-5, 0, 200)  # no tuner: not checked
    assert quality.run_all([(path, quality.run_one, plain, job[3], {})], job[3], "test")


def test_a_run_without_dev_scores_cannot_select_an_lr(quality, tmp_path):
    spec = quality.Spec("movie-reviews", "mezo", "none", 1e-5, 0, 200)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run([1.0, 0.9], 0.7)))  # ran under --lr: no eval_dev
    args = argparse.Namespace(jobs=1)
    assert quality.run_all([(path, quality.run_one, spec, args, {})], args, "test")
    with pytest.raises(SystemExit, match="run.json has no dev accuracy.*summarise it with --lr"):
        quality.run_all([(path, quality.run_one, spec, args, {}, True)], args, "test")


def test_dev_every_run_scores_every_seed_and_refuses_runs_without_dev(
    quality, tmp_path, monkeypatch
):
    """--dev-every-run: seeds past 0 are scored on dev too, a stored run without a dev score is
    not silently mixed in, and the summary gets a dev table over the seeds."""
    import finetune.cli

    class FakeRun:
        results: dict = {}

        def begin(self):
            return None

        def fit(self, _):
            return run([1.0, 0.9], 0.7)

        def evaluate(self, split):
            return {"accuracy": 0.8, "split": split}

    monkeypatch.setattr(finetune.cli, "parse", lambda argv: argv)
    monkeypatch.setattr(finetune.cli, "setup", lambda cfg: FakeRun())
    monkeypatch.setattr(quality, "zero_shot", lambda *a, **k: {"accuracy": 0.5})
    monkeypatch.setattr(quality, "provenance", dict)
    budget = dict(batch=8, n_eval=10, n_test=10, select_steps=20)
    spec = quality.Spec("nyt-editorials", "mezo", "none", 3e-5, 1, 20)  # seed 1: not a selection
    plain = argparse.Namespace(
        out=tmp_path / "plain", model="m", tuner="t", jobs=1, accelerator="cpu", progress=False
    )
    assert "eval_dev" not in quality.run_one(spec, plain, budget)
    every = argparse.Namespace(**{**vars(plain), "dev_every_run": True})
    with pytest.raises(SystemExit, match="no dev accuracy.*without --dev-every-run"):
        quality.run_one(spec, every, budget)  # the stored run from above
    every.out = tmp_path / "every"
    assert quality.run_one(spec, every, budget)["eval_dev"] == {"accuracy": 0.8, "split": "dev"}

    args = argparse.Namespace(budget="small", model="m", tuner="t", tasks=["a"], jobs=1, lr=1e-5)
    seeds = dict(steps=10, seeds=[0, 1], batch=8)
    scored = {("a", "mezo"): [run([1.0], 0.6, dev=0.70), run([1.0], 0.6, dev=0.75)]}
    assert "Dev accuracy" not in quality.summarise(scored, args, seeds, wall=1.0)  # no flag
    args.dev_every_run = True
    text = quality.summarise(scored, args, seeds, wall=1.0)
    assert "| a | mezo | 0.700 / 0.750 | 0.725 |" in text and "lr-selection" not in text
    args.lr = None  # the lr was selected on this task's dev split: the table says so
    assert "seed 0 of a is its lr-selection run" in quality.summarise(scored, args, seeds, 1.0)
    scored[("a", "mezo")][1].pop("eval_dev")  # one seed unscored: no dev row for the group
    assert "Dev accuracy" not in quality.summarise(scored, args, seeds, wall=1.0)


def test_summarise_with_dev_every_run_from_the_command_line(quality, tmp_path):
    """--summarise --dev-every-run tabulates the stored runs' dev scores; a group with a run
    that has none is left out of the dev table rather than failing the summary."""
    out = tmp_path / "q"
    argv = ["--out", str(out), "--tasks", "a", "--methods", "mezo,mezo+tuner", "--lr", "3e-5"]
    argv += ["--seeds", "0,1", "--no-first-order", "--summarise", "--dev-every-run"]
    args = argparse.Namespace(out=out, **dict(quality.BUDGETS["protocol"]))
    budget = dict(quality.BUDGETS["protocol"])
    zs = quality.zero_shot_path("a", args, budget)
    zs.parent.mkdir(parents=True)
    zs.write_text(json.dumps({"accuracy": 0.5}))
    prov = dict(date="2026-12-07T10:00:00+00:00", machine="vm", torch="2.x", threads=1)
    for scale, devs in (("none", [0.70, 0.80]), ("tuner", [0.75, None])):
        for seed, dev in enumerate(devs):
            spec = quality.Spec("a", "mezo", scale, 3e-5, seed, budget["steps"])
            r = run([1.0] * 10, 0.6, lr=3e-5, dev=dev)
            r["provenance"] = prov
            r["tuner"] = {"weights_sha256": quality.tuner_digest("smollm2-135m")}
            quality.run_path(spec, args).write_text(json.dumps(r))
    quality.main(argv)
    text = (out / "summary.md").read_text()
    assert "| a | mezo | 0.700 / 0.800 | 0.750 |" in text and "| a | mezo+tuner | 0." not in text
    assert "| a | mezo+tuner | 3e-05 |" in text  # its test row is there
    quality.main([a for a in argv if a != "--dev-every-run"])
    assert "Dev accuracy" not in (out / "summary.md").read_text()
