"""The scalar a ZO step of :class:`~l2l.integrations.hf_trainer.ZOTrainer` measures.

* ``lm``: the Trainer's own ``compute_loss`` (the model's loss on ``labels``, or the
  ``compute_loss_func`` given to the Trainer). Override ``compute_loss`` for any other loss.
* ``classification`` (MeZO's ``--train_as_classification``): cross-entropy over candidate
  scores ``s_k`` = mean log-probability of candidate ``k``'s label tokens, with ``C`` the
  example's correct candidates: ``L = mean_b -log(sum_{k in C} e^{s_k} / sum_k e^{s_k})``.
* ``accuracy`` (MeZO's ``--non_diff``): ``1 - accuracy`` of the argmax candidates; piecewise
  constant, which only a zeroth-order step can optimise.

A candidate batch has one row per (example, candidate): ``input_ids``, ``attention_mask`` and
``labels`` (``-100`` except on the candidate's tokens) of shape (N, T), plus
``candidate_slots`` (N,), the flat position ``b * K + k`` of row n on the (B, K) grid of examples
x candidate slots, and ``candidate_correct`` (B, K) bool (False in empty slots). The data
collator builds the two extra keys (with ``remove_unused_columns=True`` the Trainer drops dataset
columns the model's forward does not take, so build them in the collator). ``compute_loss``
returns the grid as the outputs' ``candidate_scores``: with ``label_names=["candidate_correct"]``
an evaluation hands ``compute_metrics`` the (grid, correct) pairs (see
:func:`candidate_accuracy`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("lm", "classification", "accuracy")
CANDIDATE_KEYS = ("candidate_slots", "candidate_correct")
IGNORE_INDEX = -100


def mean_label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, T, V) logits, (N, T) labels -> (N,) mean log-probability of each row's label tokens
    (position t predicts token t + 1, as the causal-LM loss does)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1))
    return (picked.squeeze(-1) * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def candidate_grid(scores: torch.Tensor, slots: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N,) row scores -> (B, K) grid, -inf in the empty slots."""
    grid = scores.new_full((shape[0] * shape[1],), float("-inf"))
    return grid.scatter(0, slots.to(scores.device), scores).view(shape)


def candidate_loss(grid: torch.Tensor, correct: torch.Tensor, objective: str) -> torch.Tensor:
    """The ``classification`` or ``accuracy`` loss of a (B, K) score grid."""
    correct = correct.to(grid.device).bool()
    if objective == "accuracy":  # argmax takes the first maximum
        return 1.0 - correct.gather(1, grid.argmax(-1, keepdim=True)).float().mean()
    gold = grid.masked_fill(~correct, float("-inf")).logsumexp(-1)  # (B,)
    return (grid.logsumexp(-1) - gold).mean()


def candidate_objective(
    model: nn.Module, inputs: dict, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the candidate rows of ``inputs``: the ``objective`` loss and the (B, K) grid of
    candidate scores."""
    missing = [k for k in (*CANDIDATE_KEYS, "labels") if k not in inputs]
    if missing:
        raise ValueError(
            f"zo_objective={objective!r} needs candidate batches, but this batch lacks "
            f"{', '.join(missing)}: build them in the data collator (see "
            "l2l.integrations.objectives), or use zo_objective='lm'"
        )
    inputs = dict(inputs)
    slots, correct = (inputs.pop(k) for k in CANDIDATE_KEYS)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits  # (N, T, V)
    grid = candidate_grid(mean_label_logprobs(logits, labels), slots, correct.shape)
    return candidate_loss(grid, correct, objective), grid


def candidate_accuracy(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for candidate batches evaluated with
    ``label_names=["candidate_correct"]``: the share of examples whose argmax is correct."""
    grid, correct = (np.asarray(x) for x in (eval_pred.predictions, eval_pred.label_ids))
    grid = grid[0] if grid.dtype == object else grid
    hits = np.take_along_axis(correct.astype(bool), grid.argmax(-1)[:, None], axis=1)
    return {"accuracy": float(hits.mean())}
