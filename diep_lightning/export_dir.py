"""Where an export may be written, and how it lands there without ever destroying a user's files.

The rules: an export never goes into, over or around the source model or the shipped models; an existing
path is replaced only with ``overwrite`` and only when every entry in it is something an export wrote (its
manifest, ``.diep_export.json``, lists them); the export is written to a hidden sibling folder and renamed into
place with a rename that fails rather than replace something that appeared meanwhile, and an export that finds
its target taken is kept beside it; one run at a time holds an export folder (a lock taken before the search);
a partial folder left by a killed run is removed by the next run that exports next to it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PRUNING_FILE = "pruning.json"
#: Written into every partial folder: which process owns it (so a later run can tell a dead one's leftovers).
PARTIAL_MARKER = ".diep_partial.json"
#: Written into every finished export: the files it wrote, so that overwrite replaces nothing else.
MANIFEST = ".diep_export.json"
#: Files the project writes into a finished export later (the lm-eval callback's summary).
WRITTEN_LATER = ("lm_eval.json",)
#: What an export written before manifests existed may hold (checked name by name when there is no manifest).
_LEGACY_NAMES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 PRUNING_FILE, "README.md", "modeling_diep.py", "experts_per_layer.png", "expert_scores.png",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", *WRITTEN_LATER)


def write_manifest(folder: Path) -> None:
    """List every file of a finished export in its manifest."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` that no export wrote (None: all of it is an export's), by its manifest, or for
    an older export without one by the names exports write."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            if listed is not None and any(f.startswith(name + "/") for f in listed):
                continue
            return name + "/"
        if name == MANIFEST or name in WRITTEN_LATER:
            continue
        if listed is not None:
            if name not in listed:
                return name
        elif not (name in _LEGACY_NAMES or (name.startswith("model-") and name.endswith(".safetensors"))):
            return name
    return None


def shipped_models_dir() -> Path | None:
    """``models/`` of the checkout this package runs from (editable installs), if there is one."""
    candidate = Path(__file__).resolve().parents[1] / "models"
    return candidate if candidate.is_dir() else None


def protected_paths(source: str | os.PathLike | None) -> list[Path]:
    """The source model's folder when it is local (the shipped models are always protected)."""
    return [Path(source).expanduser().resolve()] if source is not None and Path(source).expanduser().is_dir() else []


def check_export_dir(target: str | os.PathLike, overwrite: bool, protected: Iterable[Path] = (),
                     check_existing: bool = True) -> Path:
    """Refuse, in one line naming ``export_dir``, any target that could destroy a user's files; return it resolved.

    Raises:
        ValueError: the target is, contains or lies inside a protected folder.
        FileExistsError: the target exists and may not be replaced.
        NotADirectoryError / PermissionError: the target cannot be created.
    """
    final = Path(target).expanduser().resolve()
    shipped = shipped_models_dir()
    for folder in [*protected, *([shipped] if shipped else [])]:
        folder = Path(folder).resolve()
        if final == folder:
            relation = "is"
        elif folder.is_relative_to(final):
            relation = "contains"
        elif final.is_relative_to(folder):
            relation = "lies inside"
        else:
            continue
        raise ValueError(f"export_dir: {final} {relation} {folder}, which this run reads from and never writes to; "
                         "choose a folder outside it")
    limit = _name_max(final)
    if len(final.name) + 18 > limit:  # the hidden partial name is the folder's name plus 18 characters
        raise ValueError(f"export_dir: the folder name is {len(final.name)} characters; an export needs a hidden "
                         f"sibling 18 characters longer, and this file system allows {limit}; use a name of at most "
                         f"{limit - 18} characters")
    if check_existing and (final.exists() or final.is_symlink()):
        if not final.is_dir():
            raise FileExistsError(f"export_dir: {final} is an existing file; an export never replaces a file; choose "
                                  "another export_dir")
        if not overwrite:
            raise FileExistsError(f"export_dir: {final} already exists; choose another export_dir (overwrite=True "
                                  "replaces only a previous diep_lightning export)")
        check_replaceable(final)
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"export_dir: {ancestor} is a file, so {final} cannot be created; choose a "
                                 "writable export_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"export_dir: {ancestor} is not writable; choose a writable export_dir")
    remove_stale_partials(final)
    return final


def _name_max(final: Path) -> int:
    ancestor = final.parent
    while not ancestor.is_dir():
        ancestor = ancestor.parent
    try:
        return int(os.pathconf(ancestor, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_free_space(final: str | os.PathLike, needed: int) -> None:
    """Refuse before the search when the export's file system has less room than the export will surely take."""
    ancestor = Path(final).expanduser().resolve()
    while not ancestor.is_dir():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"the export needs at least {needed / 2**20:,.0f} MiB and {ancestor} has "
                      f"{free / 2**20:,.0f} MiB free; free space or choose another export_dir", str(final))


def check_replaceable(final: Path) -> None:
    """Refuse to replace a folder that is not a diep_lightning export, or that holds anything an export did not
    write, naming one such entry."""
    if not (final / PRUNING_FILE).is_file():
        raise FileExistsError(f"export_dir: {final} exists and is not a diep_lightning export (no {PRUNING_FILE}), "
                              "so overwrite=True will not replace it; choose another export_dir")
    stranger = foreign_entry(final)
    if stranger is not None:
        raise FileExistsError(f"export_dir: {final} holds {stranger}, which no export wrote, so overwrite=True will "
                              "not replace the folder; move that file out or choose another export_dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete the partial folders of ``final`` left by dead processes on this host (they carry our marker, so
    they were made by a run, never by the user); report any other leftover with the command to remove it."""
    removed = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    for leftover in sorted(parent.glob(f".{final.name}.partial-*")):
        marker = leftover / PARTIAL_MARKER
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            print(f"[diep_lightning] warning: {leftover} looks like an unfinished export of an older run; remove it "
                  f"with: rm -r '{leftover}'", file=sys.stderr)
            continue
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
            print(f"[diep_lightning] removed {leftover}, an unfinished export of a run that was killed "
                  f"(pid {owner.get('pid')})", file=sys.stderr)
    for old in sorted(parent.glob(f".{final.name}.old-*")):
        print(f"[diep_lightning] warning: {old} holds a previous export that a killed run was replacing; restore it "
              f"with: mv '{old}' '{final}' (if {final} is missing), or remove it", file=sys.stderr)
    return removed


def rename_no_replace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically where the OS allows (Linux
    ``renameat2(RENAME_NOREPLACE)``); False when ``dst`` exists."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _publishable(folder: Path) -> None:
    """Give the files the permissions a plain ``open()`` would (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


class ExportLock:
    """One run at a time per export folder: a lock file next to the nearest existing ancestor, taken before the
    search and given back when the export has landed (a dead process's lock on this host is taken over)."""

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final).expanduser().resolve()
        ancestor = self.final.parent
        while not ancestor.is_dir():
            ancestor = ancestor.parent
        digest = hashlib.sha1(str(self.final).encode()).hexdigest()[:12]
        self.path = ancestor / f".diep-export-{self.final.name[:40]}-{digest}.lock"
        self.held = False

    def acquire(self) -> ExportLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # a killed run's lock
                    continue
                raise FileExistsError(f"export_dir: another run (pid {owner.get('pid', '?')} on "
                                      f"{owner.get('host', '?')}) is exporting to {self.final}; wait for it to finish or "
                                      f"choose another export_dir (its lock: {self.path})") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "export": str(self.final)}))
            self.held = True
            return self
        raise FileExistsError(f"export_dir: could not lock {self.final} ({self.path})")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool, protected: Iterable[Path] = (),
                     keep_on_conflict: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder; move it to ``final`` only when the body completes.

    With ``keep_on_conflict`` (a run that has already searched), a ``final`` that exists and may not be replaced
    does not stop the write: the export is kept beside it.

    Raises:
        FileExistsError: ``final`` appeared while the body ran (another run), or may not be replaced; this run's
            export is kept under a visible ``<final>.conflict-*`` name and ``final`` is left untouched.
    """
    if keep_on_conflict:
        final = check_export_dir(final, True, protected, check_existing=False)
    else:
        final = check_export_dir(final, overwrite, protected)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.partial-{tag}"
    tmp.mkdir()
    (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / PARTIAL_MARKER).unlink()
    write_manifest(tmp)
    _publishable(tmp)
    old = None
    if overwrite and (final.exists() or final.is_symlink()):
        try:  # checked again at the swap: the folder may have changed during the search
            if not final.is_dir() or final.is_symlink():
                raise FileExistsError(f"export_dir: {final} is not a folder this run may replace")
            check_replaceable(final)
        except FileExistsError as err:
            keep = final.parent / f"{final.name}.conflict-{tag}"
            tmp.rename(keep)
            raise FileExistsError(f"{err}; this run's export is in {keep}") from None
        old = final.parent / f".{final.name}.old-{tag}"
        final.rename(old)
    if not rename_no_replace(tmp, final):
        if old is not None and not os.path.lexists(final):
            old.rename(final)
            old = None
        keep = final.parent / f"{final.name}.conflict-{tag}"
        tmp.rename(keep)
        raise FileExistsError(f"export_dir: {final} was created by someone else while this run exported; it was left "
                              f"untouched and this run's export is in {keep}")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
