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

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    """Print ``<prog>: error: <message>`` (first line only) and return the usage exit code."""
    text = str(message).strip() or type(message).__name__
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
