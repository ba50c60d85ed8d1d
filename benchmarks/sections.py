"""Sections of RESULTS.md that other benchmarks own: each is written between its own markers, and
``benchmarks.run`` keeps them when it rewrites the rest of the report."""

from __future__ import annotations

import re
from pathlib import Path

from diep_lightning.outputs import save_text

_SECTION = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(results_md: Path, name: str, body: str) -> None:
    """Put ``body`` into RESULTS.md as section ``name``, replacing an earlier one."""
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    text = results_md.read_text() if results_md.is_file() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    save_text(results_md, text)


def publish(results_md: str | Path | None, name: str, body: str) -> None:
    """A benchmark's report: into RESULTS.md as section ``name`` unless ``results_md`` is empty, and printed."""
    if results_md:
        write_section(Path(results_md), name, body)
    print(body)


#: the hand-kept summary at the top of RESULTS.md ("what holds today"): a rewrite keeps it at the top
TODAY = "today"


def kept_sections(text: str, skip: tuple[str, ...] = (TODAY,)) -> str:
    """Every marked section of an earlier RESULTS.md but ``skip``, in order, to append to a rewritten report."""
    found = [m.group(0) for m in _SECTION.finditer(text) if m.group(1) not in skip]
    return "".join(f"\n{s}\n" for s in found)


def today_section(text: str) -> str:
    """The earlier RESULTS.md's summary section (markers included), or nothing."""
    begin, end = markers(TODAY)
    return text[text.index(begin): text.index(end) + len(end)] + "\n" if begin in text and end in text else ""
