"""Command-line entry point: ``python -m diep_lightning fit --config configs/tiny_mixtral.yaml``.

One LightningCLI call. Callbacks (pruning, merging, skipping, lm-eval) come from the YAML's
``trainer.callbacks`` or the command line (``--trainer.callbacks+=ExpertMerging``).

Bad input ends the program with exit code 2 and one line, ``error: <argument>: <what is allowed>``, with no
traceback: every check in the project raises with such a message, and :func:`main` unwraps it from the
parser's exception chain.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from diep_lightning.data import CalibrationDataModule
from diep_lightning.module import DiEPModule

#: Exceptions that mean "the user asked for something that cannot work" (one line, exit 2).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError, FloatingPointError, KeyError)


class DiEPCLI(LightningCLI):
    """LightningCLI with the tokenizer of the calibration data tied to the model being pruned."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")


def _innermost_message(err: BaseException) -> str:
    """One line for the user: the deepest cause's first line (the project's own ``argument: ...`` message),
    prefixed with the parser key it was given for when the message does not name one itself."""
    key = None
    while True:
        found = _PARSER_KEY.search(str(err))
        if found and key is None:
            key = found.group(1)
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or not isinstance(nxt, Exception):
            break
        err = nxt
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError):
        text = text.strip("'\"")
    text = _PARSER_KEY.sub("", text.splitlines()[0]).strip() or text.splitlines()[0]
    if key and not _NAMES_ARGUMENT.match(text):
        text = f"{key}: {text}"
    return text


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?')
_NAMES_ARGUMENT = re.compile(r"^[\w.\[\]]+: ")


def cli(args: list[str] | None = None) -> DiEPCLI:
    """Build and run the CLI, raising on bad input (what tests that inspect exceptions call)."""
    import diep_lightning.callbacks  # noqa: F401  (registers the callbacks for short names on the CLI)

    return DiEPCLI(
        DiEPModule,
        CalibrationDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )


def main(args: list[str] | None = None) -> DiEPCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); bad input exits 2 with a one-line ``error:``."""
    try:
        return cli(args)
    except USER_ERRORS as err:
        print(f"error: {_innermost_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # jsonargparse's ArgumentError and friends
        if type(err).__name__ in ("ArgumentError", "NSKeyError"):
            print(f"error: {_innermost_message(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
