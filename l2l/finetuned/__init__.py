"""A fine-tune shared as kilobytes: its trajectory, its results and a model card.

``push_finetuned(folder, repo_id)`` uploads ``trajectory.json``, ``results.json`` and a card that
records the base model (id, revision, dtype), the method, tuner, task and objective, the
metrics, the trajectory's generator provenance and the sha256 of the weights it rebuilds.
``load_finetuned(repo_or_folder, model=base)`` replays the trajectory onto the base model and
refuses weights whose hash differs from the recorded one.
"""

from l2l.finetuned.card import read_card, render_card
from l2l.finetuned.hub import (
    FinetuneNotFoundError,
    fetch_finetuned,
    finetune_info,
    load_finetuned,
    push_finetuned,
)
from l2l.finetuned.info import (
    CARD_NAME,
    FINETUNE_FILES,
    RESULTS_NAME,
    TRAJECTORY_NAME,
    FinetuneFormatError,
    FinetuneInfo,
    WeightsMismatchError,
    weights_sha256,
)

__all__ = [
    "CARD_NAME",
    "FINETUNE_FILES",
    "RESULTS_NAME",
    "TRAJECTORY_NAME",
    "FinetuneFormatError",
    "FinetuneInfo",
    "FinetuneNotFoundError",
    "WeightsMismatchError",
    "fetch_finetuned",
    "finetune_info",
    "load_finetuned",
    "push_finetuned",
    "read_card",
    "render_card",
    "weights_sha256",
]
