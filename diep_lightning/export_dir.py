"""Where an export may be written, and how it lands there without ever destroying a user's files.

The rules: an export never goes into, over or around the source model or the shipped models; an existing
path is replaced only with ``overwrite`` and only when it is itself a previous export (it has
``pruning.json``); the export is written to a hidden sibling folder and renamed into place with a rename that
fails rather than replace something that appeared meanwhile; a partial folder left by a killed run is
removed by the next run that exports next to it.
"""

from __future__ import annotations

import ctypes
import errno
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


def shipped_models_dir() -> Path | None:
    """``models/`` of the checkout this package runs from (editable installs), if there is one."""
    candidate = Path(__file__).resolve().parents[1] / "models"
    return candidate if candidate.is_dir() else None


def protected_paths(source: str | os.PathLike | None) -> list[Path]:
    """The source model's folder when it is local (the shipped models are always protected)."""
    return [Path(source).expanduser().resolve()] if source is not None and Path(source).expanduser().is_dir() else []


def check_export_dir(target: str | os.PathLike, overwrite: bool, protected: Iterable[Path] = ()) -> Path:
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
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise FileExistsError(f"export_dir: {final} is an existing file; an export never replaces a file; choose "
                                  "another export_dir")
        if not overwrite:
            raise FileExistsError(f"export_dir: {final} already exists; choose another export_dir (overwrite=True "
                                  "replaces only a previous diep_lightning export)")
        if not (final / PRUNING_FILE).is_file():
            raise FileExistsError(f"export_dir: {final} exists and is not a diep_lightning export (no {PRUNING_FILE}), "
                                  "so overwrite=True will not replace it; choose another export_dir")
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


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a hidden sibling folder; move it to ``final`` only when the body completes.

    Raises:
        FileExistsError: ``final`` appeared while the body ran (another run); this run's export is kept under a
            visible ``<final>.conflict-*`` name and ``final`` is left untouched.
    """
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
    _publishable(tmp)
    old = None
    if final.exists() and overwrite and (final / PRUNING_FILE).is_file():
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
