"""Tasks from a local ``.jsonl`` or ``.csv`` file.

Columns (a JSONL file has one JSON object per line; blank lines are skipped):

* classification: ``text`` and ``label`` (strings or ints). Candidates come from an optional
  ``candidates`` column (a JSON list, or ``"a|b|c"`` in a CSV), and the label must then be one of
  them or an int index into them; otherwise every row's candidates are the sorted set of all
  label strings in the file (numbers sorted as numbers). The prompt and the scored words:

  - ``template``: a format string filled from the row, ``{text}`` and any other column by its
    name, plus ``{options}``, the row's label words as ``"a, b or c"``. The default,
    :data:`DEFAULT_TEMPLATE`, asks ``"<text>\nQuestion: negative or positive?\nAnswer:"``;
    MeZO's sentiment prompt is ``"{text} It was"``.
  - ``label_words``: the word scored for each label, ``"positive=great,negative=terrible"``
    (in JSONL also an object ``{"positive": "great", ...}``); by default each label is its
    own word. It must give a word to every label the file scores, and two labels one word
    never.

  Each candidate is its label word after one space, or directly after the prompt when the
  prompt ends with whitespace (``"...Yes or No?\n"`` then ``"Yes"``). Both settings come from
  :func:`load_local_task`'s keywords (``--template``, ``--label_words`` on the command line)
  or from optional ``template`` and ``label_words`` columns (per row); the keywords win.
* generation: ``prompt`` and ``answer`` (in JSONL, ``answer`` may be a list of acceptable
  answers; the first is the training target). The answer is appended after one space unless
  the prompt ends with whitespace. Scored by SQuAD token F1 and exact match.
* optional ``split``: ``train``, ``dev`` (or ``validation``/``valid``/``val``) or ``test``.
  Without it the rows are split 80/10/10 with a fixed seed, so the test rows are the same in
  every run; ``seed`` then only picks the train and dev subsamples.
"""

from __future__ import annotations

import csv
import io
import json
import random
import string
from collections.abc import Mapping
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
DEFAULT_TEMPLATE = "{text}\nQuestion: {options}?\nAnswer:"
OPTIONS_FIELD = "options"
LABEL_WORDS_FORMAT = "'positive=great,negative=terrible'"
Row = tuple[int, dict]  # (line number in the file, row)


def read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TaskError(
            f"{path} line {line}: not UTF-8 text (byte {data[err.start]:#04x}); save the file "
            "as UTF-8"
        ) from None


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """Rows with their line numbers, and the columns seen, from a .jsonl or .csv file."""
    if path.suffix == ".csv":
        with io.StringIO(read_text(path), newline="") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            return rows, list(reader.fieldnames or [])
    rows, columns = [], {}
    with io.StringIO(read_text(path)) as f:
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


def parse_label_words(value: str | Mapping, where: str) -> dict[str, str]:
    """``"a=x,b=y"`` or a mapping -> ``{"a": "x", "b": "y"}``; ``where`` names the source."""
    pairs = [("", "")]  # what an unusable value amounts to
    if isinstance(value, Mapping):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in value.items()]
    elif isinstance(value, str):
        split = [item.partition("=") for item in value.split(",")]
        pairs = [(a.strip(), b.strip()) if eq else ("", "") for a, eq, b in split]
    if any(not label or not word for label, word in pairs):
        raise TaskError(
            f"{where}: label words must look like {LABEL_WORDS_FORMAT} (label=word, comma "
            f"separated), got {value!r}"
        )
    words = dict(pairs)
    if len(words) < len(pairs) or len(set(words.values())) < len(words):
        raise TaskError(
            f"{where}: label words {value!r} repeat a label or give two labels one word"
        )
    return words


def template_fields(template: str, where: str) -> list[str]:
    """The column names a template fills in (``{options}`` included), checked."""
    if not isinstance(template, str):
        raise TaskError(f"{where}: a template must be a string, got {template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise TaskError(f"{where}: malformed template {template!r} ({err})") from None
    if any(not f or f.isdigit() for f in fields):
        raise TaskError(
            f"{where}: template {template!r} must name columns in braces, e.g. {{text}}"
        )
    if not set(fields) - {OPTIONS_FIELD}:
        raise TaskError(f"{where}: template {template!r} names no column; add {{text}} to it")
    return fields


def _options(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _fill(template: str, data: dict, words: list[str], where: str) -> str:
    values = {OPTIONS_FIELD: _options(words)}
    for field in template_fields(template, where):
        if field != OPTIONS_FIELD:
            if data.get(field) in (None, ""):
                raise TaskError(
                    f"{where}: the template {template!r} needs column {field!r}, which is "
                    f"empty or missing; the row has columns {sorted(data)}"
                )
            values[field] = str(data[field])
    return template.format_map(values)


def _row_candidates(row: Row, label: str, label_set: list[str], path: Path) -> tuple[list, int]:
    """The row's candidate labels and the index of its label among them."""
    lineno, data = row
    raw = data.get("candidates")
    if raw in (None, ""):
        return label_set, label_set.index(label)
    candidates = _as_list(raw, path, lineno, "candidates")
    if label in candidates:
        return candidates, candidates.index(label)
    if label.isdigit() and int(label) < len(candidates):
        return candidates, int(label)
    raise TaskError(
        f"{path} line {lineno}: label {label!r} is neither one of the candidates "
        f"{candidates} nor an index into them"
    )


def _label_words(data: dict, flag: dict[str, str] | None, where: str) -> dict[str, str] | None:
    if flag is not None:
        return flag
    if data.get("label_words") in (None, ""):
        return None
    return parse_label_words(data["label_words"], f"{where}: column 'label_words'")


def _words(candidates: list[str], words: dict[str, str] | None, where: str) -> list[str]:
    if words is None:
        return list(candidates)
    missing = [c for c in candidates if c not in words]
    if missing:
        raise TaskError(
            f"{where}: the label words {words} have no word for label(s) {missing}; "
            f"give every label one, e.g. {LABEL_WORDS_FORMAT}"
        )
    return [words[c] for c in candidates]


def _classification(
    rows: list[Row], path: Path, template: str | None, label_words: str | Mapping | None
) -> list[Example]:
    labels = [str(_value(r, "label", path)) for r in rows]
    label_set = sorted(set(labels), key=_label_order)
    flag_words = None if label_words is None else parse_label_words(label_words, "--label_words")
    if template is not None:
        template_fields(template, "--template")
    examples, scored = [], set()
    for row, label in zip(rows, labels, strict=True):
        lineno, data = row
        where = f"{path} line {lineno}"
        candidates, gold = _row_candidates(row, label, label_set, path)
        scored.update(candidates)
        words = _words(candidates, _label_words(data, flag_words, where), where)
        prompt = _fill(template or data.get("template") or DEFAULT_TEMPLATE, data, words, where)
        joined = (lambda w: w) if prompt[-1:].isspace() else with_space
        examples.append(Example(prompt, [joined(w) for w in words], gold))
    unknown = sorted(set(flag_words or ()) - scored)
    if unknown:
        raise TaskError(
            f"--label_words names label(s) {unknown} that {path} does not have; its labels "
            f"are {sorted(scored, key=_label_order)}"
        )
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
    template: str | None = None,
    label_words: str | Mapping[str, str] | None = None,
) -> Task:
    """A task from a .jsonl or .csv file (see the module docstring for the columns).

    ``template`` and ``label_words`` set a classification file's prompt, over any
    ``template``/``label_words`` columns; a generation file refuses them.
    """
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
    if kind == "generation" and (template is not None or label_words is not None):
        raise TaskError(
            f"{path} is a generation file (prompt+answer columns): its prompts are the "
            "'prompt' column; --template and --label_words apply to text+label files"
        )
    if kind == "classification":
        examples = _classification(rows, path, template, label_words)
    else:
        examples = _generation(rows, path)
    by_split: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for split, example in zip(_assign_splits(rows, columns, path), examples, strict=True):
        by_split[split].append(example)
    train = subsample(by_split["train"], n_train, random.Random(f"{seed}:train"))
    dev = subsample(by_split["dev"], n_dev, random.Random(f"{seed}:dev"))
    test = draw_test(by_split["test"], n_test)
    metric = "accuracy" if kind == "classification" else "f1"
    return Task(path.name, kind, train, dev, test, metric, f"local file {path}")
