"""The task registry shared by ``finetune`` and the tuner meta-training.

``load_task(name_or_path)`` accepts

* an offline sentiment task: ``movie-reviews``, ``tweets``, ``amazon-reviews``,
  ``nyt-editorials`` (Hutto & Gilbert 2014 data from PyPI, see :mod:`llm.tasks.sentiment`);
* a MeZO-suite task read from the Hugging Face Hub: ``sst2``, ``rte``, ``cb``, ``boolq``,
  ``wsc``, ``wic``, ``multirc``, ``copa``, ``record``, ``squad``, ``drop``
  (see :mod:`llm.tasks.mezo_suite`);
* a local ``.jsonl`` / ``.csv`` file (see :mod:`llm.tasks.local`).

Names ignore case, ``-`` and ``_`` (``SST-2`` is ``sst2``). A task has train/dev/test lists of
:class:`Example`; :func:`objective_batch` turns examples into a training batch for an objective
(:mod:`llm.tasks.objective`; :func:`resolve_objective` picks a task's default for ``auto``),
:func:`objective_loss` computes its loss, and :func:`evaluate` scores a model on examples
(``evaluate(...)[task.metric]``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path

from llm.tasks.base import (
    ANSWER_END,
    DEFAULT_MAX_LENGTH,
    LONG_MAX_LENGTH,
    Example,
    Kind,
    Task,
    TaskError,
)
from llm.tasks.local import LOCAL_SUFFIXES, load_local_task
from llm.tasks.mezo_suite import MEZO_TASKS, load_hub_task
from llm.tasks.objective import (
    OBJECTIVES,
    ObjectiveBatch,
    objective_batch,
    objective_loss,
    resolve_objective,
)
from llm.tasks.scoring import (
    candidate_scores,
    evaluate,
    exact_match,
    example_scores,
    generate_answers,
    loss_batch,
    normalize_answer,
    token_f1,
)
from llm.tasks.sentiment import SENTIMENT_TASKS, load_sentiment_task

__all__ = [
    "ANSWER_END",
    "DEFAULT_MAX_LENGTH",
    "LONG_MAX_LENGTH",
    "OBJECTIVES",
    "Example",
    "Kind",
    "ObjectiveBatch",
    "Task",
    "TaskError",
    "candidate_scores",
    "describe_tasks",
    "evaluate",
    "example_scores",
    "exact_match",
    "generate_answers",
    "list_tasks",
    "load_task",
    "loss_batch",
    "normalize_answer",
    "objective_batch",
    "objective_loss",
    "resolve_objective",
    "token_f1",
]


def describe_tasks() -> dict[str, str]:
    """Every registered task name with a one-line description (offline tasks first)."""
    out = {name: f"offline: {desc}" for name, desc in SENTIMENT_TASKS.items()}
    for name, spec in MEZO_TASKS.items():
        source = spec.path + (f"/{spec.config}" if spec.config else "")
        out[name] = f"Hub dataset {source}, {spec.kind}, {spec.metric}"
    return out


def list_tasks() -> list[str]:
    """Registered task names (offline sentiment tasks first, then the MeZO suite)."""
    return list(describe_tasks())


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def load_task(
    name_or_path: str | Path,
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    template: str | None = None,
    label_words: str | Mapping[str, str] | None = None,
) -> Task:
    """Load a registered task or a local .jsonl/.csv file, subsampled as MeZO does.

    ``seed`` picks the train and dev examples; the test examples do not depend on it.
    ``template`` and ``label_words`` set a local classification file's prompt (see
    :mod:`llm.tasks.local`); registered tasks have their own prompts and refuse them.
    """
    sizes = {"seed": seed, "n_train": n_train, "n_dev": n_dev, "n_test": n_test}
    text = str(name_or_path)
    names = {_key(n): n for n in list_tasks()}
    name = names.get(_key(text))
    if name is not None and (template is not None or label_words is not None):
        raise TaskError(
            f"task {name} has its own prompt; --template and --label_words apply to local "
            f"{' or '.join(LOCAL_SUFFIXES)} classification files"
        )
    if name in SENTIMENT_TASKS:
        return load_sentiment_task(name, **sizes)
    if name in MEZO_TASKS:
        return load_hub_task(MEZO_TASKS[name], **sizes)
    path = Path(text).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.is_file():
        return load_local_task(path, template=template, label_words=label_words, **sizes)
    close = difflib.get_close_matches(_key(text), names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(names[c] for c in close)}? " if close else ""
    raise TaskError(
        f"unknown task {text!r}; {hint}Known tasks: {', '.join(list_tasks())}; "
        f"or pass the path of a {' or '.join(LOCAL_SUFFIXES)} file"
    )
