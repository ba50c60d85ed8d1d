"""Command-line entry point: ``python -m diep_lightning fit --config configs/tiny_mixtral.yaml``.

One LightningCLI call with ``subclass_mode_model=True``: the model is DiEP's search (:class:`DiEPModule`) unless
``model.class_path`` (``--model=BaselineModule --model.method=reap``) names another method's module. The pruning
callback has its own key ``prune:``; the others (merging, skipping, lm-eval) come from the YAML's
``trainer.callbacks`` or the command line (``--trainer.callbacks+=ExpertMerging``).

Bad input ends the program with exit code 2 and one line, ``error: <argument>: <what is allowed>``, with no
traceback: every check in the project raises with such a message, and :func:`main` unwraps it from the
parser's exception chain.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from diep_lightning.data import CalibrationDataModule
from diep_lightning.loading import fingerprint
from diep_lightning.frozen_moe import FrozenMoEModule, check_same_model
from diep_lightning.methods import BaselineModule, DiEPModule  # noqa: F401  (short names for --model=)

#: Exceptions that mean "the user asked for something that cannot work" (one line, exit 2).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError, FloatingPointError, KeyError)


#: OS errors that are the machine's fault (exit 1): disk full, quota, read-only file system, I/O error.
ENVIRONMENT_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class DiEPCLI(LightningCLI):
    """LightningCLI with the tokenizer of the calibration data tied to the model being pruned, and a resume
    (``--ckpt_path``) that refuses a checkpoint made for another model."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        from diep_lightning.callbacks import GlobalExpertPruning

        parser.set_defaults({"model": {"class_path": f"{DiEPModule.__module__}.{DiEPModule.__name__}"}})
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.trust_remote_code")
        # The pruning callback has its own top-level key, so `--prune.sparsity=0.25 --prune.mode=uniform` reach it
        # whatever else is in trainer.callbacks (`--trainer.callbacks.X` only reaches the last callback listed).
        # `--prune=null` drops it; a subclass of GlobalExpertPruning may be given by class path.
        parser.add_lightning_class_args(GlobalExpertPruning, "prune", subclass_mode=True, required=False)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Put ``prune`` first among the callbacks (it orchestrates the others after the search); drop it when null."""
        from diep_lightning.callbacks import GlobalExpertPruning

        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        prune = [c for c in callbacks if c is not None]
        if prune and any(isinstance(c, GlobalExpertPruning) for c in listed):
            raise ValueError("prune: pruning is set under prune: and again in trainer.callbacks; keep one (set its "
                             "options with --prune.X, or drop prune: with --prune=null)")
        return super()._instantiate_trainer({**config, "callbacks": prune + listed}, [])

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        record_new_log_dir(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI restores the checkpoint's hyperparameters over the command line's, so a checkpoint of
        another model would silently switch the model being pruned: read and check the checkpoint first."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return super()._parse_ckpt_path()
        recorded = read_checkpoint_identity(ckpt_path)
        given = self.config[subcommand].get("model.init_args.model_name_or_path")
        super()._parse_ckpt_path()
        saved = recorded.get("model_name_or_path")
        if given and saved and Path(str(given)).expanduser().resolve() != Path(str(saved)).expanduser().resolve():
            raise ValueError(f"ckpt_path: {ckpt_path} was made for model {saved!r}, but this run names {given!r}; "
                             f"resume with --model.model_name_or_path={saved}, or start without ckpt_path")
        if given:
            check_same_model(recorded, str(given), fingerprint(str(given)))


def read_checkpoint_identity(ckpt_path: str) -> dict[str, Any]:
    """The model a search checkpoint was made for; one line naming ``ckpt_path`` when it is not a readable
    checkpoint of this project."""
    import torch

    path = Path(ckpt_path)
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"))
        hint = f" (e.g. {found[-1]})" if found else ""
        raise IsADirectoryError(f"ckpt_path: {path} is a directory; give the .ckpt file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: {path} does not exist")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f"ckpt_path: {path} is not a readable checkpoint ({type(err).__name__}: {first}); give a "
                         ".ckpt written by a diep_lightning search") from None
    if not isinstance(ckpt, dict) or "diep" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path: {path} is not a diep_lightning search checkpoint (no alpha/beta state); give a "
                         ".ckpt written by a diep_lightning search")
    return ckpt["diep"]


def _innermost_message(err: BaseException) -> str:
    """One line for the user: the deepest cause's first line (the project's own ``argument: ...`` message),
    prefixed with the parser key it was given for when the message does not name one itself."""
    keys: list[str] = []  # nested parser keys, outermost first: "model" then "method" -> "model.method"
    while True:
        found = _PARSER_KEY.search(str(err))
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or not isinstance(nxt, Exception):
            break
        err = nxt
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError):
        text = text.strip("'\"")
    text = _PARSER_KEY.sub("", text.splitlines()[0]).strip() or text.splitlines()[0]
    if keys and not _NAMES_ARGUMENT.match(text):
        text = f"{'.'.join(keys)}: {text}"
    return text


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?')
_NAMES_ARGUMENT = re.compile(r"^[\w.\[\]]+: ")

#: (log folder, the highest folder above it the run creates, its trainer) of runs that had not yet written there
_NEW_LOG_DIRS: list[tuple[Path, Path, Any]] = []
#: what a logger and the CLI write into a run's log folder before the search has produced anything
_RUN_FILES = re.compile(r"^(events\.out\.tfevents\..*|hparams\.yaml|metrics\.csv|config\.yaml)$")


def record_new_log_dir(trainer: Any) -> None:
    """Note the trainer's log folder if this run is the one creating it (a new ``version_N``)."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    if not log_dir or not trainer.is_global_zero:
        return
    path = Path(log_dir).expanduser().resolve()
    if path.exists():
        return
    top = path
    while not top.parent.exists():
        top = top.parent
    _NEW_LOG_DIRS.append((path, top, trainer))


def remove_failed_run_dirs() -> None:
    """After a run that failed before its first training step, remove the log folders it created that hold
    nothing but the logger's and CLI's own files, so refused attempts do not pile up as empty ``version_N``
    folders; a run that trained, or a folder with anything else in it, stays."""
    import shutil

    for path, top, trainer in _NEW_LOG_DIRS:
        if getattr(trainer, "global_step", 0) or not path.is_dir() or any(not (f.is_file() and _RUN_FILES.match(f.name)) for f in path.rglob("*")):
            continue
        shutil.rmtree(path)
        parent = path.parent
        while path != top and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            if parent == top:
                break
            parent = parent.parent
    _NEW_LOG_DIRS.clear()


def cli(args: list[str] | None = None) -> DiEPCLI:
    """Build and run the CLI, raising on bad input (what tests that inspect exceptions call)."""
    import diep_lightning.callbacks  # noqa: F401  (registers the callbacks for short names on the CLI)

    return DiEPCLI(
        FrozenMoEModule,
        CalibrationDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )


def check_config_files(args: list[str]) -> None:
    """Parse every ``--config`` YAML first, so a syntax error names the file and line (jsonargparse's own
    message names neither)."""
    import yaml

    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    for path in paths:
        file = Path(path)
        if not file.is_file():
            continue  # jsonargparse also accepts inline YAML strings; it reports a missing file itself
        try:
            yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"config: {path} is not UTF-8 text") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config: {path}{where} is not valid YAML ({problem})") from None


def check_export_dir_flags(args: list[str]) -> None:
    """``export_dir`` values that the YAML parser would silently turn into something else: ``~`` is YAML's null (the
    default folder), and an empty or quoted-empty string would name a folder ``""``."""
    for arg in args:
        name, _, value = arg.partition("=")
        if not name.endswith(".export_dir") or not _:
            continue
        if value.strip() in ("~", "null", "None"):
            raise ValueError(f"export_dir: {value!r} reads as YAML's null (the default folder); write the folder out, "
                             "e.g. ~/pruned or an absolute path")
        if value.strip().strip("'\"").strip() == "":
            raise ValueError(f"export_dir: {value!r} names no folder; give a path")


def main(args: list[str] | None = None) -> DiEPCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); bad input exits 2 with a one-line ``error:``; a finished
    ``fit`` ends with a short summary."""
    import time

    from diep_lightning.summary import quiet, run_summary

    quiet()
    start = time.perf_counter()
    _NEW_LOG_DIRS.clear()
    try:
        try:
            check_config_files(sys.argv[1:] if args is None else args)
            check_export_dir_flags(sys.argv[1:] if args is None else args)
            result = cli(args)
        except Exception:
            remove_failed_run_dirs()
            raise
        _NEW_LOG_DIRS.clear()
        if getattr(result, "subcommand", None) == "fit" and result.trainer.is_global_zero:
            print(run_summary(result.trainer, time.perf_counter() - start), flush=True)
        return result
    except OSError as err:
        if err.errno in ENVIRONMENT_FAULTS:  # the machine's fault, not the input's: exit 1
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}{err.strerror or err}; free space or fix the permissions and rerun", file=sys.stderr)
            raise SystemExit(1) from None
        if not isinstance(err, USER_ERRORS):
            raise
        print(f"error: {_innermost_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as err:
        print(f"error: {_innermost_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # jsonargparse's ArgumentError and friends
        if type(err).__name__ in ("ArgumentError", "NSKeyError"):
            print(f"error: {_innermost_message(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        if type(err).__name__ == "MisconfigurationException":  # Lightning refusing a trainer setting
            print(f"error: trainer: {_innermost_message(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
