"""Fetching a tuner folder from the Hugging Face Hub or its local cache.

``config.json`` is fetched first and validated, and only then the rest of the snapshot at the
same commit: a repo id that is not a tuner (e.g. the base model itself) fails on a small file
instead of downloading gigabytes of LLM weights. Offline (``HF_HUB_OFFLINE=1`` or
``local_files_only=True``) the cached snapshot is used.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

from l2l.tuner.config import (
    ARTIFACT_FILES,
    CONFIG_NAME,
    TRAIN_HINT,
    TunerConfig,
    TunerFormatError,
    TunerNotFoundError,
)

_HUB_ERRORS = (HfHubHTTPError, EntryNotFoundError, HFValidationError, OSError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _not_found(repo_id: str, err: BaseException, offline: bool) -> TunerNotFoundError:
    if offline:
        how = (
            "offline mode is on and it is not in the HF cache "
            f"({constants.HF_HUB_CACHE}): download it once while online "
            f"(Tuner.from_pretrained({repo_id!r}) with HF_HUB_OFFLINE unset)"
        )
    else:
        how = "check the repo id, your connection and HF_ENDPOINT, and your token for private repos"
    return TunerNotFoundError(
        f"tuner {repo_id!r} is not a local folder and could not be fetched from the Hub "
        f"({_first_line(err)}): {how}; or {TRAIN_HINT}"
    )


def fetch_tuner_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Folder (in the HF cache) holding the tuner files of ``repo_id`` at ``revision``."""
    offline = local_files_only or constants.is_offline_mode()
    common = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    try:
        config_path = Path(
            hf_hub_download(
                repo_id, CONFIG_NAME, revision=revision, force_download=force_download, **common
            )
        )
    except _HUB_ERRORS as err:
        raise _not_found(repo_id, err, offline) from err
    try:
        TunerConfig.load(config_path)
    except TunerFormatError as err:
        raise TunerNotFoundError(
            f"Hub repo {repo_id!r} is not an l2l tuner: {err}. If it is a base model, pass the "
            f"id of a tuner repo for it, or {TRAIN_HINT}"
        ) from err
    commit = config_path.parent.name  # snapshots/<commit>/config.json: same commit for all files
    try:
        folder = snapshot_download(
            repo_id,
            revision=commit,
            allow_patterns=list(ARTIFACT_FILES),
            force_download=force_download,
            **common,
        )
    except _HUB_ERRORS as err:
        raise _not_found(repo_id, err, offline) from err
    return Path(folder)
