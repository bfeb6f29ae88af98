"""``l2l replay``: a fine-tune folder or Hub repo -> verified weights on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import finetune_argv, same_bits, snapshot
from hub_server import HubServer, set_offline
from transformers import AutoModelForCausalLM

from finetune.replay import main
from l2l import MeZO, Trajectory
from l2l.finetuned import push_finetuned, weights_sha256
from llm.models import load_model


def fine_tune(folder: Path, steps: int = 3):
    """A few MeZO steps on the built-in tiny-llama; a finetune-style output folder."""
    model, tokenizer = load_model("tiny-llama")
    opt = MeZO(model, lr=1e-3, seed=4, record=True)
    ids = tokenizer(["The movie was great. It was great."], return_tensors="pt")["input_ids"]
    for _ in range(steps):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    folder.mkdir(parents=True)
    Trajectory.from_optimizer(opt).save(folder / "trajectory.json")
    results = dict(model="l2l/tiny-llama", method="mezo", weights_sha256=weights_sha256(model))
    (folder / "results.json").write_text(json.dumps(dict(results, config={"dtype": "float32"})))
    return model


def test_replay_a_local_run(tmp_path: Path, capsys) -> None:
    trained = fine_tune(tmp_path / "run")
    assert main(["replay", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    assert "verified" in capsys.readouterr().out
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert same_bits(snapshot(rebuilt), snapshot(trained))
    assert (tmp_path / "out" / "trajectory.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    argv = ["replay", str(tmp_path / "run"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2  # an existing output is kept
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_replay_refuses_weights_that_do_not_match(tmp_path: Path, capsys) -> None:
    fine_tune(tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    results["weights_sha256"] = "0" * 64
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    assert main(["replay", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("l2l: error: the replayed weights do not match") and "Traceback" not in err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.network
def test_push_then_replay_from_the_hub(tmp_path: Path, monkeypatch, capsys) -> None:
    trained = fine_tune(tmp_path / "run", steps=5)
    with HubServer() as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
        set_offline(monkeypatch, False)
        hub.configure(monkeypatch, cache_dir=tmp_path / "hf" / "hub")
        push_finetuned(tmp_path / "run", "test-user/tiny-llama-mezo", task="tweets")
        code = main(["replay", "test-user/tiny-llama-mezo", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert same_bits(snapshot(rebuilt), snapshot(trained))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: l2l/tiny-llama" in card and "task: tweets" in card


@pytest.mark.network
def test_a_finetune_run_pushed_and_replayed(tmp_path: Path, monkeypatch, capsys) -> None:
    """``finetune --push_to_hub``: the run uploads its trajectory, results and card (with the
    hash of the weights it ended with); ``l2l replay`` from the Hub rebuilds exactly the weights
    the run saved."""
    from finetune.cli import main as finetune

    out = tmp_path / "run"
    argv = finetune_argv("tweets", out, "--model", "tiny-llama", "--save_model", steps=3)
    with HubServer() as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
        set_offline(monkeypatch, False)
        hub.configure(monkeypatch, cache_dir=tmp_path / "hf" / "hub")
        assert finetune([*argv, "--push_to_hub", "test-user/finetune-run"]) == 0
        assert "pushed to" in capsys.readouterr().out
        code = main(["replay", "test-user/finetune-run", "--output", str(tmp_path / "rebuilt")])
    assert code == 0, capsys.readouterr().err
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")
    assert same_bits(snapshot(rebuilt), snapshot(saved))
    results = json.loads((out / "results.json").read_text())
    assert results["weights_sha256"] == weights_sha256(saved)
    assert results["base_model"] == "l2l/tiny-llama"
    card = (tmp_path / "rebuilt" / "README.md").read_text()
    assert "task: tweets" in card and "objective: classification" in card


def test_push_to_an_unreachable_hub_keeps_the_run_and_says_how_to_push_later(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from hub_server import configure_client, free_port, skip_retry_waits

    from finetune.cli import main as finetune

    configure_client(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path / "hf")
    skip_retry_waits(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
    out = tmp_path / "run"
    argv = finetune_argv("tweets", out, "--model", "tiny-llama", steps=2)
    assert finetune([*argv, "--push_to_hub", "test-user/x"]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub test-user/x failed" in err and "push_finetuned(" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "results.json").read_text())["status"] == "finished"
