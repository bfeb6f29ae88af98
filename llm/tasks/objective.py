"""Training objectives: the scalar a training step minimises on a minibatch of examples.

* ``classification`` (MeZO's ``--train_as_classification``): cross-entropy over the candidates'
  scores ``s_k`` = mean log-probability of candidate ``k``'s tokens given the prompt, the very
  score evaluation argmaxes (:func:`llm.tasks.scoring.mean_logprobs`). With ``C`` the
  example's correct candidates (one, except ReCoRD's several gold entities)::

      L = mean over examples of  -log( sum_{k in C} exp(s_k) / sum_k exp(s_k) )

  All (example, candidate) sequences of the minibatch go through one forward pass (one row
  per example when every candidate is a single token).
* ``lm``: the mean token negative log-likelihood of the gold continuation
  (:func:`llm.tasks.scoring.loss_batch`); the only choice for generation tasks.
* ``accuracy`` (MeZO's ``--non_diff``): ``1 - accuracy`` of the argmax candidates, or for
  generation tasks ``1 - token F1`` of the greedy answers against their best reference. It is
  piecewise constant, so only zeroth-order steps can use it, not the meta-step's backward.
* ``auto``: the task's own default, :attr:`llm.tasks.Task.objective`: ``classification`` for
  classification tasks, ``lm`` for generation tasks and for COPA and ReCoRD, as MeZO's scripts
  train them.

:func:`objective_batch` tokenizes once (CPU tensors; ``.to(device)`` moves them) and
:func:`objective_loss` runs the forward, so a zeroth-order step evaluates one batch at
several parameter points without tokenizing again. ``batch.units`` is what the loss averages
over (answer tokens for ``lm``, examples otherwise): data-parallel shards weight their losses
by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm.tasks.base import Example, Task, TaskError
from llm.tasks.scoring import (
    IGNORE_INDEX,
    ScoreBatch,
    encode_candidates,
    generate_answers,
    loss_batch,
    mean_logprobs,
    token_f1,
)

OBJECTIVES = ("auto", "classification", "lm", "accuracy")
DIFFERENTIABLE = ("classification", "lm")


def resolve_objective(objective: str, tasks: Task | Sequence[Task]) -> str:
    """The objective to train ``tasks`` on: ``objective`` checked, ``auto`` replaced by the
    tasks' default (which must then be the same for all of them)."""
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if objective not in OBJECTIVES:
        raise TaskError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if objective == "auto":
        defaults = {t.name: t.objective for t in tasks}
        if len(set(defaults.values())) > 1:
            listed = ", ".join(f"{name} ({obj})" for name, obj in defaults.items())
            raise TaskError(
                f"the tasks train on different default objectives: {listed}; choose one for "
                "all of them with --objective classification or --objective lm"
            )
        return next(iter(defaults.values()), "lm")
    generation = [t.name for t in tasks if t.kind == "generation"]
    if objective == "classification" and generation:
        raise TaskError(
            f"--objective classification needs candidates, but {', '.join(generation)} "
            "is a generation task; use --objective lm (or accuracy) for it"
        )
    return objective


@dataclass
class LMBatch:
    """``input_ids``, ``attention_mask``, ``labels`` for the gold continuation's LM loss."""

    tensors: dict[str, torch.Tensor]
    objective: str = "lm"

    @property
    def units(self) -> int:
        """Answer tokens: the labels the model's (left-shifted) loss averages over."""
        return int((self.tensors["labels"][:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, **kwargs) -> LMBatch:
        return replace(self, tensors={k: v.to(device, **kwargs) for k, v in self.tensors.items()})

    def loss(self, model: PreTrainedModel) -> torch.Tensor:
        return model(**self.tensors).loss


@dataclass
class CandidateBatch:
    """Candidate scores laid out on a (B, K) grid of examples x candidate slots.

    ``slots[n]`` is the flat grid position ``b * K + k`` of candidate ``n`` (example ``b``'s
    ``k``-th candidate); ``correct`` marks the right candidates (False in empty slots).
    """

    scores: ScoreBatch
    slots: torch.Tensor  # (N,)
    correct: torch.Tensor  # (B, K) bool
    objective: str  # classification or accuracy

    @property
    def units(self) -> int:
        return self.correct.shape[0]

    def to(self, device: torch.device | str, **kwargs) -> CandidateBatch:
        return replace(
            self,
            scores=self.scores.to(device, **kwargs),
            slots=self.slots.to(device, **kwargs),
            correct=self.correct.to(device, **kwargs),
        )

    def grid(self, model: PreTrainedModel) -> torch.Tensor:
        """(B, K) candidate scores, -inf in the slots of examples with fewer candidates."""
        flat = mean_logprobs(model, self.scores)
        empty = flat.new_full((self.correct.numel(),), float("-inf"))
        return empty.scatter(0, self.slots.to(flat.device), flat).view(self.correct.shape)

    def loss(self, model: PreTrainedModel) -> torch.Tensor:
        grid = self.grid(model)
        correct = self.correct.to(grid.device)
        if self.objective == "accuracy":  # argmax takes the first maximum, as evaluate does
            hits = correct.gather(1, grid.argmax(-1, keepdim=True))
            return 1.0 - hits.float().mean()
        gold = grid.masked_fill(~correct, float("-inf")).logsumexp(-1)  # (B,)
        return (grid.logsumexp(-1) - gold).mean()


@dataclass
class AnswerBatch:
    """Generation prompts with their references, for the ``accuracy`` (1 - F1) objective."""

    examples: list[Example]
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    max_new_tokens: int = 32
    objective: str = "accuracy"

    @property
    def units(self) -> int:
        return len(self.examples)

    def to(self, device: torch.device | str, **kwargs) -> AnswerBatch:
        return self  # prompts are tokenized when the answers are generated

    def loss(self, model: PreTrainedModel) -> torch.Tensor:
        prompts = [e.prompt for e in self.examples]
        answers = generate_answers(
            model, self.tokenizer, prompts, self.max_new_tokens, self.max_length
        )
        pairs = zip(answers, self.examples, strict=True)
        f1 = [max(token_f1(a, r) for r in e.references) for a, e in pairs]
        return torch.tensor(1.0 - sum(f1) / len(f1))


ObjectiveBatch = LMBatch | CandidateBatch | AnswerBatch


def _candidate_batch(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, objective: str, max_length
) -> CandidateBatch:
    width = max(len(e.candidates) for e in examples)
    slots = [b * width + k for b, e in enumerate(examples) for k in range(len(e.candidates))]
    correct = torch.zeros(len(examples), width, dtype=torch.bool)
    for b, e in enumerate(examples):
        correct[b, e.correct] = True
    scores = encode_candidates(tokenizer, examples, max_length)
    return CandidateBatch(scores, torch.tensor(slots), correct, objective)


def objective_batch(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    objective: str,
    max_length: int,
    max_new_tokens: int = 32,
) -> ObjectiveBatch:
    """The training batch of ``examples`` (one kind) for a resolved ``objective``
    (``classification``, ``lm`` or ``accuracy``; see :func:`resolve_objective`)."""
    if not examples:
        raise TaskError("a training batch needs at least one example")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1 and objective != "lm":
        raise TaskError(f"--objective {objective} got a mix of classification and generation")
    if objective == "lm":
        return LMBatch(loss_batch(examples, tokenizer, max_length))
    if objective not in OBJECTIVES[1:]:
        raise TaskError(
            f"objective {objective!r} is not resolved; use one of {', '.join(OBJECTIVES[1:])} "
            "(resolve_objective turns 'auto' into one)"
        )
    if kinds == {"generation"}:
        if objective == "classification":
            raise TaskError("--objective classification needs examples with candidates")
        return AnswerBatch(list(examples), tokenizer, max_length, max_new_tokens)
    return _candidate_batch(examples, tokenizer, objective, max_length)


def objective_loss(model: PreTrainedModel, batch: ObjectiveBatch) -> torch.Tensor:
    """The batch's loss (a scalar tensor): differentiable for ``classification`` and ``lm``.

    Call it under ``torch.no_grad()`` for zeroth-order steps and with autograd for the
    meta-step; the model's dropout mode is left as it is.
    """
    return batch.loss(model)
