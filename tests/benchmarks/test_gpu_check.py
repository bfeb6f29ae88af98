"""``benchmarks/gpu_check.sh --device cpu``: every section of the one-shot GPU check runs and
passes on tiny shapes, so the script works the first time it meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed  # its pretrain sections launch DDP/FSDP over gloo

SECTIONS = [
    "device_check",
    "step_ops",
    "step_cost_tiny",
    "finetune_bf16",
    "pretrain_bf16-mixed_ddp",
    "pretrain_bf16-mixed_fsdp",
    "pretrain_bf16-true_ddp",
    "pretrain_bf16-true_fsdp",
]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = {}
    for line in (out / "status.txt").read_text().splitlines():
        name, rc, *_ = line.split()
        if rc.isdigit():
            status[name] = int(rc)
    assert status == dict.fromkeys(SECTIONS, 0)
    check = json.loads((out / "device_check.json").read_text())
    assert check["ok"] and check["z"] and all(row["equal"] for row in check["z"])
    required = [row for row in check["replay"] if row["required"]]
    assert required and all(row["bit_equal"] for row in required)
    assert "resumed == uninterrupted: True" in (out / "finetune_bf16.log").read_text()
    for name in SECTIONS[4:]:
        assert "saved tuner dtypes: ['torch.float32']" in (out / f"{name}.log").read_text()
