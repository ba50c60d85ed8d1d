"""Where a command may write a file of results: a new path, or a file the same command wrote before.

A mistyped output argument then costs a one-line refusal naming it, before any work, never a user's file.
Exports have their own, stricter rules (``export_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

#: The marker each benchmark section of a report sits between (``benchmarks.sections``).
_SECTION_MARKER = re.compile(r"<!-- \w+:begin -->")
REPORT_HEADING = "# Benchmark results"


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for ``python -m <module>`` whose errors are one line naming the argument, not the usage."""

    def __init__(self, module: str, **kwargs: Any) -> None:
        super().__init__(prog=f"python -m {module}", **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.strip().splitlines()[0]}\n")


class Refusal(ValueError):
    """An output argument this command will not write to; the message is one line naming the argument."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``, or ``None`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def written_by(command: str) -> Callable[[Path], bool]:
    """Whether a file is a JSON object whose ``command`` is a run of ``command`` (``python -m benchmarks.speed``)."""
    def check(path: Path) -> bool:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("command"), str):
            return False
        return data["command"] == command or data["command"].startswith(command + " ")
    return check


def is_report(path: Path) -> bool:
    """Whether a file may take a benchmark's section: a report (its heading or a section's markers) or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return not text.strip() or text.startswith(REPORT_HEADING) or bool(_SECTION_MARKER.search(text))


def writable_file(path: str | os.PathLike, flag: str, own: Callable[[Path], bool] | None = None,
                  own_words: str = "") -> Path:
    """``path`` if this command may write it: new (its folder creatable and writable), or an existing file that
    ``own`` recognises as this command's own earlier output, described by ``own_words`` in the refusal.

    Raises:
        Refusal: a folder, someone else's file, or a place that cannot be written.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise Refusal(f"{flag}: {target} is a folder; name a file")
    if target.exists() or target.is_symlink():
        if own is None or not own(target):
            raise Refusal(f"{flag}: {target} exists and is not {own_words or 'a file this command wrote'}, the "
                          f"only file it writes over; choose another {flag}")
        if not os.access(target, os.W_OK):
            raise Refusal(f"{flag}: {target} is not writable; choose another {flag}")
        return target
    ancestor = target.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise Refusal(f"{flag}: {ancestor} is a file, so {target} cannot be created; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise Refusal(f"{flag}: {ancestor} is not writable; choose another {flag}")
    return target


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (folders created) through a sibling renamed into place, so a run killed while
    writing leaves the earlier file whole."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def save_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """``data`` as JSON into ``path``, as :func:`save_text` writes."""
    save_text(path, json.dumps(data, indent=indent))
