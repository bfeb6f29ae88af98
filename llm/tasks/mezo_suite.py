"""The MeZO task suite (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes"): SST-2, the SuperGLUE tasks RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, and
SQuAD and DROP, with MeZO-style prompts, read from the Hugging Face Hub with ``datasets``.

Each task is one :class:`HubTask` entry: dataset id, config, the two splits it reads, and a
``to_example`` function from one dataset row to an :class:`Example` (or None to skip the row,
e.g. unlabelled ones). As in MeZO, train (1000) and dev (500) are drawn from the dataset's
train split and test (1000) from its validation split, whose labels are public (the test
splits of GLUE/SuperGLUE are unlabelled); tasks with smaller splits use all of them, with a
100-example dev split for CB and COPA as MeZO's scripts (see
:func:`llm.tasks.base.train_dev_from_pool`). Classification is scored by the mean
log-probability of each candidate (ReCoRD: right when the prediction is any gold entity);
SQuAD and DROP are generation tasks scored by token F1.

As MeZO's ``mezo.sh``: COPA, ReCoRD, SQuAD and DROP train on the LM loss of the answer, the
other tasks on the classification objective (``Task.objective``, see
:mod:`llm.tasks.objective`); MultiRC, ReCoRD, SQuAD and DROP have passages of several hundred
tokens and get MeZO's max length, :data:`llm.tasks.base.LONG_MAX_LENGTH` (``Task.max_length``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from llm.tasks.base import (
    DEFAULT_MAX_LENGTH,
    LONG_MAX_LENGTH,
    TEST_SEED,
    Example,
    Kind,
    Objective,
    Task,
    TaskError,
    check_sizes,
    train_dev_from_pool,
    with_space,
)

OFFLINE_HINT = (
    "use an offline task: movie-reviews, tweets, amazon-reviews, nyt-editorials, "
    "or a local .jsonl/.csv file with text/label or prompt/answer columns"
)
YES_NO = ["No", "Yes"]  # index = label for SuperGLUE's boolean tasks (1 = true)
SMALL_DEV = 100  # MeZO's dev size for CB and COPA, whose train splits have < 1000 rows


@dataclass(frozen=True)
class HubTask:
    """One MeZO-suite task; ``objective``/``max_length`` become the Task's defaults and
    ``small_dev`` is the dev size when the train split is smaller than train + dev."""

    name: str
    path: str
    config: str | None
    train_split: str
    test_split: str
    kind: Kind
    metric: str
    to_example: Callable[[dict], Example | None]
    objective: Objective | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    small_dev: int | None = None


def _labelled(row: dict) -> bool:
    return row.get("label", -1) is not None and int(row.get("label", -1)) >= 0


def sst2_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    return Example(f"{row['sentence'].strip()} It was", [" terrible", " great"], int(row["label"]))


def rte_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    prompt = f'{row["premise"]}\nDoes this mean that "{row["hypothesis"]}" is true? Yes or No?\n'
    return Example(prompt, ["Yes", "No"], int(row["label"]))  # 0 = entailment


def cb_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    prompt = (
        f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?\n'
    )
    # 0 = entailment, 1 = contradiction, 2 = neutral
    return Example(prompt, ["Yes", "No", "Maybe"], int(row["label"]))


def boolq_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    question = row["question"].strip()
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return Example(f"{row['passage']} {question}\n", YES_NO, int(row["label"]))


def wsc_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    prompt = (
        f'{row["text"]}\nIn the previous sentence, does the pronoun "{row["span2_text"].lower()}" '
        f"refer to {row['span1_text']}? Yes or No?\n"
    )
    return Example(prompt, YES_NO, int(row["label"]))


def wic_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    prompt = (
        f'Does the word "{row["word"]}" have the same meaning in these two sentences? '
        f"Yes, No?\n{row['sentence1']}\n{row['sentence2']}\n"
    )
    return Example(prompt, YES_NO, int(row["label"]))


def multirc_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    prompt = (
        f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer "
        f'"{row["answer"]}". Is that correct? Yes or No?\n'
    )
    return Example(prompt, YES_NO, int(row["label"]))


def _continue_sentence(choice: str) -> str:
    """A COPA choice as the rest of the premise's sentence: its first word in lower case,
    except the pronoun I (and its contractions: I'm, I'd, ...)."""
    first, space, rest = choice.strip().partition(" ")
    if first != "I" and not first.startswith("I'"):
        first = first.lower()
    return " " + first + space + rest


def copa_example(row: dict) -> Example | None:
    if not _labelled(row):
        return None
    connector = {"cause": " because", "effect": " so"}[row["question"]]
    premise = row["premise"].strip().rstrip(".")
    candidates = [_continue_sentence(row["choice1"]), _continue_sentence(row["choice2"])]
    return Example(premise + connector, candidates, int(row["label"]))


def record_example(row: dict) -> Example | None:
    """Cloze over the passage's entities: each candidate is the query with one entity filled.

    Every entity among the gold answers counts as right; the first answer found among the
    entities is the training target of the ``lm`` objective.
    """
    entities = list(dict.fromkeys(row["entities"]))
    answers = [a for a in dict.fromkeys(row.get("answers") or []) if a in entities]
    if not answers:
        return None
    passage = row["passage"].replace("@highlight\n", "- ")
    candidates = [" " + row["query"].replace("@placeholder", e) for e in entities]
    references = [candidates[entities.index(a)] for a in answers]
    return Example(f"{passage}\n-", candidates, entities.index(answers[0]), references)


def squad_example(row: dict) -> Example | None:
    answers = list(row["answers"]["text"])
    if not answers:
        return None
    prompt = (
        f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question']}\nAnswer:"
    )
    return Example(prompt, None, with_space(answers[0]), references=answers)


def drop_example(row: dict) -> Example | None:
    answers = list(row["answers_spans"]["spans"])
    if not answers:
        return None
    prompt = f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"
    return Example(prompt, None, with_space(answers[0]), references=answers)


def _spec(name, path, config, to_example, kind="classification", metric="accuracy", **extra):
    return HubTask(name, path, config, "train", "validation", kind, metric, to_example, **extra)


LONG = {"max_length": LONG_MAX_LENGTH}
MEZO_TASKS: dict[str, HubTask] = {
    t.name: t
    for t in [
        _spec("sst2", "nyu-mll/glue", "sst2", sst2_example),
        _spec("rte", "aps/super_glue", "rte", rte_example),
        _spec("cb", "aps/super_glue", "cb", cb_example, small_dev=SMALL_DEV),
        _spec("boolq", "aps/super_glue", "boolq", boolq_example),
        _spec("wsc", "aps/super_glue", "wsc.fixed", wsc_example),
        _spec("wic", "aps/super_glue", "wic", wic_example),
        _spec("multirc", "aps/super_glue", "multirc", multirc_example, **LONG),
        _spec("copa", "aps/super_glue", "copa", copa_example, objective="lm", small_dev=SMALL_DEV),
        _spec("record", "aps/super_glue", "record", record_example, objective="lm", **LONG),
        _spec("squad", "rajpurkar/squad", None, squad_example, "generation", "f1", **LONG),
        _spec("drop", "ucinlp/drop", None, drop_example, "generation", "f1", **LONG),
    ]
}


def _hub_split(spec: HubTask, split: str):
    """One split of the task's dataset (anything indexable with ``len``)."""
    import datasets

    dataset_id = spec.path + (f"/{spec.config}" if spec.config else "")
    try:
        return datasets.load_dataset(spec.path, spec.config, split=split)
    except Exception as err:  # network, missing dataset, bad cache: all end the same way
        raise TaskError(
            f"task {spec.name} needs the Hub dataset {dataset_id} (split {split}), which could "
            f"not be downloaded: {type(err).__name__}: {err}\nSet HF_ENDPOINT or pre-download "
            f"it into the datasets cache, or {OFFLINE_HINT}"
        ) from err


def _take(rows, n: int, seed: str, to_example: Callable[[dict], Example | None]) -> list[Example]:
    """Up to ``n`` examples from rows visited in a seeded random order, skipping None ones."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out: list[Example] = []
    for i in order:
        if len(out) >= n:
            break
        example = to_example(rows[i])
        if example is not None:
            out.append(example)
    return out


def load_hub_task(
    spec: HubTask, *, seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 1000
) -> Task:
    """Download (or read from the datasets cache) and sample one MeZO-suite task."""
    check_sizes(n_train, n_dev, n_test)
    pool = _take(
        _hub_split(spec, spec.train_split), n_train + n_dev, f"{seed}:pool", spec.to_example
    )
    train, dev = train_dev_from_pool(pool, n_train, n_dev, seed, spec.small_dev)
    # The validation split is the test set, drawn with TEST_SEED whatever the run's seed.
    test_rows = _hub_split(spec, spec.test_split)
    test = _take(test_rows, n_test, f"{TEST_SEED}:test", spec.to_example)
    source = spec.path + (f"/{spec.config}" if spec.config else "")
    return Task(
        spec.name,
        spec.kind,
        train,
        dev,
        test,
        spec.metric,
        f"{source} (MeZO prompts)",
        objective=spec.objective,
        max_length=spec.max_length,
    )
