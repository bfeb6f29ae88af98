"""Task data structures and the sampling rules shared by every task source.

Continuations are appended verbatim to the prompt, so templates put the separating space at the
start of the continuation (``" great"``), which keeps BPE tokenisation of ``prompt`` followed
by ``continuation`` the same as tokenising them one after the other.

Every task also names its training objective (``Task.objective``: what ``--objective auto``
means for it, see :mod:`llm.tasks.objective`) and the token length its examples need
(``Task.max_length``: :data:`DEFAULT_MAX_LENGTH`, or :data:`LONG_MAX_LENGTH` for long passages).

Sampling (MeZO: 1000 train / 500 dev / 1000 test per task):

* train and dev are drawn with ``seed`` from one training pool, so different seeds see
  different training data;
* test is drawn with the fixed :data:`TEST_SEED` whatever ``seed`` is, so every run of a task is
  scored on the same examples and differences between runs come from training only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Kind = Literal["classification", "generation"]
Objective = Literal["classification", "lm", "accuracy"]
SPLITS = ("train", "dev", "test")
TEST_SEED = 0
ANSWER_END = "\n"  # generation targets end with a newline; decoding stops there
DEFAULT_MAX_LENGTH = 256  # tokens per sequence: room for a sentence or a short passage
LONG_MAX_LENGTH = 2048  # MeZO's max length, for the long-passage tasks
T = TypeVar("T")


class TaskError(ValueError):
    """A task name, file or row that cannot be used; the message says what to do."""


@dataclass
class Example:
    """One prompt with either candidate continuations (classification) or a target answer.

    Classification: ``candidates`` are the continuations, ``answer`` the gold index (the target
    of the ``lm`` objective) and ``references`` the candidates that count as correct (defaults
    to the gold candidate; ReCoRD accepts every entity that is a gold answer).
    Generation: ``candidates`` is None, ``answer`` the target continuation used for training
    and ``references`` every acceptable answer for the metric (defaults to ``[answer]``).
    """

    prompt: str
    candidates: list[str] | None
    answer: str | int
    references: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.candidates is not None:
            if not self.candidates or not isinstance(self.answer, int):
                raise TaskError(
                    f"a classification example needs candidates and an int answer, got "
                    f"candidates={self.candidates!r} answer={self.answer!r}"
                )
            if not 0 <= self.answer < len(self.candidates):
                raise TaskError(
                    f"answer index {self.answer} is out of range for {len(self.candidates)} "
                    f"candidates {self.candidates!r}"
                )
            self.references = self.references or [self.candidates[self.answer]]
            stray = [r for r in self.references if r not in self.candidates]
            if stray or self.candidates[self.answer] not in self.references:
                raise TaskError(
                    f"the references {self.references!r} of a classification example must be "
                    f"candidates and include the gold one {self.candidates[self.answer]!r}; "
                    f"the candidates are {self.candidates!r}"
                )
        elif not isinstance(self.answer, str):
            raise TaskError(f"a generation example needs a str answer, got {self.answer!r}")
        elif not self.references:
            self.references = [self.answer]

    @property
    def kind(self) -> Kind:
        return "generation" if self.candidates is None else "classification"

    @property
    def correct(self) -> list[int]:
        """Classification: the indices of the candidates that count as a right prediction."""
        return [i for i, c in enumerate(self.candidates or []) if c in self.references]

    @property
    def target(self) -> str:
        """The gold continuation: the gold candidate, or the answer text."""
        if self.candidates is None:
            return str(self.answer)
        return self.candidates[int(self.answer)]


@dataclass
class Task:
    """A named task with its three splits; ``metric`` is a key of ``evaluate()``'s result.

    ``objective`` is the training objective ``auto`` picks for the task (the default:
    ``classification`` for classification tasks, ``lm`` for generation tasks); ``max_length``
    the sequence length (tokens) its examples need, which a run uses unless told otherwise.
    """

    name: str
    kind: Kind
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    metric: str
    description: str = ""
    objective: Objective | None = None
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = "classification" if self.kind == "classification" else "lm"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in SPLITS)
        return f"Task({self.name!r}, {self.kind}, {sizes}, metric={self.metric!r})"

    def split(self, name: str) -> list[Example]:
        """``train``, ``dev`` (alias ``validation``) or ``test``."""
        name = "dev" if name == "validation" else name
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, name)


def check_sizes(n_train: int, n_dev: int, n_test: int) -> None:
    for key, value in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if value < 0:
            raise TaskError(f"{key} must be >= 0, got {value}")


def subsample(items: Sequence[T], n: int, rng: random.Random) -> list[T]:
    """``n`` items drawn without replacement (all of them, shuffled, if there are fewer)."""
    return rng.sample(list(items), min(n, len(items)))


def train_dev_from_pool(
    pool: Sequence[T], n_train: int, n_dev: int, seed: int, small_dev: int | None = None
) -> tuple[list[T], list[T]]:
    """MeZO's rule: draw train and dev, disjoint, from one pool with ``seed``.

    When the pool is smaller than ``n_train + n_dev`` (CB has 250 training rows, COPA 400),
    dev gets ``min(n_dev, small_dev)`` examples (``small_dev`` defaults to ``len(pool) // 4``;
    MeZO's scripts use 100 for CB and COPA) and train the rest (at most ``n_train``).
    """
    items = subsample(pool, n_train + n_dev, random.Random(f"{seed}:train"))
    if len(items) < n_train + n_dev:
        n_dev = min(n_dev, len(items) // 4 if small_dev is None else small_dev)
    return items[n_dev : n_dev + n_train], items[:n_dev]


def draw_test(pool: Sequence[T], n_test: int) -> list[T]:
    """The test subset: drawn with :data:`TEST_SEED`, independent of the run's seed."""
    return subsample(pool, n_test, random.Random(f"{TEST_SEED}:test"))


def with_space(text: str) -> str:
    """``text`` with one leading space unless it already starts with whitespace."""
    return text if text[:1].isspace() else " " + text
