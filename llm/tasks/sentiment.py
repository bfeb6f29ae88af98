"""Four offline binary sentiment tasks from Hutto & Gilbert (2014), built by
:func:`llm.assets.ensure_sentiment_data` (MIT licence; see that module for the labelling
rule: mean human rating >= +0.5 positive, <= -0.5 negative, the rest dropped).

The prompt is MeZO's SST-2 template: ``"<text> It was"`` with candidates ``" terrible"`` and
``" great"``. Train and dev are subsampled from the prepared train/dev files with ``seed``;
test from the test file with the fixed test seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llm.assets import ensure_sentiment_data
from llm.tasks.base import Example, Task, TaskError, check_sizes, draw_test, subsample

SENTIMENT_TASKS: dict[str, str] = {
    "movie-reviews": "Rotten Tomatoes review sentences (Pang & Lee 2004), human-rated",
    "tweets": "tweet-like texts, human-rated",
    "amazon-reviews": "Amazon product review sentences (Hu & Liu 2004), human-rated",
    "nyt-editorials": "New York Times opinion sentences, human-rated",
}
CANDIDATES = [" terrible", " great"]  # index = label: 0 negative, 1 positive


def sentiment_example(text: str, label: int) -> Example:
    """The SST-2-style example for one sentence (label 1 = positive)."""
    return Example(f"{text.strip()} It was", list(CANDIDATES), int(label))


def _read_split(path: Path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                examples.append(sentiment_example(row["text"], row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, TaskError) as err:
                raise TaskError(
                    f"{path} line {lineno} is damaged ({err}); delete {path.parent} and run "
                    "again to rebuild it"
                ) from err
    return examples


def load_sentiment_task(
    name: str, *, seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 1000
) -> Task:
    """One of :data:`SENTIMENT_TASKS`, building the cached data on first use."""
    if name not in SENTIMENT_TASKS:
        raise TaskError(f"unknown sentiment task {name!r}; use one of {', '.join(SENTIMENT_TASKS)}")
    check_sizes(n_train, n_dev, n_test)
    folder = ensure_sentiment_data() / name
    train = subsample(_read_split(folder / "train.jsonl"), n_train, random.Random(f"{seed}:train"))
    dev = subsample(_read_split(folder / "dev.jsonl"), n_dev, random.Random(f"{seed}:dev"))
    test = draw_test(_read_split(folder / "test.jsonl"), n_test)
    description = f"{SENTIMENT_TASKS[name]} (Hutto & Gilbert 2014, MIT)"
    return Task(name, "classification", train, dev, test, "accuracy", description)
