"""The model card (``README.md``) of a shared fine-tune: YAML front matter the Hub indexes plus
the full :class:`FinetuneInfo` under ``l2l_finetune``, and a body rendered from it alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from l2l.finetuned.info import (
    CARD_NAME,
    RESULTS_NAME,
    TRAJECTORY_NAME,
    FinetuneFormatError,
    FinetuneInfo,
)

CARD_KEY = "l2l_finetune"
CARD_TAGS = ("zeroth-order", "l2l", "zo-trajectory")
#: trajectory header keys shown under "how it was made"; any other key is generator provenance
_HEADER_KEYS = ("format", "version", "method", "hparams", "fingerprint")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return (
        "not recorded" if value is None else f"`{value}`" if isinstance(value, str) else str(value)
    )


def _table(rows: dict[str, Any], empty: str = "_none recorded_") -> str:
    if not rows:
        return f"{empty}\n"
    lines = ["| | |", "|---|---|"] + [f"| {k} | {_value(v)} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def _tuner(info: FinetuneInfo) -> dict[str, Any]:
    if not info.tuner:
        return {"tuner": "none (the plain method)"}
    keep = ("spec", "name", "base_model", "revision", "fingerprint")
    return {f"tuner {k}": v for k, v in info.tuner.items() if k in keep}


def render_card(info: FinetuneInfo) -> str:
    """The whole ``README.md``: front matter (library, base model, tags, the record) + body."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="l2l",
        base_model=info.base_model,
        tags=list(CARD_TAGS) + [info.method],
        **{CARD_KEY: info.to_dict()},
    )
    provenance = {k: v for k, v in info.trajectory.items() if k not in _HEADER_KEYS}
    made = {
        "base model": info.base_model,
        "base model revision": info.base_model_revision,
        "dtype": info.dtype,
        "method": info.method,
        **_tuner(info),
        "task": info.task,
        "objective": info.objective,
        "peft": info.peft or "none (all trainable weights)",
        "steps": info.steps,
        "trained with": info.trainer,
        "method settings": info.trajectory.get("hparams"),
        "block fingerprint": info.trajectory.get("fingerprint"),
    }
    body = f"""
# A zeroth-order fine-tune of {info.base_model}, as its trajectory

This repo holds no weights. A zeroth-order (ZO) fine-tune is fully described by one seed and
one scalar per step: `{TRAJECTORY_NAME}` holds them ({info.steps} steps of {info.method}).
Replaying it onto the base model rebuilds the fine-tuned weights bit for bit, and the replay is
checked against the sha256 of the weights recorded below.

## Rebuild the weights

```bash
l2l replay <this repo or folder> --output fine-tuned/
```

```python
from l2l import load_finetuned

model = load_finetuned("<this repo or folder>", model=base_model)  # base_model at its initial weights
```

## How it was made

{_table(made)}
## Metrics

{_table(info.metrics)}
## Verification

- weights sha256: `{info.weights_sha256 or "not recorded"}` ({info.hash_algorithm})
- `{TRAJECTORY_NAME}` sha256: `{info.trajectory_sha256}`
- trajectory format: `{info.trajectory.get("format")}` version {info.trajectory.get("version")}
- generator provenance: {_provenance(provenance)}
- l2l version: {info.library_version}

Files: `{TRAJECTORY_NAME}` (the steps), `{RESULTS_NAME}` (the run's full results), `{CARD_NAME}`.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _provenance(provenance: dict[str, Any]) -> str:
    if not provenance:
        return (
            "not recorded by this trajectory format; replay on the device type the run used "
            "(torch's CPU and CUDA random streams differ)"
        )
    return _value(provenance)


def read_card(path: str | os.PathLike) -> FinetuneInfo:
    """The :class:`FinetuneInfo` in a fine-tune card's front matter."""
    from huggingface_hub.repocard import metadata_load

    path = Path(path)
    try:
        meta = metadata_load(path) or {}
    except Exception as err:  # yaml errors have no common public base class
        raise FinetuneFormatError(f"{path}: unreadable model card front matter ({err})") from err
    record = meta.get(CARD_KEY)
    if not isinstance(record, dict):
        raise FinetuneFormatError(
            f"{path} is not the card of an l2l fine-tune (no {CARD_KEY!r} in its front matter)"
        )
    return FinetuneInfo.from_dict(record, str(path))
