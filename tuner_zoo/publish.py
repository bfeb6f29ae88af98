"""Publishing a tuner folder to the Hugging Face Hub."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

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
