"""Push a fine-tune to the Hub as kilobytes, and rebuild + verify its weights from there.

A fine-tune folder (``finetune``'s output, a ZOTrainer output, or a pulled repo) holds
``trajectory.json`` and ``results.json``; a pushed repo adds the model card ``README.md`` whose
front matter records the base model and the sha256 of the weights the trajectory rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from l2l.finetuned.card import read_card, render_card
from l2l.finetuned.info import (
    CARD_NAME,
    FINETUNE_FILES,
    RESULTS_NAME,
    TRAJECTORY_NAME,
    FinetuneFormatError,
    FinetuneInfo,
    WeightsMismatchError,
    file_sha256,
    trajectory_header,
    weights_sha256,
)
from l2l.trajectory import Trajectory, replay


class FinetuneNotFoundError(FileNotFoundError):
    """Neither a local fine-tune folder nor a Hub repo that could be fetched."""


def _steps(trajectory: Trajectory) -> int:
    return trajectory.records[-1].step + 1 if trajectory.records else 0


def finetune_info(
    folder: str | os.PathLike, *, task: str | None = None, weights_sha256: str | None = None
) -> FinetuneInfo:
    """The record of the fine-tune in ``folder``: from its card when it has one (a pushed repo),
    else built from ``results.json`` and ``trajectory.json`` (a local run's output)."""
    folder = Path(folder)
    trajectory_path = folder / TRAJECTORY_NAME
    if not trajectory_path.is_file():
        raise FinetuneFormatError(f"{folder} holds no {TRAJECTORY_NAME}: it is not a fine-tune")
    if (folder / CARD_NAME).is_file():
        try:
            return read_card(folder / CARD_NAME)
        except FinetuneFormatError:
            if not (folder / RESULTS_NAME).is_file():
                raise
    results_path = folder / RESULTS_NAME
    if not results_path.is_file():
        raise FinetuneFormatError(
            f"{folder} holds {TRAJECTORY_NAME} but neither a fine-tune card ({CARD_NAME}) nor "
            f"{RESULTS_NAME}: the base model it was recorded on is unknown"
        )
    results = json.loads(results_path.read_text())
    return FinetuneInfo.from_results(
        results,
        trajectory_header(trajectory_path),
        steps=_steps(Trajectory.load(trajectory_path)),
        trajectory_sha256=file_sha256(trajectory_path),
        weights_sha256=weights_sha256,
        task=task,
    )


def _stage(source: Any, results: Mapping[str, Any] | None, staged: Path) -> dict[str, Any]:
    """Copy (or write) the trajectory and results of ``source`` into ``staged``."""
    if isinstance(source, Trajectory):
        if results is None:
            raise ValueError(
                "push_finetuned(trajectory, ...) needs results=: at least the base model "
                "({'model': '<hub id>', 'dtype': 'float32', ...})"
            )
        source.save(staged / TRAJECTORY_NAME)
    else:
        folder = Path(source)
        if not (folder / TRAJECTORY_NAME).is_file():
            raise FinetuneFormatError(f"{folder} holds no {TRAJECTORY_NAME}: nothing to push")
        shutil.copyfile(folder / TRAJECTORY_NAME, staged / TRAJECTORY_NAME)
        if results is None:
            if not (folder / RESULTS_NAME).is_file():
                raise FinetuneFormatError(f"{folder} holds no {RESULTS_NAME}: nothing to push")
            results = json.loads((folder / RESULTS_NAME).read_text())
    return dict(results)


def push_finetuned(
    source: str | os.PathLike | Trajectory,
    repo_id: str,
    *,
    results: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
    weights_sha256: str | None = None,
    task: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a fine-tune as ``trajectory.json`` + ``results.json`` + a model card; returns the
    commit URL.

    ``source`` is a run's output folder, or a :class:`Trajectory` with ``results`` (a mapping
    naming at least ``model``, the base model id). The card records the sha256 of the weights the
    trajectory rebuilds: ``weights_sha256`` (e.g. of the model the run ended with), else the one
    in ``results.json``, else computed by replaying onto ``model`` (the base model at its initial
    weights). When ``model`` is given the replay is also checked against a recorded hash, and a
    mismatch refuses the push.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    with tempfile.TemporaryDirectory(prefix="l2l-push-") as tmp:
        staged = Path(tmp)
        results = _stage(source, results, staged)
        trajectory_path = staged / TRAJECTORY_NAME
        trajectory = Trajectory.load(trajectory_path)
        info = FinetuneInfo.from_results(
            results,
            trajectory_header(trajectory_path),
            steps=_steps(trajectory),
            trajectory_sha256=file_sha256(trajectory_path),
            weights_sha256=weights_sha256,
            task=task,
        )
        if model is not None:
            digest = _replayed_sha256(model, trajectory, info)
            info.weights_sha256 = info.weights_sha256 or digest
        if info.weights_sha256 is None:
            raise FinetuneFormatError(
                "no hash of the fine-tuned weights to record: pass weights_sha256= (e.g. "
                "l2l.finetuned.weights_sha256(model) of the model the run ended with) or "
                "model= (the base model at its initial weights, replayed to compute it)"
            )
        results["weights_sha256"] = info.weights_sha256
        files = {
            TRAJECTORY_NAME: trajectory_path.read_bytes(),
            RESULTS_NAME: json.dumps(results, indent=1).encode(),
            CARD_NAME: render_card(info).encode(),
        }
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(name, content) for name, content in files.items()]
    message = (
        commit_message or f"l2l fine-tune: {info.steps} {info.method} steps on {info.base_model}"
    )
    commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return commit.commit_url


def fetch_finetuned(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """The folder holding the fine-tune: ``source`` itself when it is a local folder, else the
    Hub snapshot of repo ``source`` at ``revision`` (only the fine-tune's files)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith(("/", ".", "~")):
        raise FinetuneNotFoundError(
            f"{source} is not a fine-tune folder (a folder holding {TRAJECTORY_NAME})"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        folder = snapshot_download(
            str(source),
            revision=revision,
            allow_patterns=list(FINETUNE_FILES),
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FinetuneNotFoundError(
            f"fine-tune {str(source)!r} is not a local folder and could not be fetched from the "
            f"Hub ({type(err).__name__}: {first}); check the path or repo id, HF_ENDPOINT and "
            "your token"
        ) from err
    return Path(folder)


def _describe_base(info: FinetuneInfo) -> str:
    revision = f"@{info.base_model_revision}" if info.base_model_revision else ""
    return f"{info.base_model}{revision} ({info.dtype or 'dtype not recorded'})"


def _replayed_sha256(model: nn.Module, trajectory: Trajectory, info: FinetuneInfo) -> str:
    """Replay ``trajectory`` onto ``model`` in place; the weights' sha256, checked against
    ``info.weights_sha256`` when that is recorded."""
    try:
        replay(model, trajectory)
    except ValueError as err:
        raise FinetuneFormatError(
            f"cannot replay this fine-tune onto the given model: {err}. It needs the base "
            f"model {_describe_base(info)} at its initial weights"
        ) from err
    digest = weights_sha256(model)
    if info.weights_sha256 is not None and digest != info.weights_sha256:
        provenance = {k: v for k, v in info.trajectory.items() if k not in ("hparams", "method")}
        raise WeightsMismatchError(
            f"the replayed weights do not match the fine-tune: sha256 {digest[:16]}... != "
            f"recorded {info.weights_sha256[:16]}.... Replay needs the base model "
            f"{_describe_base(info)} at its initial weights, on the device type the run used "
            f"(trajectory {json.dumps(provenance, sort_keys=True)}); the model now holds "
            "unverified weights: discard it"
        )
    return digest


def load_finetuned(
    source: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    revision: str | None = None,
    verify: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> nn.Module:
    """Rebuild a fine-tune's weights: replay its trajectory onto the base model and check them
    against the recorded sha256 (:class:`WeightsMismatchError` on a mismatch).

    ``source`` is a local folder or a Hub repo id (at ``revision``). ``model`` is the base model
    at its initial weights, modified in place and returned; without it the recorded base model
    is loaded with transformers (``AutoModelForCausalLM``, recorded revision and dtype).
    ``verify=False`` skips the hash check (for a run that recorded none).
    """
    folder = fetch_finetuned(
        source,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    info = finetune_info(folder)
    if verify and info.weights_sha256 is None:
        raise FinetuneFormatError(
            f"{source}: no hash of the fine-tuned weights is recorded, so the replay cannot be "
            "verified; pass verify=False to rebuild them unchecked"
        )
    actual = file_sha256(folder / TRAJECTORY_NAME)
    if actual != info.trajectory_sha256:
        raise FinetuneFormatError(
            f"{folder / TRAJECTORY_NAME} is not the trajectory its card records (sha256 "
            f"{actual[:16]}... != {info.trajectory_sha256[:16]}...): the files were edited "
            "after the push"
        )
    if model is None:
        model = _load_base(info)
    trajectory = Trajectory.load(folder / TRAJECTORY_NAME)
    if not verify:
        info.weights_sha256 = None
    _replayed_sha256(model, trajectory, info)
    return model


def _load_base(info: FinetuneInfo) -> nn.Module:
    if info.peft:
        raise FinetuneFormatError(
            f"this fine-tune trained {info.peft} adapters: pass model=, the base model wrapped "
            "with the same adapter config and initial adapter weights (same seed)"
        )
    from l2l.integrations.models import load_base_model

    return load_base_model(info.base_model, revision=info.base_model_revision, dtype=info.dtype)
