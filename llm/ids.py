"""Base-model ids recorded in tuner configs, and the built-in offline names that load them."""

from __future__ import annotations

# built-in name -> the id a tuner records as its base model
OFFLINE_IDS = {
    "tiny-llama": "l2l/tiny-llama",
    "tiny-opt": "l2l/tiny-opt",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

#: ``device_map`` values that split a model over the visible devices (accelerate's names).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def base_model_id(name: str, model=None) -> str:
    """The id to record for ``--model name``: the Hub id behind a built-in name, else ``name``."""
    if name in OFFLINE_IDS:
        return OFFLINE_IDS[name]
    recorded = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name if not recorded or "/" not in recorded or recorded.startswith("/") else recorded


def offline_name(model_id: str) -> str:
    """The built-in name that loads ``model_id`` offline, or ``model_id`` itself.

    SmolLM2-135M base and Instruct share their blocks; both map to the offline Instruct model."""
    if model_id.startswith("HuggingFaceTB/SmolLM2-135M"):
        return "smollm2-135m"
    return {v: k for k, v in OFFLINE_IDS.items()}.get(model_id, model_id)
