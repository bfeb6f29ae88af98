"""Turn a tuner spec (folder, name or Hub repo id) into a folder holding the tuner files.

Resolution order of :func:`resolve_tuner`:

1. an existing local folder;
2. a name in the user's local zoo (``$L2L_HOME/zoo/<name>/``, else ``~/.cache/l2l/zoo/<name>/``),
   filled by :func:`register_local`;
3. a tuner bundled with the package (``tuner_zoo/bundled/<name>/``);
4. a registry name with status ``available``, or any ``owner/name`` repo id: fetched from the
   Hub into the HF cache (``snapshot_download``) and reused from there offline.

A base model id listed in the registry resolves like the registry name of its tuner.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from l2l.tuner import (
    ARTIFACT_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Tuner,
    TunerNotFoundError,
    atomic_directory,
    fetch_tuner_snapshot,
)
from tuner_zoo.registry import (
    ZooEntry,
    close_names,
    entries_for_model,
    get_entry,
    l2l_home,
    load_registry,
)

BUNDLED_DIR = Path(__file__).parent / "bundled"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#: What the zoo's commands add to l2l's library-level messages.
TRAIN_HINT = "train one with `pretrain-tuner --model <model id> --output <dir>`"
CLI_HINT = (
    "With the commands: `tuner-zoo list` shows the known tuners, `tuner-zoo download "
    "{repo_id}` caches one while online, and " + TRAIN_HINT
)


def zoo_dir() -> Path:
    """The user's local zoo: ``$L2L_HOME/zoo`` or ``~/.cache/l2l/zoo``."""
    return l2l_home() / "zoo"


def is_tuner_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _names_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if is_tuner_folder(p))


def local_names() -> list[str]:
    """Names registered in the local zoo."""
    return _names_in(zoo_dir())


def bundled_names() -> list[str]:
    """Names of the tuners present in the bundled folder of this installation."""
    return _names_in(BUNDLED_DIR)


def known_names() -> list[str]:
    return sorted(set(load_registry()) | set(local_names()) | set(bundled_names()))


def is_cached(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> bool:
    """True if the tuner files of ``repo_id`` are in the HF cache (no network)."""
    return all(
        isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision), str)
        for f in (CONFIG_NAME, WEIGHTS_NAME)
    )


@dataclass(frozen=True)
class Location:
    """Where a named tuner is available without network: ``kind`` and its folder, if any."""

    kind: str  # "local zoo", "bundled", "hf cache", "hub", "nowhere"
    path: Path | None = None


def locate(name: str) -> Location:
    """Where ``name`` resolves without touching the network."""
    folder = _local_folder(name)
    if folder is not None:
        return Location("bundled" if folder.parent == BUNDLED_DIR else "local zoo", folder)
    entry = get_entry(name)
    if entry is not None and entry.on_hub:
        if is_cached(entry.repo_id):
            return Location("hf cache")
        return Location("hub")
    return Location("nowhere")


def _unavailable(entry: ZooEntry) -> TunerNotFoundError:
    model = entry.base_model
    train = f"train one with `pretrain-tuner --model {model} --output <dir>`"
    if entry.status == "importable":
        how = (
            f"it is released as a pickled .pth ({entry.release_file}), not on the Hub: convert it "
            f"with `tuner-zoo import-pth <file> --base-model {model} --output <dir>` and then "
            f"`tuner-zoo register {entry.name} <dir>`; or {train}"
        )
    elif entry.status == "bundled":
        how = f"this installation has no bundled tuner at {BUNDLED_DIR / entry.name}: {train}"
    else:
        how = f"its status is {entry.status!r}: {train}"
    return TunerNotFoundError(f"tuner {entry.name!r} (for {model}) is not available: {how}")


def unknown_tuner_error(spec: str) -> TunerNotFoundError:
    close = close_names(spec, known_names())
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return TunerNotFoundError(
        f"no tuner called {spec!r}: it is not a folder, a name in the local zoo ({zoo_dir()}), "
        f"a bundled tuner or a registry name, nor an 'owner/name' Hub repo id.{hint} "
        f"See `tuner-zoo list`, or {TRAIN_HINT} and `tuner-zoo register NAME <dir>`."
    )


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return constants.is_offline_mode() or env


def resolve_tuner(
    spec: str | Path,
    *,
    offline: bool | None = None,
    revision: str | None = None,
    force_download: bool = False,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """Folder containing the tuner files for ``spec`` (see the module docstring for the order).

    ``offline=None`` follows ``HF_HUB_OFFLINE``. Raises :class:`TunerNotFoundError` naming close
    names and how to train a tuner when nothing matches or the Hub cannot be reached.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not is_tuner_folder(path):
            raise TunerNotFoundError(
                f"{path} is a folder but not a tuner: it must hold {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return path
    if (folder := _local_folder(spec)) is not None:
        return folder
    entry = get_entry(spec) or next(iter(entries_for_model(spec)), None)
    if entry is not None and (folder := _local_folder(entry.name)) is not None:
        return folder  # ``spec`` was the base model id of a locally available tuner
    if entry is not None and not entry.on_hub:
        raise _unavailable(entry)
    repo_id = entry.repo_id if entry is not None else spec
    if "/" not in repo_id:
        raise unknown_tuner_error(spec)
    try:
        return fetch_tuner_snapshot(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=_offline(offline),
            token=token,
        )
    except TunerNotFoundError as err:  # l2l's message names the library calls; add the commands
        raise TunerNotFoundError(f"{err}. {CLI_HINT.format(repo_id=repo_id)}") from err


def zoo_name(name: str | None, folder: Path) -> str | None:
    """The local-zoo name a trained tuner registers under: ``name``, else the folder's name;
    None for ``"none"`` (do not register)."""
    name = name or Path(folder).name
    return None if name.lower() == "none" else name


def _local_folder(name: str) -> Path | None:
    """The local-zoo folder of ``name``, else its bundled folder, else ``None``."""
    if not _NAME.match(name):
        return None
    return next((f for f in (zoo_dir() / name, BUNDLED_DIR / name) if is_tuner_folder(f)), None)


def register_local(
    name: str, folder: str | Path, *, link: bool = False, overwrite: bool = False
) -> Path:
    """Make the tuner in ``folder`` resolvable as ``name`` (copied, or symlinked with ``link``).

    The folder is fully validated (config and weights) before anything is written.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"zoo name {name!r} is invalid: use letters, digits, '.', '_' and '-' (e.g. 'my-tuner')"
        )
    source = Path(folder).expanduser().resolve()
    Tuner.load_folder(source)  # raises TunerFormatError naming the bad file
    target = zoo_dir() / name
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{target} already exists: pass overwrite=True to replace it")
        _remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(source, target_is_directory=True)
        return target
    with atomic_directory(target) as staged:
        for file in ARTIFACT_FILES:
            if (source / file).is_file():
                shutil.copy2(source / file, staged / file)
    return target


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
