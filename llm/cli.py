"""What the three commands share: exit codes, one-line errors, and SIGTERM as an interrupt.

    0    done
    2    a user error: one line ``<prog>: error: <message>`` on stderr, no traceback
    130  interrupted (SIGINT, or SIGTERM from a batch scheduler): the command says truthfully
         what was saved

A command's body raises :class:`UsageError` (or ``ValueError``/``FileNotFoundError``/``OSError``
from the layers below, whose messages already name the file or value) for a user error and
lets ``KeyboardInterrupt`` propagate; :func:`run_command` turns both into the exit codes above.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import sys
import typing
from argparse import Action
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from jsonargparse import ActionYesNo, ArgumentParser, DefaultHelpFormatter, Namespace

T = TypeVar("T")

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

#: Errors whose message is the whole story for a user (no traceback is printed for them).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OSError,
    ImportError,
)


class UsageError(ValueError):
    """A bad flag value or combination, found before any work."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` on SIGTERM (what a batch scheduler sends before SIGKILL), so
    the interrupt path saves the last completed step; the previous handler comes back after."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error(prog: str, message: object) -> int:
    """Print ``<prog>: error: <message>`` on one line (a multi-line message is joined with
    spaces) and return the usage exit code."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def run_command(
    prog: str,
    body: Callable[[], int | None],
    on_interrupt: Callable[[], str] | None = None,
) -> int:
    """Run ``body`` with SIGTERM as an interrupt and map its outcome to an exit code.

    ``on_interrupt`` returns the line to print after an interrupt (what was saved, and how to
    continue); without one the command says it was interrupted and nothing more.
    """
    try:
        with sigterm_as_interrupt():
            return int(body() or EXIT_OK)
    except KeyboardInterrupt:
        line = on_interrupt() if on_interrupt is not None else "interrupted"
        print(f"\n{prog}: {line}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # argparse/jsonargparse: --help (0) and its own usage errors (2)
        return e.code if isinstance(e.code, int) else error(prog, e.code)
    except USER_ERRORS as e:
        return error(prog, e)


# --------------------------------------------------------------------------- typed flags


class HelpFormatter(DefaultHelpFormatter):
    """``--help`` lines of dataclass flags read ``<meaning> (default: <value>)`` or
    ``<meaning> (required)``; other actions (``--config``, ``--print_config``) as jsonargparse
    writes them; the description keeps its line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """The description as written (its examples keep their lines)."""
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _expand_help(self, action: Action) -> str:
        if not getattr(action, "field_flag", False):
            return super()._expand_help(action)
        if action.required:
            return f"{action.help} (required)"
        return f"{action.help} (default: {_shown(action.default)})"


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (and of its bases), one line."""
    import docstring_parser

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for param in docstring_parser.parse_from_object(klass).params:
            docs[param.arg_name] = " ".join((param.description or "").split())
    return docs


def add_dataclass_flags(
    parser: ArgumentParser, cls: type, *, positional: Collection[str] = (), group: bool = True
) -> None:
    """One flag per field of the dataclass ``cls``: ``--<field>`` with the field's type and
    default, its docstring as help; a ``bool`` field is a switch (``--flag`` / ``--no_flag``);
    fields named in ``positional`` are positional arguments. With ``group`` the flags are listed
    under the first line of the class docstring."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    target = parser.add_argument_group(title) if group else parser
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"help": docs.get(f.name, "")}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        if f.name in positional:
            action = target.add_argument(f.name, type=hints[f.name], **kwargs)
        elif hints[f.name] in (bool, bool | None):  # None: unset, the run picks a value
            action = target.add_argument(f"--{f.name}", action=ActionYesNo, **kwargs)
        else:
            required = "default" not in kwargs
            action = target.add_argument(
                f"--{f.name}", type=hints[f.name], required=required, **kwargs
            )
        action.field_flag = True


def dataclass_from(cls: type[T], values: Namespace | dict) -> T:
    """An instance of the dataclass ``cls`` from the parsed ``values`` of its fields."""
    values = values if isinstance(values, dict) else vars(values)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init})


def parse_flags(
    parser: ArgumentParser,
    argv: Sequence[str] | None,
    allowed: Callable[[str], str | None] | None = None,
) -> Namespace:
    """``parser.parse_args(argv)`` (a parser made with ``exit_on_error=False``); a bad flag is a
    :class:`UsageError` with one line naming it (``--lr: expected float, got 'x'``).

    ``allowed(field)`` may say in words what a field accepts; the message is then
    ``--<field> <value>: expected <allowed>``.
    """
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        message = str(err)
        key = re.match(r'Parser key "([\w.]+)"', message)
        value = re.search(r"(?:Given|Got) value: (.*)", message)
        words = allowed(key[1]) if key and value and allowed else None
        if words:
            raise UsageError(f"--{key[1]} {value[1].strip()}: expected {words}") from None
        raise UsageError(_one_line(message) + _underscore_hint(parser, message)) from None


def _one_line(message: str) -> str:
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message)
    union = re.search(r"Subtypes: \[(.*?)\].*Given value: (.*)", message, re.DOTALL)
    if union:  # ``float | None`` and the like: one clause instead of jsonargparse's report
        types = " or ".join(t.strip().replace("NoneType", "null") for t in union[1].split(","))
        message = message[: message.index(":") + 1] + f" expected {types}, got {union[2]}"
    message = re.sub(r"Parser key \"([\w.]+)\":\s*", lambda m: f"--{m[1]}: ", message)
    message = re.sub(r"Expected a (\S+)\. Got value: (.*)", r"expected \1, got \2", message)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _underscore_hint(parser: ArgumentParser, message: str) -> str:
    """For an unknown ``--some-flag``: the flag it means (flags spell words with underscores)."""
    if not message.startswith("unrecognized arguments"):
        return ""
    known = {o for a in parser._actions for o in a.option_strings}
    meant = []
    for token in message.split(":", 1)[1].split():
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag.replace("-", "_").replace("__", "--", 1) in known:
            meant.append(flag.replace("-", "_").replace("__", "--", 1))
    return f" (flags use underscores: {', '.join(meant)})" if meant else ""
