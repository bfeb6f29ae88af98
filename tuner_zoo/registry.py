"""The registry of named tuners (``registry.json``): where each lives and what it is for.

The package's ``registry.json`` can be extended (or entries overridden) by a user registry at
``$L2L_HOME/registry.json`` (default ``~/.cache/l2l/registry.json``) with the same layout, e.g. to
list an organisation's own published tuners.

Statuses are honest: ``available`` (on the Hub at ``repo_id``), ``bundled`` (ships in the
package), ``importable`` (the ZO Fine-tuner authors' .pth release, not on the Hub: convert it
with ``tuner-zoo import-pth``) and ``planned: not trained yet`` (``repo_id`` is only the name it
will get).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from l2l.io import l2l_home

REGISTRY_FILE = "registry.json"
STATUSES = ("available", "bundled", "importable", "planned: not trained yet")


@dataclass(frozen=True)
class ZooEntry:
    """One named tuner of the registry."""

    name: str
    base_models: list[str]
    architecture: str
    source: str
    status: str
    repo_id: str | None = None
    method_defaults: dict[str, float] = field(default_factory=dict)
    release_file: str | None = None
    num_blocks: int | None = None
    notes: str = ""

    @property
    def base_model(self) -> str:
        """The model the tuner was meta-trained on (the first of ``base_models``)."""
        return self.base_models[0]

    @property
    def on_hub(self) -> bool:
        return self.status == "available" and self.repo_id is not None


def _entry(name: str, data: dict[str, Any]) -> ZooEntry:
    try:
        entry = ZooEntry(name=name, **data)
    except TypeError as err:
        raise ValueError(f"{REGISTRY_FILE}: tuner {name!r}: {err}") from err
    if entry.status not in STATUSES:
        raise ValueError(
            f"{REGISTRY_FILE}: tuner {name!r} has status {entry.status!r}, expected one of {STATUSES}"
        )
    if not entry.base_models:
        raise ValueError(f"{REGISTRY_FILE}: tuner {name!r} lists no base_models")
    return entry


def _read(text: str, source: str) -> dict[str, ZooEntry]:
    try:
        tuners = json.loads(text)["tuners"]
        return {name: _entry(name, fields) for name, fields in tuners.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{source}: not a tuner registry ({type(err).__name__}: {err}); expected "
            '{"tuners": {"<name>": {"base_models": [...], "architecture": ..., "source": ..., '
            '"status": ...}}}'
        ) from err


def load_registry() -> dict[str, ZooEntry]:
    """All entries by name: the package's registry updated with the user's, if any."""
    package = resources.files("tuner_zoo").joinpath(REGISTRY_FILE)
    entries = _read(package.read_text(encoding="utf-8"), f"tuner_zoo/{REGISTRY_FILE}")
    user = l2l_home() / REGISTRY_FILE
    if user.is_file():
        entries.update(_read(user.read_text(encoding="utf-8"), str(user)))
    return entries


def get_entry(name: str) -> ZooEntry | None:
    """The entry called ``name`` (case-insensitive), or ``None``."""
    registry = load_registry()
    return registry.get(name) or registry.get(name.lower())


def entries_for_model(model_id: str) -> list[ZooEntry]:
    """Entries whose tuner was trained for ``model_id`` or one of its listed derived checkpoints."""
    return [e for e in load_registry().values() if model_id in e.base_models]


def close_names(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` names of ``candidates`` that look like ``name`` (difflib)."""
    lowered = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[m] for m in matches]
