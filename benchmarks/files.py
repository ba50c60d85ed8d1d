"""The command lines of the benchmarks and maintainer tools: an error is one line naming the argument, and the files
a run reads (``--from``) and writes (``--out``, ``--results``) are checked before it measures anything, so hours
of timing never end in a traceback or over a user's file: a run replaces only its own earlier JSON and adds
sections only to a report."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from diep_lightning.outputs import CommandParser, Refusal, is_report, read_json, save_json, writable_file, written_by

__all__ = ["RESULTS", "Parser", "run_json", "save_json", "whole"]

#: where the benchmarks' result JSONs live (the reports, RESULTS.md and TUNING.md, stay beside the code)
RESULTS = Path(__file__).resolve().parent / "results"


def run_json(folder: str | Path) -> Path:
    """The JSON of a ``benchmarks.run`` report folder: ``<folder>/results/run.json``."""
    return Path(folder) / "results" / "run.json"


def whole(minimum: int = 1, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (and a multiple of ``multiple``), so a count no run can use
    is refused in one line before any model is built."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or value % multiple:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}"
                                             + (f" and a multiple of {multiple}" if multiple > 1 else "")
                                             + f", got {value}")
        return value
    return parse


class Parser(CommandParser):
    """A benchmark's or tool's command line: one-line errors, and the checks of the files it reads and writes."""

    def earlier_run(self, path: str, flag: str = "--from") -> dict[str, Any]:
        """The JSON of an earlier run of this benchmark at ``path``."""
        if not Path(path).is_file():
            self.error(f"{flag}: no file at {path}")
        if not written_by(self.prog)(Path(path)):
            self.error(f"{flag}: {path} is not the JSON of an earlier `{self.prog}` run")
        return read_json(path)

    def checked_file(self, path: str, flag: str, own: Callable[[Path], bool], own_words: str) -> Path:
        """``path`` if the run may write it: a new file or one ``own`` recognises (``own_words`` in the refusal)."""
        return self._checked(lambda: writable_file(path, flag, own, own_words))

    def out_file(self, path: str, flag: str = "--out") -> Path:
        """``path`` if the run's JSON may go there: a new file or this benchmark's own earlier JSON."""
        return self.checked_file(path, flag, written_by(self.prog), f"the JSON of an earlier `{self.prog}` run")

    def report_file(self, path: str | None, flag: str = "--results") -> Path | None:
        """``path`` if the run's section may go there (``None`` for ''): a new file or a benchmark report."""
        return self.checked_file(path, flag, is_report, "a benchmark report (RESULTS.md)") if path else None

    def device(self, device: str, flag: str = "--device") -> None:
        """Refuse a CUDA device on a machine where torch sees none."""
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            self.error(f"{flag}: {device} asked for, but torch sees no CUDA device")

    def model_dir(self, path: str, flag: str = "--model") -> Path:
        """``path`` if it holds a model (its config.json)."""
        if not (Path(path) / "config.json").is_file():
            self.error(f"{flag}: no model (config.json) in {path}")
        return Path(path)

    def out_folder(self, path: str, files: dict[str, Callable[[Path], bool]], flag: str = "--out",
                   exports: Iterable[str] = ()) -> Path:
        """``path`` if the run may write its ``files`` (name: how to tell its own earlier one) and its ``exports``
        (folder names, each replaced only when it is an earlier export) into it."""
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            self.error(f"{flag}: {folder} is a file; name a folder")
        for name, own in files.items():
            self._checked(lambda: writable_file(folder / name, flag, own, "one this benchmark wrote"))
        if exports:
            from diep_lightning.export_dir import check_export_dir

            for name in exports:
                try:
                    check_export_dir(folder / name, overwrite=True)
                except (ValueError, OSError) as err:
                    self.error(f"{flag}: {str(err).removeprefix('export_dir: ')}")
        return folder

    def _checked(self, check: Callable[[], Path]) -> Path:
        try:
            return check()
        except Refusal as err:
            self.error(str(err))


def a_run_of(command: str) -> Callable[[Path], bool]:
    """Recognises the JSON of an earlier ``python -m benchmarks.<command>`` run."""
    return written_by(f"python -m benchmarks.{command}")


def linked_copy(folder: Path) -> bool:
    """Whether ``folder`` is a copy that only links to a model's files beside its own ``config.json``."""
    return folder.is_dir() and all(item.is_symlink() or item.name == "config.json" for item in folder.iterdir())
