"""Publishing a tuner folder to the Hugging Face Hub."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from l2l.tuner import ARTIFACT_FILES, CARD_NAME, Tuner, render_model_card


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Validate the tuner in ``folder`` and upload its files to ``repo_id``; returns the commit URL.

    The token comes from ``token`` or huggingface_hub's usual places (``HF_TOKEN``, ``hf auth
    login``); it is never printed. A folder without ``README.md`` gets one rendered from its config.
    """
    folder = Path(folder)
    tuner = Tuner.load_folder(folder)  # raises TunerFormatError naming the bad file
    try:
        return _upload(folder, tuner, repo_id, private, branch, commit_message, token)
    except _hub_errors() as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(
            f"could not push {folder} to {repo_id} on {constants.ENDPOINT}: {reason}; check the "
            "network, HF_ENDPOINT and your token (HF_TOKEN or hf auth login)"
        ) from None


class PushError(OSError):
    """The Hub could not be reached, or refused the upload."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for a network failure or a refused request: its HTTP error,
    OSError, and its HTTP library's transport errors (``httpx`` or ``httpx2``)."""
    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _upload(folder, tuner, repo_id, private, branch, commit_message, token) -> str:
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    message = commit_message or f"Upload l2l tuner for {tuner.config.base_model}"
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging)
        for name in ARTIFACT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staged / name)
        if not (staged / CARD_NAME).is_file():
            (staged / CARD_NAME).write_text(render_model_card(tuner.config), encoding="utf-8")
        info = api.upload_folder(
            folder_path=staged, repo_id=repo.repo_id, revision=branch, commit_message=message
        )
    return str(info.commit_url)
