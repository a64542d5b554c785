"""How every command talks: the one place that writes a command's answer, its warnings and its error.

- `emit(args, obj, text)`: the command's answer. With --json, `obj` as one JSON document on
  stdout; otherwise `text`: a string, a list of lines, a rich renderable (a Table), or a
  zero-argument function returning one of these (so --json never builds a table).
- `emit_event(args, obj, text)`: one record of a stream (monitor, vboard, openadr-ven): with
  --json one JSON object per line, else the text line; flushed at once.
- `warn(msg)` / `note(msg)`: one line on stderr, never on stdout (stdout stays parseable).
- `error_line(exc)`: the one stderr line `gridshed.cli.main` prints for a UserError.

Only gridshed.cli prints; the library modules return data, raise UserError or call a callback
they were given (tests/host/test_cli_output.py checks both).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Union

Text = Union[str, list, Any, Callable[[], Any], None]


def to_json(obj: Any, *, lines: bool = False) -> str:
    """The JSON every command writes: indented documents, compact one-line records for streams.
    Values JSON has no type for (paths, datetimes, bytes) are written as their str()."""
    if lines:
        return json.dumps(obj, default=str)
    return json.dumps(obj, indent=1, default=str)


def console():
    """Rich console for tables: on a terminal its width; into a pipe or file (not a tty, no
    $COLUMNS) wide enough that no name is cut at 80 columns. Name columns fold, never truncate."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=240)


def _show(text: Text) -> None:
    if callable(text):
        text = text()
    if text is None:
        return
    if isinstance(text, str):
        print(text)
    elif isinstance(text, (list, tuple)):
        for line in text:
            _show(line)
    else:  # a rich renderable
        console().print(text)


def emit(args: argparse.Namespace, obj: Any, text: Text = None) -> None:
    """The command's answer: `obj` as JSON with --json, else `text` for a person."""
    if getattr(args, "json", False):
        print(to_json(obj))
    else:
        _show(text)


def emit_event(args: argparse.Namespace, obj: dict[str, Any], text: str | None) -> None:
    """One record of a stream: a JSON line with --json, else `text` (None: nothing for a person)."""
    if getattr(args, "json", False):
        print(to_json(obj, lines=True), flush=True)
    elif text is not None:
        print(text, flush=True)


def warn(msg: str) -> None:
    """Something the user should know that does not stop the command: one stderr line."""
    print(f"gridshed: warning: {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    """Progress or context on stderr, as is (`provisioning...`, `unit 1 at 9600 baud...`)."""
    print(msg, file=sys.stderr, flush=True)


def error_line(exc: BaseException, prefix: str = "error") -> str:
    """The one line for an error the user can fix (no traceback: --debug shows one)."""
    msg = " ".join(str(exc).split("\n")) or type(exc).__name__
    return f"gridshed: {prefix}: {msg}"


def error(exc: BaseException, prefix: str = "error") -> None:
    print(error_line(exc, prefix), file=sys.stderr)
