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


def test_profile_step_attaches_a_tuner_to_a_bfloat16_model(capsys):
    with benchmark_module("profile_step") as module:
        args = ["--method", "mezo+tuner", "--layers", "1", "--batch", "1", "--seq", "8"]
        assert module.main([*args, "--steps", "1", "--rows", "500", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# mezo+tuner on smollm2-135m (1 layers), batch 1 x 8, bfloat16 on cpu")
    assert "Optimizer.step#ZOSGD.step" in out and "aten::tanh" in out  # the tuner's MLP
