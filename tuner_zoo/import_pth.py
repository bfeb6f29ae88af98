"""Convert the ZO Fine-tuner authors' released tuner (.pth) into an l2l tuner folder.

The release (ASTRAL-Group/ZO_Fine_tuner, ``learned_finetuner/*.pth``) is ``torch.save`` of a
pickled ``dict`` {Hugging Face parameter name -> ``nn.Sequential(Linear(5, 64), Tanh,
Linear(64, 1))``}. Loading it with plain ``torch.load`` would run arbitrary pickle code, so it is
read with ``weights_only=True`` and only ``nn.Sequential``, ``nn.Linear`` and ``nn.Tanh`` allowed
on top of torch's tensor/``OrderedDict``/``set`` builtins (what the file really references). Any
other global fails before anything is constructed.

The release's tensors were saved on ``cuda:0``; they are mapped to the CPU. Its MLPs take raw
features, so the converted tuner uses ``feature_scaling="raw"`` and reproduces their outputs.
Its tied ``lm_head.weight`` has no entry (one block with ``embed_tokens``, as in
:class:`l2l.blocks.ParamBlocks`).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2l.blocks import ParamBlocks
from l2l.tuner import Tuner

ALLOWED_GLOBALS = (nn.Sequential, nn.Linear, nn.Tanh)
# What is known of every release tuner: meta-trained on COPA only (paper); the run name stored in
# the archive (e.g. "llama1b_Copa_SGD1e-2_..._15_5_need_normalization_input5_fp32") is recorded too.
RELEASE_RECIPE = {
    "source": "ZO Fine-tuner release (github.com/ASTRAL-Group/ZO_Fine_tuner)",
    "tasks": ["COPA"],
}


class ReleaseFormatError(ValueError):
    """The .pth is not a ZO Fine-tuner release or references globals we refuse to unpickle."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_name(path: Path) -> str | None:
    """The record name torch.save stored (the authors' run name), if the file is a zip."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()[0].split("/")[0]


def load_release(path: str | Path) -> dict[str, nn.Sequential]:
    """Safely load a release .pth: {parameter name -> Sequential(Linear(5,H), Tanh, Linear(H,1))}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the released .pth file")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"the global {found[1]!r}" if found else "content outside the allowed set"
        raise ReleaseFormatError(
            f"{path}: refusing to unpickle {what}; a ZO Fine-tuner release only needs "
            f"{', '.join(c.__name__ for c in ALLOWED_GLOBALS)} and tensors. Do not load this file "
            "with plain torch.load unless you trust its source."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise ReleaseFormatError(f"{path}: not a readable torch.save file ({err})") from err
    return _check_release(path, obj)


def _check_mlp(path: Path, name: str, mlp: Any) -> int:
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    kinds = [type(m) for m in layers]
    if kinds != [nn.Linear, nn.Tanh, nn.Linear]:
        got = [k.__name__ for k in kinds] if layers else type(mlp).__name__
        raise ReleaseFormatError(
            f"{path}: entry {name!r} is {got}, expected Sequential(Linear(5, H), Tanh, Linear(H, 1))"
        )
    first, last = layers[0], layers[2]
    hidden = first.out_features
    if first.in_features != 5 or last.in_features != hidden or last.out_features != 1:
        raise ReleaseFormatError(
            f"{path}: entry {name!r} has Linear({first.in_features}, {hidden}) -> "
            f"Linear({last.in_features}, {last.out_features}), expected Linear(5, H) -> Linear(H, 1)"
        )
    if first.bias is None or last.bias is None:
        raise ReleaseFormatError(f"{path}: entry {name!r} has a Linear without bias")
    return hidden


def _check_release(path: Path, obj: Any) -> dict[str, nn.Sequential]:
    if not isinstance(obj, dict) or not obj:
        raise ReleaseFormatError(
            f"{path}: expected a non-empty dict {{parameter name -> nn.Sequential}}, "
            f"got {type(obj).__name__}"
        )
    hidden = {_check_mlp(path, str(name), mlp) for name, mlp in obj.items()}
    if len(hidden) != 1:
        raise ReleaseFormatError(f"{path}: the MLPs have different hidden sizes {sorted(hidden)}")
    return {str(name): mlp for name, mlp in obj.items()}


def _check_names(path: Path, names: list[str], blocks: ParamBlocks) -> None:
    released, model = set(names), set(blocks.names)
    extra = [n for n in names if n not in model]
    missing = [n for n in blocks.names if n not in released]
    if extra or missing:
        first = (
            f"the release has {extra[0]!r}, which is not a block of the model"
            if extra
            else f"the model block {missing[0]!r} has no MLP in the release"
        )
        raise ReleaseFormatError(
            f"{path}: {len(names)} released MLPs vs {len(blocks)} model blocks: {first}. "
            "Pass the base model the release was trained for."
        )


def convert_release(
    path: str | Path,
    blocks: ParamBlocks,
    base_model: str,
    *,
    revision: str | None = None,
    model_type: str | None = None,
    recipe: dict[str, Any] | None = None,
) -> Tuner:
    """The release at ``path`` as a :class:`Tuner` over ``blocks`` (model order, raw features)."""
    path = Path(path)
    mlps = load_release(path)
    _check_names(path, list(mlps), blocks)
    hidden = next(iter(mlps.values()))[0].out_features
    full_recipe = {
        **RELEASE_RECIPE,
        "release_file": path.name,
        "release_sha256": _sha256(path),
        "release_run": _archive_name(path),
        **(recipe or {}),
    }
    tuner = Tuner.for_blocks(
        blocks,
        base_model,
        revision,
        model_type=model_type,
        hidden_size=hidden,
        feature_scaling="raw",
        normalize=True,
        recipe=full_recipe,
    )
    for index, name in enumerate(blocks.names):
        tuner.load_block_mlp(index, mlps[name])
    return tuner


def blocks_for_model(model_config: str | Path) -> tuple[ParamBlocks, str]:
    """Block names/shapes (and ``model_type``) of a causal LM from its config, on ``meta``.

    ``model_config`` is a Hub id, a model folder or a ``config.json``; no weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(model_config)
    if source.is_file():
        source = source.parent
    try:
        config = AutoConfig.from_pretrained(str(source) if source.exists() else str(model_config))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not read the model config {str(model_config)!r} ({type(err).__name__}): pass "
            "--model-config with a local config.json or model folder (the Hub may be unreachable)"
        ) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ParamBlocks.from_module(model), config.model_type
