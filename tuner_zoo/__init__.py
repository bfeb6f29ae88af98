"""The tuner zoo: named learned ZO tuners, where they live and how to get them.

``resolve_tuner(spec)`` turns a folder, a local-zoo or bundled name, a registry name or a Hub
repo id into a folder holding ``config.json`` + ``model.safetensors`` + ``README.md``; load it
with ``l2l.tuner.Tuner.from_pretrained(folder)``.
"""

from l2l.tuner import TunerNotFoundError
from tuner_zoo.registry import ZooEntry, entries_for_model, get_entry, load_registry
from tuner_zoo.resolve import (
    BUNDLED_DIR,
    Location,
    is_cached,
    locate,
    register_local,
    resolve_tuner,
    zoo_dir,
)

__all__ = [
    "BUNDLED_DIR",
    "Location",
    "TunerNotFoundError",
    "ZooEntry",
    "entries_for_model",
    "get_entry",
    "is_cached",
    "load_registry",
    "locate",
    "register_local",
    "resolve_tuner",
    "zoo_dir",
]
