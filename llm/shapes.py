"""The architectures of real base models, as Hugging Face configs, for random-init models of
real shapes (benchmarks, block-layout tests, GPU checks) without downloading any weights."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, OPTConfig, PretrainedConfig

#: name -> (config class, the fields of the model's config.json that decide its blocks and cost)
SHAPES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    # SmolLM2-135M(-Instruct): 30 layers, width 576, GQA 9/3 heads, vocab 49152, tied embeddings
    "smollm2-135m": (
        LlamaConfig,
        dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=8192, rms_norm_eps=1e-5,
        ),
    ),
    # Llama-3.2-1B: 16 layers, width 2048, GQA 32/8 heads, vocab 128256, tied embeddings
    "llama-3.2-1b": (
        LlamaConfig,
        dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
            rms_norm_eps=1e-5, rope_theta=500000.0,
        ),
    ),
    # OPT-13B: 40 layers, width 5120, 40 heads, vocab 50272, tied embeddings
    "opt-13b": (
        OPTConfig,
        dict(
            hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
            vocab_size=50272, word_embed_proj_dim=5120, max_position_embeddings=2048,
        ),
    ),
}  # fmt: skip


def shape_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of ``name`` (a key of :data:`SHAPES`), with ``overrides`` (e.g. fewer layers)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}: choose one of {', '.join(SHAPES)}")
    cls, fields = SHAPES[name]
    return cls(**{**fields, **overrides})
