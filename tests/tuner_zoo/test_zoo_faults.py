"""Fault injection for ``tuner-zoo``: an unreachable Hub, a taken name, bad flags; and its
``--help``: every flag explained, with its default, in the shared vocabulary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hub_server import configure_client, free_port, set_offline, skip_retry_waits
from torch import nn

import tuner_zoo.resolve as resolve
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner
from tuner_zoo.cli import COMMANDS, main


@pytest.fixture(autouse=True)
def no_bundled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(resolve, "BUNDLED_DIR", tmp_path / "bundled")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    blocks = ParamBlocks.from_module(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
    Tuner.for_blocks(blocks, "org/tiny").save_pretrained(tmp_path / "t")
    return tmp_path / "t"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tuner-zoo: error: "), err
    return err[0]


def test_push_to_an_unreachable_hub_is_one_line(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_loopbackTestToken0123456789")
    set_offline(monkeypatch, False)
    endpoint = f"http://127.0.0.1:{free_port()}"
    configure_client(monkeypatch, endpoint, tmp_path / "hf" / "hub")
    skip_retry_waits(monkeypatch)
    assert main(["push", str(folder), "test-user/tuner"]) == 2
    line = one_error_line(capsys)
    assert f"could not push {folder} to test-user/tuner on {endpoint}" in line
    assert "hf_loopback" not in line


def test_taken_name_needs_overwrite(folder, capsys):
    assert main(["register", "mine", str(folder)]) == 0
    capsys.readouterr()
    assert main(["register", "mine", str(folder)]) == 2
    line = one_error_line(capsys)
    assert "already has a tuner called 'mine'" in line and "--overwrite" in line
    assert main(["register", "mine", str(folder), "--overwrite"]) == 0


def test_import_pth_refuses_a_taken_name_before_converting(folder, tmp_path, capsys):
    assert main(["register", "mine", str(folder)]) == 0
    capsys.readouterr()
    argv = ["import-pth", str(tmp_path / "missing.pth"), "--model", "org/x"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--register", "mine"]) == 2
    assert "--register mine: the local zoo already has" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["nope"], "invalid choice: 'nope'"),
        (["download"], "required"),
        (["register", "a", "b", "--force"], "unrecognized arguments: --force"),
        (["download", "x", "--revision", "v1"], "unrecognized arguments: --revision"),
    ],
)
def test_bad_flags_are_one_line(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_and_a_default(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "`" not in text
    entries = re.split(r"\n(?=  \S)", text.split("positional arguments:", 1)[-1])
    flags = [" ".join(e.split()) for e in entries if e.startswith("  ") and "--help" not in e]
    assert flags or command == "list"
    for entry in flags:
        assert "(default: " in entry or "(required)" in entry, (command, entry)


def test_vocabulary_of_the_subcommands(capsys):
    expected = {
        "download": ("--tuner_revision", "--force_download"),
        "register": ("--overwrite",),
        "import-pth": ("--model", "--model_revision", "--output"),
    }
    for command, flags in expected.items():
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), command
