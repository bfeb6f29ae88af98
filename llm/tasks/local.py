"""Tasks from a local ``.jsonl`` or ``.csv`` file.

Columns (a JSONL file has one JSON object per line; blank lines are skipped):

* classification: ``text`` and ``label`` (strings or ints). The prompt is the text and each
  candidate is `` <label>`` (one space, then the label). Candidates come from an optional
  ``candidates`` column (a JSON list, or ``"a|b|c"`` in a CSV), and the label must then be one of
  them or an int index into them; otherwise every row's candidates are the sorted set of all
  label strings in the file (numbers sorted as numbers).
* generation: ``prompt`` and ``answer`` (in JSONL, ``answer`` may be a list of acceptable
  answers; the first is the training target). The answer is appended after one space unless
  the prompt ends with whitespace. Scored by SQuAD token F1 and exact match.
* optional ``split``: ``train``, ``dev`` (or ``validation``/``valid``/``val``) or ``test``.
  Without it the rows are split 80/10/10 with a fixed seed, so the test rows are the same in
  every run; ``seed`` then only picks the train and dev subsamples.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from llm.tasks.base import (
    TEST_SEED,
    Example,
    Kind,
    Task,
    TaskError,
    check_sizes,
    draw_test,
    subsample,
    with_space,
)

LOCAL_SUFFIXES = (".jsonl", ".csv")
SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev"}
SPLIT_NAMES |= {"val": "dev", "test": "test"}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
CSV_LIST_SEPARATOR = "|"
Row = tuple[int, dict]  # (line number in the file, row)


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """Rows with their line numbers, and the columns seen, from a .jsonl or .csv file."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            return rows, list(reader.fieldnames or [])
    rows, columns = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path} line {lineno}: malformed JSON ({err})") from None
            if not isinstance(row, dict):
                raise TaskError(
                    f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((lineno, row))
            columns.update(dict.fromkeys(row))
    return rows, list(columns)


def detect_kind(columns: list[str], path: Path) -> Kind:
    """classification for text+label columns, generation for prompt+answer."""
    if {"text", "label"} <= set(columns):
        return "classification"
    if {"prompt", "answer"} <= set(columns):
        return "generation"
    wanted = ["prompt", "answer"] if {"prompt", "answer"} & set(columns) else ["text", "label"]
    missing = [c for c in wanted if c not in columns]
    raise TaskError(
        f"{path} has no column {' or '.join(repr(c) for c in missing)}: a task file needs "
        f"text+label columns (classification) or prompt+answer columns (generation); "
        f"the file has columns {columns}"
    )


def _value(row: Row, column: str, path: Path):
    lineno, data = row
    value = data.get(column)
    if value is None or value == "":
        raise TaskError(f"{path} line {lineno}: empty or missing {column!r}")
    return value


def _as_list(value, path: Path, lineno: int, column: str) -> list[str]:
    if isinstance(value, str):
        return value.split(CSV_LIST_SEPARATOR)
    if isinstance(value, list) and value and all(isinstance(v, str | int) for v in value):
        return [str(v) for v in value]
    raise TaskError(f"{path} line {lineno}: {column!r} must be a list of strings, got {value!r}")


def _label_order(label: str) -> tuple:
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _classification(rows: list[Row], path: Path) -> list[Example]:
    labels = [str(_value(r, "label", path)) for r in rows]
    label_set = sorted(set(labels), key=_label_order)
    examples = []
    for (lineno, data), label in zip(rows, labels, strict=True):
        raw = data.get("candidates")
        if raw in (None, ""):
            candidates, gold = label_set, label_set.index(label)
        else:
            candidates = _as_list(raw, path, lineno, "candidates")
            if label in candidates:
                gold = candidates.index(label)
            elif label.isdigit() and int(label) < len(candidates):
                gold = int(label)
            else:
                raise TaskError(
                    f"{path} line {lineno}: label {label!r} is neither one of the candidates "
                    f"{candidates} nor an index into them"
                )
        text = str(_value((lineno, data), "text", path))
        examples.append(Example(text, [with_space(c) for c in candidates], gold))
    return examples


def _generation(rows: list[Row], path: Path) -> list[Example]:
    examples = []
    for lineno, data in rows:
        prompt = str(_value((lineno, data), "prompt", path))
        answer = _value((lineno, data), "answer", path)
        # Only candidates are '|'-separated in a CSV; an answer string is one answer.
        answers = [str(answer)] if isinstance(answer, str | int | float) else None
        answers = answers or _as_list(answer, path, lineno, "answer")
        target = answers[0] if prompt[-1:].isspace() else with_space(answers[0])
        examples.append(Example(prompt, None, target, references=answers))
    return examples


def _assign_splits(rows: list[Row], columns: list[str], path: Path) -> list[str]:
    if "split" not in columns:
        order = list(range(len(rows)))
        random.Random(f"{TEST_SEED}:split").shuffle(order)
        n_train = round(SPLIT_FRACTIONS[0] * len(rows))
        n_dev = round(SPLIT_FRACTIONS[1] * len(rows))
        names = ["train"] * n_train + ["dev"] * n_dev
        names += ["test"] * (len(rows) - n_train - n_dev)
        splits = [""] * len(rows)
        for position, i in enumerate(order):
            splits[i] = names[position]
        return splits
    splits = []
    for lineno, data in rows:
        value = str(data.get("split") or "").strip().lower()
        if value not in SPLIT_NAMES:
            raise TaskError(
                f"{path} line {lineno}: split {data.get('split')!r} is not one of "
                f"{sorted(SPLIT_NAMES)}"
            )
        splits.append(SPLIT_NAMES[value])
    return splits


def load_local_task(
    path: str | Path,
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
) -> Task:
    """A task from a .jsonl or .csv file (see the module docstring for the columns)."""
    path = Path(path)
    if path.suffix not in LOCAL_SUFFIXES:
        raise TaskError(f"{path}: a task file must end in {' or '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    check_sizes(n_train, n_dev, n_test)
    rows, columns = read_rows(path)
    if not rows:
        raise TaskError(f"{path} has no rows")
    kind = detect_kind(columns, path)
    examples = (_classification if kind == "classification" else _generation)(rows, path)
    by_split: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for split, example in zip(_assign_splits(rows, columns, path), examples, strict=True):
        by_split[split].append(example)
    train = subsample(by_split["train"], n_train, random.Random(f"{seed}:train"))
    dev = subsample(by_split["dev"], n_dev, random.Random(f"{seed}:dev"))
    test = draw_test(by_split["test"], n_test)
    metric = "accuracy" if kind == "classification" else "f1"
    return Task(path.name, kind, train, dev, test, metric, f"local file {path}")
