"""Model card (``README.md``) of a tuner, rendered from its config and nothing else."""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCardData

from l2l.tuner.config import ARTIFACT_FILES, TunerConfig

CARD_TAGS = ("zeroth-order", "l2l", "zo-finetuner", "learned-optimizer")


def card_metadata(config: TunerConfig) -> ModelCardData:
    """The YAML front matter: library, base model and tags the Hub indexes."""
    tags = list(CARD_TAGS)
    if config.model_type:
        tags.append(config.model_type)
    return ModelCardData(
        library_name=config.library_name,
        base_model=config.base_model,
        tags=tags,
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    if not rows:
        return "_none recorded_\n"
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_format_value(value)} |" for key, value in sorted(rows.items())]
    return "\n".join(lines) + "\n"


def _tasks(config: TunerConfig) -> str:
    tasks = config.recipe.get("tasks") or config.recipe.get("task")
    if not tasks:
        return "not recorded"
    return ", ".join(tasks) if isinstance(tasks, list) else str(tasks)


def render_model_card(config: TunerConfig) -> str:
    """Render the full ``README.md`` (front matter + body) for ``config``."""
    revision = f" (revision `{config.revision}`)" if config.revision else ""
    scaling = (
        "raw, as in the ZO Fine-tuner paper"
        if config.feature_scaling == "raw"
        else f"asinh(x / s) with s = {config.feature_scales}"
    )
    body = f"""
# ZO tuner for {config.base_model}

A learned zeroth-order perturbation tuner (ZO Fine-tuner style) for
[`{config.base_model}`](https://huggingface.co/{config.base_model}){revision}: one small MLP per
parameter block, Linear(5, {config.hidden_size}) -> Tanh -> Linear({config.hidden_size}, 1),
predicts the perturbation scale sigma_b of every block at every step of a MeZO-style run.
It was meta-trained once for this base model and can be reused on any downstream task and on
derived checkpoints with the same parameter blocks (e.g. an Instruct variant).

- Library: `{config.library_name}` {config.library_version}
- Architecture: `{config.model_type or "unknown"}`, {config.num_blocks} blocks,
  fingerprint `{config.fingerprint[:16]}`
- Training tasks: {_tasks(config)}
- Features: {", ".join(config.features)} ({scaling})
- ZO settings: eps = {config.eps:g}, normalisation {"on" if config.normalize else "off"}
- Created: {config.created_at}

## Usage

```python
from l2l.tuner import Tuner

tuner = Tuner.from_pretrained("<this repo or folder>")
tuner.check_compatible(blocks)  # blocks = l2l.blocks.ParamBlocks.from_module(model)
sigma = tuner(features)  # (B, 5) float32 features -> (B,) positive sigma_b
```

## Training recipe

{_table(config.recipe, ("setting", "value"))}
## Metrics

{_table(config.metrics, ("metric", "value"))}
## Files

{", ".join(f"`{name}`" for name in ARTIFACT_FILES)}; the weights are safetensors (never pickle).
"""
    return f"---\n{card_metadata(config).to_yaml()}\n---\n{body}"
