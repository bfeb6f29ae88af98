"""Tuner zoo: registry, local resolution, the safe .pth importer and the CLI (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tuner_zoo.resolve as resolve
from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner, TunerFormatError, TunerNotFoundError
from llm.shapes import shape_config
from tuner_zoo.cli import main
from tuner_zoo.import_pth import ReleaseFormatError, convert_release, load_release
from tuner_zoo.registry import STATUSES, entries_for_model, get_entry, load_registry
from tuner_zoo.resolve import register_local, resolve_tuner

ANCHOR = Path(__file__).parents[3] / "shared/anchors/zo_fine_tuner/llama1B_finetuner.pth"
needs_anchor = pytest.mark.skipif(not ANCHOR.is_file(), reason=f"anchor {ANCHOR} absent")


@pytest.fixture(autouse=True)
def no_bundled(tmp_path: Path, monkeypatch) -> None:
    """No bundled tuners, for every test (the user zoo is the empty ``l2l_home`` fixture)."""
    monkeypatch.setattr(resolve, "BUNDLED_DIR", tmp_path / "bundled")


def save_tiny_tuner(folder: Path, base_model: str = "org/tiny") -> Tuner:
    blocks = ParamBlocks.from_module(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
    tuner = Tuner.for_blocks(blocks, base_model)
    tuner.save_pretrained(folder)
    return tuner


# --- registry ---------------------------------------------------------------------------------


def test_registry_is_honest() -> None:
    registry = load_registry()
    for name, entry in registry.items():
        assert entry.status in STATUSES, name
        if entry.status == "available":
            assert entry.repo_id, name
        if entry.repo_id and entry.repo_id.startswith("l2l-zo/"):
            assert entry.status == "planned: not trained yet", name  # placeholder ids only
    release = {n: e.num_blocks for n, e in registry.items() if e.source == "zo-finetuner release"}
    assert release == {"llama-3.2-1b": 146, "llama-3.1-8b": 291, "qwen2.5-14b": 579, "opt-30b": 772}
    assert registry["smollm2-135m"].status == "bundled"
    for name in ("opt-1.3b", "opt-13b", "qwen2.5-7b"):
        assert name in registry
    assert [e.name for e in entries_for_model("meta-llama/Llama-3.2-1B-Instruct")] == [
        "llama-3.2-1b"
    ]


def test_user_registry_extends_the_package_one(l2l_home: Path) -> None:
    l2l_home.mkdir(exist_ok=True)
    entry = {"base_models": ["org/m"], "architecture": "x", "source": "org", "status": "available",
             "repo_id": "org/m-tuner"}  # fmt: skip
    (l2l_home / "registry.json").write_text(json.dumps({"tuners": {"org-m": entry}}))
    assert get_entry("org-m").repo_id == "org/m-tuner" and get_entry("opt-13b") is not None


# --- resolution -------------------------------------------------------------------------------


def test_resolve_local_folder(tmp_path: Path) -> None:
    save_tiny_tuner(tmp_path / "mine")
    assert resolve_tuner(tmp_path / "mine") == tmp_path / "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunerNotFoundError, match="is a folder but not a tuner"):
        resolve_tuner(tmp_path / "empty")


def test_register_local_then_resolve_by_name(tmp_path: Path, l2l_home: Path) -> None:
    tuner = save_tiny_tuner(tmp_path / "trained")
    target = register_local("my-tuner", tmp_path / "trained")
    assert target == l2l_home / "zoo" / "my-tuner"
    assert resolve_tuner("my-tuner") == target
    torch.testing.assert_close(Tuner.from_pretrained(resolve_tuner("my-tuner")).w1, tuner.w1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        register_local("my-tuner", tmp_path / "trained")
    linked = register_local("my-tuner", tmp_path / "trained", link=True, overwrite=True)
    assert linked.is_symlink() and resolve_tuner("my-tuner") == linked


def test_register_local_validates_first(tmp_path: Path, l2l_home: Path) -> None:
    save_tiny_tuner(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"nonsense")
    with pytest.raises(TunerFormatError, match="model.safetensors"):
        register_local("bad", tmp_path / "bad")
    with pytest.raises(ValueError, match="zoo name"):
        register_local("../escape", tmp_path / "bad")
    assert not (l2l_home / "zoo" / "bad").exists()


def test_resolve_bundled_and_by_base_model_id(tmp_path: Path) -> None:
    with pytest.raises(TunerNotFoundError, match="no bundled tuner.*pretrain-tuner --model"):
        resolve_tuner("smollm2-135m")
    save_tiny_tuner(tmp_path / "bundled" / "smollm2-135m", "HuggingFaceTB/SmolLM2-135M")
    folder = tmp_path / "bundled" / "smollm2-135m"
    assert resolve_tuner("smollm2-135m") == folder
    assert resolve_tuner("HuggingFaceTB/SmolLM2-135M-Instruct") == folder


def test_local_zoo_shadows_bundled(tmp_path: Path) -> None:
    save_tiny_tuner(tmp_path / "bundled" / "smollm2-135m")
    save_tiny_tuner(tmp_path / "retrained")
    local = register_local("smollm2-135m", tmp_path / "retrained")
    assert resolve_tuner("smollm2-135m") == local


def test_unavailable_registry_entries_say_what_to_do() -> None:
    with pytest.raises(
        TunerNotFoundError,
        match="planned: not trained yet.*pretrain-tuner --model facebook/opt-13b",
    ):
        resolve_tuner("opt-13b")
    with pytest.raises(TunerNotFoundError, match="tuner-zoo import-pth"):
        resolve_tuner("meta-llama/Llama-3.2-1B")  # a base model id maps to its registry entry


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(
        TunerNotFoundError, match=r"Did you mean 'smollm2-135m'.*pretrain-tuner"
    ) as info:
        resolve_tuner("smollm2-135")
    assert "tuner-zoo list" in str(info.value)


# --- .pth import ------------------------------------------------------------------------------


def _never_called(text: str) -> None:  # pragma: no cover - must never run
    raise AssertionError(f"pickle code ran: {text}")


class Payload:
    def __reduce__(self) -> tuple:
        return (_never_called, ("payload",))


def test_import_refuses_unexpected_globals(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"model.norm.weight": Payload()}, evil)
    with pytest.raises(
        ReleaseFormatError, match=r"refusing to unpickle the global '.*_never_called'"
    ):
        load_release(evil)


def test_import_checks_the_structure(tmp_path: Path) -> None:
    odd = tmp_path / "odd.pth"
    torch.save({"w": nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))}, odd)
    with pytest.raises(ReleaseFormatError, match=r"entry 'w' has Linear\(5, 8\) -> Linear\(8, 2\)"):
        load_release(odd)
    torch.save({"w": torch.zeros(3)}, odd)
    with pytest.raises(ReleaseFormatError, match="entry 'w' is Tensor, expected Sequential"):
        load_release(odd)


def test_import_names_must_match_the_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(5, 2))
    release = tmp_path / "r.pth"
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    torch.save({"0.weight": mlp, "lm_head.weight": mlp}, release)
    with pytest.raises(ReleaseFormatError, match="'lm_head.weight', which is not a block"):
        convert_release(release, ParamBlocks.from_module(model), "org/x")


@pytest.fixture(scope="module")
def llama_1b_blocks() -> ParamBlocks:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(shape_config("llama-3.2-1b"))
    return ParamBlocks.from_module(model)


@needs_anchor
def test_import_release_llama_1b(tmp_path: Path, llama_1b_blocks: ParamBlocks) -> None:
    mlps = load_release(ANCHOR)
    assert len(mlps) == 146 and "lm_head.weight" not in mlps  # tied with embed_tokens
    assert list(mlps) == llama_1b_blocks.names
    assert llama_1b_blocks.aliases[0] == ["model.embed_tokens.weight", "lm_head.weight"]
    tuner = convert_release(ANCHOR, llama_1b_blocks, "meta-llama/Llama-3.2-1B", model_type="llama")
    tuner.check_compatible(llama_1b_blocks)
    assert tuner.config.feature_scaling == "raw" and tuner.config.recipe["tasks"] == ["COPA"]
    features = torch.randn(146, 5, generator=torch.Generator().manual_seed(0))
    features *= torch.tensor([0.02, 1e-3, 3.0, 3.0, 1.0])
    expected = torch.stack([mlps[n](features[i]).abs().squeeze() for i, n in enumerate(mlps)])
    torch.testing.assert_close(tuner(features), expected.detach(), rtol=1e-5, atol=1e-7)
    tuner.save_pretrained(tmp_path / "llama")
    torch.testing.assert_close(Tuner.from_pretrained(tmp_path / "llama")(features), tuner(features))


@needs_anchor
def test_cli_import_pth(tmp_path: Path, l2l_home: Path, capsys) -> None:
    pytest.importorskip("transformers")
    shape_config("llama-3.2-1b").save_pretrained(tmp_path / "cfg")
    out = tmp_path / "imported"
    argv = ["import-pth", str(ANCHOR), "--model", "meta-llama/Llama-3.2-1B", "--output",
            str(out), "--model_config", str(tmp_path / "cfg" / "config.json"), "--register", "llama-3.2-1b"]  # fmt: skip
    assert main(argv) == 0
    tuner = Tuner.from_pretrained(out)
    assert tuner.num_blocks == 146 and tuner.config.model_type == "llama"
    assert "tags:" in (out / "README.md").read_text()
    # the imported tuner now resolves by registry name and by base model id
    assert resolve_tuner("meta-llama/Llama-3.2-1B-Instruct") == l2l_home / "zoo" / "llama-3.2-1b"
    assert "146 blocks" in capsys.readouterr().out


# --- CLI --------------------------------------------------------------------------------------


def test_cli_list_info_register(tmp_path: Path, capsys) -> None:
    save_tiny_tuner(tmp_path / "t")
    assert main(["register", "tiny-one", str(tmp_path / "t")]) == 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-one", "smollm2-135m", "llama-3.2-1b", "opt-13b"):
        assert name in out
    assert main(["info", "tiny-one"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["location"] == "local zoo" and info["config"]["base_model"] == "org/tiny"
    assert main(["info", "tiny-on"]) == 2
    assert "Did you mean 'tiny-one'" in capsys.readouterr().err


def test_cli_download_of_a_planned_tuner_fails_cleanly(capsys) -> None:
    assert main(["download", "opt-1.3b"]) == 2
    assert "planned: not trained yet" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "info", "download", "push", "import-pth", "register"):
        assert command in out
