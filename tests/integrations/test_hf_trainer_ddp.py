"""ZOTrainer data parallel: two gloo ranks on the CPU take the same steps as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import free_port
from test_hf_trainer import make_trainer

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "trainer_ddp_worker.py"
ROOT = WORKER.parents[2]
TIMEOUT_S = 300


def run_ranks(output: Path) -> list[dict]:
    paths = [ROOT, ROOT / "tests", WORKER.parent]  # the repo first: tests/l2l must not shadow l2l
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*command, "--master_port", str(free_port()), str(WORKER), str(output)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to the ranks, which run in their own groups
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"the two ranks did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    return [json.loads((output / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_step_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    ranks = run_ranks(tmp_path / "ddp")
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]  # identical updates everywhere
    torch.set_num_threads(1)
    single = make_trainer(tmp_path / "single", max_steps=4, per_device_train_batch_size=8)
    single.train()
    assert ranks[0]["seeds"] == [r.seed for r in single.zo_optimizer.records]
    expected = [r.grad for r in single.zo_optimizer.records]
    assert ranks[0]["grads"] == pytest.approx(expected, rel=1e-3, abs=2e-3)
    assert (tmp_path / "ddp" / "trajectory.json").is_file()  # written once, by rank 0
