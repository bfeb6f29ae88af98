"""Data-parallel ZO with 2 CPU processes (gloo), against one process on the same global batch.

``finetune --strategy ddp --devices 2``: every rank uses the step's seed, computes its losses on
its shard of the global batch and all-reduces them (24 bytes a step for HiZOO), so the weights
after k steps match a single-process run, resumed or not. ``pretrain-tuner`` runs under
Lightning's DDP and under FSDP2 (sharded), with the same results. The processes are real (Lightning launches rank 1 itself), so these tests take
a few tens of seconds on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import isolated_home
from safetensors.torch import load_file

from finetune.cli import main as finetune
from l2l import Trajectory
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
from llm.models import load_model

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A task whose answers differ in token count (so shards hold unequal token counts) and a
    tuner for tiny-llama with sigmas far from 1."""
    root = tmp_path_factory.mktemp("ddp")
    task = root / "answers.jsonl"
    labels = ["yes", "absolutely not at all"]
    with task.open("w") as f:
        for i in range(60):
            text = f"Question {i}: is the number {i} even?" + " Think." * (i % 4)
            f.write(json.dumps({"text": text, "label": labels[i % 2]}) + "\n")
    model, _ = load_model("tiny-llama")
    tuner = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=3)
    with torch.no_grad():
        tuner.b2.copy_(torch.linspace(0.5, 2.0, tuner.num_blocks))
    tuner.save_pretrained(root / "tuner")
    return {"task": task, "tuner": root / "tuner", "root": root}


def finetune_args(files: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model", "tiny-llama",
        "--task", str(files["task"]),
        "--tuner", str(files["tuner"]),
        "--method", "hizoo",
        "--output", str(out),
        "--steps", str(steps),
        "--batch_size", "5",  # shards of 3 and 2 examples
        "--n_train", "40",
        "--n_test", "5",  # the final test evaluation: sharded 3 + 2
        "--eval_examples", "5",
        "--lr", "1e-2",  # the classification objective: small projected gradients
        "--save_model",
        "--accelerator", "cpu",
        "--no_progress",
        *extra,
    ]  # fmt: skip


def launch(module: str, argv: list[str], home: Path) -> str:
    """``python -m module argv`` with its own process group (killed whole on a timeout)."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", L2L_HOME=str(isolated_home(home)), HF_HUB_OFFLINE="1"
    )
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{module} did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_same_weights(ddp: Path, single: Path) -> None:
    a, b = (
        load_file(str(ddp / "model" / "model.safetensors")),
        load_file(str(single / "model" / "model.safetensors")),
    )
    initial = load_model("tiny-llama")[0].state_dict()
    assert a.keys() == b.keys()
    moved = max(float((b[k] - initial[k]).abs().max()) for k in b)
    assert moved > 100 * 2e-5, "the reference run barely moved: the comparison would be vacuous"
    for name in a:  # float32 reductions in another order: equal up to rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=2e-5, msg=name)


def assert_ddp_results(out: Path, steps: int, reference: dict) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["steps_done"] == steps
    assert results["replicas_identical"] is True
    comm = results["communication"]
    assert comm["world_size"] == 2 and comm["all_reduces_per_step"] == 1
    assert comm["payload_bytes_per_step"] == 24  # HiZOO: L0, L+, L- as float64
    assert results["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert results["eval_after"]["n"] == reference["eval_after"]["n"] == 5  # sharded 3 + 2
    assert results["eval_after"]["accuracy"] == reference["eval_after"]["accuracy"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["logs", "model", "results.json", "state.json", "trajectory.json"]  # no temp
    return results


def test_two_processes_match_one_and_resume(files, tmp_path):
    """2 steps on 2 ranks == 2 steps in 1 process; resumed to 4 on 2 ranks == 4 in 1 process."""
    single2, single4, ddp = tmp_path / "single2", tmp_path / "single4", tmp_path / "ddp"
    assert finetune(finetune_args(files, single2, 2)) == 0
    assert finetune(finetune_args(files, single4, 4)) == 0
    ref2, ref4 = (json.loads((d / "results.json").read_text()) for d in (single2, single4))

    ddp_flags = ("--devices", "2", "--strategy", "ddp")
    launch("finetune.cli", finetune_args(files, ddp, 2, *ddp_flags), tmp_path / "home")
    assert_ddp_results(ddp, 2, ref2)
    assert_same_weights(ddp, single2)

    output = launch(
        "finetune.cli", finetune_args(files, ddp, 4, *ddp_flags, "--resume"), tmp_path / "home"
    )
    assert output.count("results in") == 1  # only rank 0 reports
    assert_ddp_results(ddp, 4, ref4)
    assert_same_weights(ddp, single4)
    trajectory = Trajectory.load(ddp / "trajectory.json")
    records, eps = trajectory.records, trajectory.hparams["eps"]
    reference = Trajectory.load(single4 / "trajectory.json").records
    assert [r.seed for r in records] == [r.seed for r in reference]
    # grad = (L+ - L-) / (2 eps): a float32 loss of ~0.7 summed over shards of 3 + 2 examples
    # instead of 5 differs by a few ulps (6e-8 each), i.e. ~1e-4 in grad at eps 1e-3. Allow 16 ulps
    # (5e-4 at eps 1e-3); a wrong shard, seed or z moves grad by its own size (~0.1).
    atol = 16 * 2.0**-24 / (2 * eps)
    assert [r.grad for r in records] == pytest.approx([r.grad for r in reference], abs=atol)


class RankOneOfTwo:
    """Stands in for Lightning Fabric on rank 1 of 2 (collectives return the local value)."""

    global_rank, world_size, device = 1, 2, torch.device("cpu")

    def all_reduce(self, tensor, reduce_op="mean"):
        return tensor

    def broadcast(self, obj, src=0):
        return None  # rank 0's verdict: the output folder is writable


def test_other_ranks_write_nothing(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("finetune.cli._fabric", lambda args: RankOneOfTwo())
    out = tmp_path / "out"
    assert finetune(finetune_args(files, out, 2, "--checkpoint_every", "1")) == 0
    assert not out.exists()
    assert "results in" not in capsys.readouterr().out


def pretrain(files: dict[str, Path], out: Path, strategy: str, steps: int, *extra: str) -> dict:
    """2 ranks, 2 meta-steps an epoch (16 examples in global batches of 4); a meta step size
    large enough that the tuner moves measurably in a few steps."""
    argv = ["--model", "tiny-llama", "--task", str(files["task"]), "--output", str(out)]
    argv += ["--steps", str(steps), "--batch_size", "4", "--n_train", "16", "--name", "none"]
    argv += ["--lr_update", "1e-2", "--lr_tuner", "1.0", "--lr_model", "0.05", "--objective", "lm"]
    argv += extra
    argv += ["--accelerator", "cpu", "--devices", "2", "--strategy", strategy, "--no_progress"]
    launch("pretrain_tuner.cli", argv, out.parent / "home")
    return json.loads((out / "config.json").read_text())["metrics"]


def sharded_checkpoint_weights(folder: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The full state_dict of a distributed (FSDP2) checkpoint folder, through torch's converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, tmp / "full.pt")
    return torch.load(tmp / "full.pt", weights_only=False)["state_dict"]


def test_pretrain_tuner_fsdp_matches_ddp_and_resumes(files, tmp_path):
    """2 meta-steps under FSDP2 (each rank holding half of every tensor) == 2 under DDP; both
    resumed from their checkpoints to 4: the same tuner and the same base model again."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        first = pretrain(files, out, strategy, 2)
        assert first["world_size"] == 2 and first["steps"] == 2
        assert first["sharded"] is (strategy == "fsdp")
        shutil.copytree(out, tmp_path / f"{strategy}-2", ignore=shutil.ignore_patterns("logs"))
        resumed = pretrain(files, out, strategy, 4, "--resume")
        assert resumed["steps"] == 4 and resumed["replicas_identical"] is True
        runs[strategy] = resumed
    for key in ("loss_plus", "loss_minus", "meta_loss", "sigma_min", "sigma_max"):
        assert runs["fsdp"][key] == pytest.approx(runs["ddp"][key], rel=1e-5), key
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one per rank

    for steps in ("-2", ""):
        ddp, fsdp = tmp_path / f"ddp{steps}", tmp_path / f"fsdp{steps}"
        assert_same_tuner_and_model(ddp, fsdp, tmp_path / f"convert{steps}")


def assert_same_tuner_and_model(ddp: Path, fsdp: Path, scratch: Path) -> None:
    model, _ = load_model("tiny-llama")
    initial = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=0)
    a, b = Tuner.load_folder(ddp), Tuner.load_folder(fsdp)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), initial.parameters(), strict=True)
    )
    assert moved > 1e-3, "the tuner barely moved: the comparison would be vacuous"
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)

    ddp_weights = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    scratch.mkdir()
    fsdp_weights = sharded_checkpoint_weights(fsdp / "checkpoints" / "last.ckpt", scratch)
    start = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = [k for k in ddp_weights if k.startswith("model.")]
    assert names and sorted(names) == sorted(k for k in fsdp_weights if k.startswith("model."))
    assert max(float((ddp_weights[k] - start[k]).abs().max()) for k in names) > 1e-3
    for name in names:
        torch.testing.assert_close(fsdp_weights[name], ddp_weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrain_tuner_bf16_true_keeps_the_tuner_float32(files, tmp_path, strategy):
    """bf16-true under DDP and FSDP2: the base model runs in bfloat16, the tuner stays float32
    (only the base model is converted, before the strategy wraps the module) and learns."""
    out = tmp_path / strategy
    pretrain(files, out, strategy, 2, "--precision", "bf16-true")
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    model, _ = load_model("tiny-llama")
    fresh = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=0)
    # w1's columns of features that are 0 in the first steps get no gradient
    assert (weights["w1"] != fresh.w1.detach()).float().mean() > 0.2
