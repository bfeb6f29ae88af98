"""The real huggingface_hub client against a loopback Hub: push, download, cache, offline, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import (  # noqa: E402
    HubServer,
    configure_client,
    free_port,
    set_offline,
    skip_retry_waits,
)
from torch import nn

import tuner_zoo.resolve as resolve
from l2l.blocks import ParamBlocks
from l2l.tuner import ARTIFACT_FILES, Tuner, TunerNotFoundError
from tuner_zoo.cli import main
from tuner_zoo.publish import push_folder
from tuner_zoo.resolve import is_cached, resolve_tuner

TOKEN = "hf_loopbackTestToken0123456789"

pytestmark = pytest.mark.network


@pytest.fixture(scope="session")
def hub() -> HubServer:
    with HubServer() as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A private HF cache, user zoo and token; offline mode off."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(resolve, "BUNDLED_DIR", tmp_path / "bundled")
    set_offline(monkeypatch, False)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def online(hub: HubServer, cache: Path, monkeypatch) -> HubServer:
    hub.configure(monkeypatch, cache_dir=cache)
    return hub


def make_tuner(seed: int = 0) -> Tuner:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    return Tuner.for_blocks(ParamBlocks.from_module(model), "org/base", model_type="toy", seed=seed)


def features(tuner: Tuner) -> torch.Tensor:
    return torch.randn(tuner.num_blocks, 5, generator=torch.Generator().manual_seed(1)).abs()


def snapshots(cache: Path) -> list[Path]:
    return sorted(cache.glob("models--*/snapshots/*/*"))


def test_push_then_download_then_offline(cache: Path, monkeypatch) -> None:
    tuner = make_tuner()
    with HubServer() as hub:  # its own server, so it can be stopped mid-test
        hub.configure(monkeypatch, cache_dir=cache)
        url = tuner.push_to_hub("test-user/pushed")
        assert url.startswith(hub.endpoint) and "/commit/" in url
        assert sorted(hub.files("test-user/pushed")) == sorted(ARTIFACT_FILES)
        assert hub.authorizations and all(a == f"Bearer {TOKEN}" for a in hub.authorizations)
        card = hub.files("test-user/pushed")["README.md"].decode()
        assert "library_name: l2l-zo" in card and "base_model: org/base" in card
        loaded = Tuner.from_pretrained("test-user/pushed")
        assert {p.name for p in snapshots(cache)} == set(ARTIFACT_FILES)
        assert is_cached("test-user/pushed")
    torch.testing.assert_close(loaded(features(tuner)), tuner(features(tuner)), rtol=0, atol=0)
    set_offline(monkeypatch)  # server stopped and HF_HUB_OFFLINE=1: the cache still serves
    again = Tuner.from_pretrained("test-user/pushed")
    torch.testing.assert_close(again.w1, tuner.w1)
    assert resolve_tuner("test-user/pushed") == snapshots(cache)[0].parent
    # a fresh process that starts with HF_HUB_OFFLINE=1 (read by huggingface_hub at import)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    code = "from tuner_zoo import resolve_tuner; print(resolve_tuner('test-user/pushed'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshots(cache)[0].parent


def test_unreachable_hub_is_a_clear_error(cache: Path, monkeypatch, tmp_path: Path) -> None:
    configure_client(monkeypatch, f"http://127.0.0.1:{free_port()}", cache)
    skip_retry_waits(monkeypatch)
    with pytest.raises(TunerNotFoundError, match="could not be fetched from the Hub.*meta-train"):
        Tuner.from_pretrained("test-user/anything")
    with pytest.raises(TunerNotFoundError, match="'test-user/anything'"):
        resolve_tuner("test-user/anything")
    assert snapshots(cache) == [] and not list(cache.glob("**/*.safetensors"))


def test_offline_without_cache_says_so(cache: Path, monkeypatch, online: HubServer) -> None:
    set_offline(monkeypatch)
    with pytest.raises(TunerNotFoundError, match="offline mode is on.*tuner-zoo download"):
        resolve_tuner("test-user/never-downloaded")
    assert not [r for r in online.requests if "never-downloaded" in r[1]]


def test_repo_that_is_not_a_tuner_downloads_nothing_big(online: HubServer, cache: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("test-user/base-model", exist_ok=True)
    api.upload_file(path_or_fileobj=b'{"model_type": "llama"}', path_in_repo="config.json",
                    repo_id="test-user/base-model")  # fmt: skip
    api.upload_file(path_or_fileobj=b"\0" * 4096, path_in_repo="model.safetensors",
                    repo_id="test-user/base-model")  # fmt: skip
    with pytest.raises(TunerNotFoundError, match="is not an l2l tuner.*missing key"):
        Tuner.from_pretrained("test-user/base-model")
    assert not [
        r for r in online.requests if r[1].endswith("base-model/resolve/main/model.safetensors")
    ]


def test_failed_download_leaves_no_usable_half_snapshot(
    online: HubServer, cache: Path, monkeypatch
) -> None:
    make_tuner().push_to_hub("test-user/flaky")
    online.fail_downloads.add("model.safetensors")
    try:
        with pytest.raises(Exception, match="500|simulated|could not be fetched"):
            Tuner.from_pretrained("test-user/flaky")
    finally:
        online.fail_downloads.clear()
    assert not list(cache.glob("**/snapshots/*/model.safetensors"))
    set_offline(monkeypatch)
    with pytest.raises(TunerNotFoundError):
        Tuner.from_pretrained("test-user/flaky")


def test_zoo_resolves_a_registry_name_from_the_hub(
    online: HubServer, cache: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per tuner
    tuner = make_tuner(seed=3)
    tuner.push_to_hub("test-user/base-tuner")
    home = Path(resolve.l2l_home())
    home.mkdir(parents=True, exist_ok=True)
    entry = {"repo_id": "test-user/base-tuner", "base_models": ["org/base"], "architecture": "toy",
             "source": "l2l", "status": "available"}  # fmt: skip
    (home / "registry.json").write_text(json.dumps({"tuners": {"base-tuner": entry}}))
    assert main(["list"]) == 0
    assert "hub: test-user/base-tuner" in capsys.readouterr().out
    assert main(["download", "base-tuner"]) == 0
    folder = resolve_tuner("base-tuner")
    assert folder.parent.parent.name == "models--test-user--base-tuner"
    assert resolve_tuner("org/base") == folder  # by base model id
    torch.testing.assert_close(Tuner.from_pretrained(folder).w2, tuner.w2)
    assert main(["list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "│ base-tuner" in line)
    assert "yes" in row


def test_cli_push_validates_and_never_prints_the_token(
    online: HubServer, tmp_path: Path, capsys
) -> None:
    tuner = make_tuner(seed=5)
    tuner.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "README.md").unlink()  # a card is rendered from the config
    (tmp_path / "t" / "notes.txt").write_text("not uploaded")
    assert main(["push", str(tmp_path / "t"), "test-user/cli-pushed"]) == 0
    out = capsys.readouterr()
    assert "test-user/cli-pushed" in out.out and TOKEN not in out.out + out.err
    assert sorted(online.files("test-user/cli-pushed")) == sorted(ARTIFACT_FILES)
    (tmp_path / "t" / "model.safetensors").write_bytes(b"junk")
    assert main(["push", str(tmp_path / "t"), "test-user/cli-pushed-2"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert "test-user/cli-pushed-2" not in online.repos


def test_push_folder_returns_commit_url(online: HubServer, tmp_path: Path) -> None:
    make_tuner().save_pretrained(tmp_path / "t")
    url = push_folder(tmp_path / "t", "test-user/pf", commit_message="first")
    assert url.startswith(f"{online.endpoint}/test-user/pf/commit/")
