"""``benchmarks/profile_step.py`` profiles the steps it says, of the method it is given."""

from __future__ import annotations

from helpers import benchmark_module


def test_profile_step_prints_the_steps_ops(capsys):
    with benchmark_module("profile_step") as module:
        args = [
            "--method",
            "lozo",
            "--layers",
            "1",
            "--batch",
            "1",
            "--seq",
            "8",
            "--steps",
            "1",
            "--rows",
            "500",
        ]
        assert module.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("# lozo on smollm2-135m (1 layers), batch 1 x 8")
    assert "Optimizer.step#LOZO.step" in out and "aten::linear" in out
