"""The kit's task files: the YAML templates in ``tasks/`` rendered for a data directory (lm-eval needs absolute
``data_files``), listed, and checked by name; :mod:`diep_lightning.evaluation.kit` evaluates with them."""

from __future__ import annotations

import atexit
import difflib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("diep_lightning.evaluation.kit")

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "tasks"
SHIPPED_DATA_DIR = HERE / "data"
PLACEHOLDER = "@DATA_DIR@"
#: Written into a folder that ``render_tasks`` rendered into: a later render may replace its files.
RENDER_MARKER = ".diep_kit_tasks"
DEFAULT_TASKS = ("kit_blimp", "kit_wikitext2")
_PATH_RE = re.compile(re.escape(PLACEHOLDER) + r"/([^\"'\n]+)")
_NAME_RE = re.compile(r"^(task|group):\s*(\S+)\s*$", re.M)


# --------------------------------------------------------------------------------------------------
# data directory and rendering
# --------------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``../shared/data/eval`` next to the repository root if present, else the shipped subset."""
    repo_data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "eval"
    return repo_data.resolve() if repo_data.is_dir() else SHIPPED_DATA_DIR


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Absolute data directory (``None``: :func:`default_data_dir`; ``"shipped"``: the shipped subset)."""
    if data_dir is None:
        return default_data_dir()
    if str(data_dir) == "shipped":
        return SHIPPED_DATA_DIR
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} is not a directory; pass the eval data directory, 'shipped', or None"
        )
    return path


@dataclass
class RenderedKit:
    """Kit tasks rendered for one data directory."""

    data_dir: Path
    task_dir: Path
    tasks: list[str] = field(default_factory=list)  # leaf tasks whose files exist
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> members present
    missing: dict[str, list[str]] = field(default_factory=dict)  # leaf task -> missing files
    all_groups: dict[str, list[str]] = field(default_factory=dict)  # group -> all template members

    @property
    def names(self) -> list[str]:
        return sorted(set(self.tasks) | set(self.groups))

    def top_level(self) -> list[str]:
        """Groups not inside another group, and tasks in no group."""
        members = {m for ms in self.all_groups.values() for m in ms}
        return sorted(n for n in self.names if n not in members)

    def leaves(self, name: str) -> list[str]:
        """The leaf tasks under ``name`` (itself if it is a task), from the templates."""
        if name in self.all_groups:
            return [leaf for m in self.all_groups[name] for leaf in self.leaves(m)]
        return [name]


_RENDERED: dict[Path, RenderedKit] = {}
_MANAGERS: dict[tuple[Path, bool], Any] = {}


def _cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _yaml_dq_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def render_tasks(data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> RenderedKit:
    """Write the kit task YAMLs with their data paths pointing into ``data_dir``.

    Args:
        data_dir: Evaluation data directory (see :func:`resolve_data_dir`).
        out_dir: Where to write the YAMLs; default a temporary directory removed at exit. Renders into
            a temporary directory are cached per data directory.

    Returns:
        A :class:`RenderedKit` (``task_dir`` is the ``include_path`` for lm-eval's ``TaskManager``).
    """
    ddir = resolve_data_dir(data_dir)
    if out_dir is None and ddir in _RENDERED and _RENDERED[ddir].task_dir.is_dir():
        return _RENDERED[ddir]
    if out_dir is None:
        task_dir = Path(tempfile.mkdtemp(prefix="diep_kit_tasks_"))
        atexit.register(_cleanup, task_dir)
    else:
        task_dir = Path(out_dir).expanduser().resolve()
        _check_render_dir(task_dir)
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / RENDER_MARKER).write_text("kit task YAMLs rendered by diep_lightning.evaluation\n", encoding="utf-8")
    kit = RenderedKit(data_dir=ddir, task_dir=task_dir)
    prefix = _yaml_dq_escape(ddir.as_posix())
    group_files: dict[str, tuple[Path, dict]] = {}
    for src in _templates():
        rel = src.relative_to(TEMPLATES_DIR)
        text = src.read_text(encoding="utf-8")
        names = dict((k, v) for k, v in _NAME_RE.findall(text))
        if "group" in names:
            cfg = yaml.safe_load(text)
            group_files[cfg["group"]] = (rel, cfg)
            kit.all_groups[cfg["group"]] = list(cfg.get("task") or [])
            continue
        if "task" in names:
            missing = [p for p in _PATH_RE.findall(text) if not (ddir / p).is_file()]
            if missing:
                kit.missing[names["task"]] = missing
                continue
            kit.tasks.append(names["task"])
        dst = task_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text.replace(PLACEHOLDER, prefix), encoding="utf-8")
    # groups, innermost first: keep the members that are present
    present = set(kit.tasks)
    for _ in range(len(group_files) + 1):
        changed = False
        for g, (_rel, cfg) in group_files.items():
            members = [m for m in cfg.get("task") or [] if m in present]
            if members and g not in present:
                present.add(g)
                changed = True
        if not changed:
            break
    for g, (rel, cfg) in group_files.items():
        members = [m for m in cfg.get("task") or [] if m in present]
        if not members:
            continue
        kit.groups[g] = members
        cfg = dict(cfg, task=members)
        dst = task_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    if kit.missing:
        log.info("kit tasks left out (files missing in %s): %s", ddir, ", ".join(sorted(kit.missing)))
    if out_dir is None:
        _RENDERED[ddir] = kit
    return kit


def _templates() -> list[Path]:
    """The task and group YAML templates, in rendering order."""
    return [src for src in sorted(TEMPLATES_DIR.rglob("*")) if src.is_file() and "__pycache__" not in src.parts
            and (src.suffix == ".yaml" or src.name.endswith("_yaml"))]


def _check_render_dir(task_dir: Path) -> None:
    """Refuse a folder where rendering would replace a file that no earlier render wrote."""
    if task_dir.exists() and not task_dir.is_dir():
        raise NotADirectoryError(f"out_dir: {task_dir} is a file; name a new or empty folder")
    if not task_dir.is_dir() or (task_dir / RENDER_MARKER).is_file():
        return
    for src in _templates():
        clash = task_dir / src.relative_to(TEMPLATES_DIR)
        if clash.exists():
            raise FileExistsError(f"out_dir: {clash} exists and no earlier render wrote it; name a new or empty "
                                  "folder")


def list_kit_tasks(data_dir: str | os.PathLike | None = None, include_subtasks: bool = False) -> list[str]:
    """Kit task and group names available for ``data_dir``.

    Args:
        data_dir: Evaluation data directory (``None``: repo data if present, else the shipped subset).
        include_subtasks: Also list group members (``kit_blimp_<paradigm>``, ``kit_mmlu_<subject>``, ...).
    """
    kit = render_tasks(data_dir)
    return kit.names if include_subtasks else kit.top_level()


def get_task_manager(data_dir: str | os.PathLike | None = None, include_defaults: bool = False):
    """A cached lm-eval ``TaskManager`` indexing the kit tasks (plus lm-eval's own with ``include_defaults``)."""
    from lm_eval.tasks import TaskManager

    kit = render_tasks(data_dir)
    key = (kit.data_dir, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=str(kit.task_dir), include_defaults=include_defaults)
    return _MANAGERS[key]


# --------------------------------------------------------------------------------------------------
# task-name checks
# --------------------------------------------------------------------------------------------------
def _parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    else:
        names = [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ValueError("tasks: empty; give task names, e.g. tasks=('kit_blimp', 'kit_wikitext2')")
    return list(dict.fromkeys(names))


def _unknown_task_error(name: str, kit: RenderedKit, extra: Sequence[str] = ()) -> ValueError:
    guess = [f"kit_{name}"] if f"kit_{name}" in kit.names else []
    for pool in (kit.names + sorted(kit.missing), list(extra)):  # prefer kit names over hub names
        guess = guess or difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    hint = f" did you mean {guess[0]!r}?" if guess else ""
    return ValueError(
        f"tasks: unknown task {name!r};{hint} kit tasks: {', '.join(kit.top_level())} "
        "(group members: list_kit_tasks(include_subtasks=True))"
    )


def _check_tasks(names: list[str], kit: RenderedKit) -> bool:
    """Raise for unknown / unavailable kit names; return whether lm-eval's default tasks are needed."""
    need_defaults = False
    for n in names:
        if n in kit.names:
            continue
        leaves = kit.leaves(n)
        if n in kit.missing or (n in kit.all_groups and all(leaf in kit.missing for leaf in leaves)):
            files = sorted({f for leaf in leaves for f in kit.missing.get(leaf, [])})
            shown = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
            raise FileNotFoundError(
                f"tasks: {n!r} needs {shown} under data_dir={str(kit.data_dir)!r}; add the files or use data_dir=None / 'shipped'"
            )
        if n.startswith("kit_"):
            raise _unknown_task_error(n, kit)
        need_defaults = True
    return need_defaults


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
