"""Where calibration text comes from: the bundled C4 sample, C4 streamed from the hub, ``.jsonl`` / ``.txt`` files
or directories of them; each read as a list of documents, with one line naming the source when it cannot be."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

BUNDLED_C4_PATH = Path(__file__).resolve().parent / "assets" / "c4_en_train_sample256.jsonl"
TEXT_SUFFIXES = (".jsonl", ".txt")


# --------------------------------------------------------------------------------------------------
# checks (cheap: no file is read)
# --------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def normalize_sources(sources: Sequence[str] | str) -> list[str]:
    """``sources`` as a non-empty list of strings."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise ValueError("sources: empty list; give at least one source, e.g. sources='bundled'")
    return sources


def check_source(src: str, i: int) -> None:
    """Fail in one line naming ``sources[i]`` when the source cannot be read (before anything is read)."""
    tag = f"sources[{i}]={src!r}"
    if src == "bundled":
        if not BUNDLED_C4_PATH.is_file():
            raise FileNotFoundError(f"{tag}: the bundled sample {BUNDLED_C4_PATH} is missing; reinstall diep_lightning")
        return
    if src == "c4":
        if _offline():
            raise ValueError(
                f"{tag}: 'c4' streams allenai/c4 from the Hugging Face hub but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                "is set; use 'bundled' or a local .jsonl/.txt path"
            )
        return
    path = Path(src).expanduser()
    if path.is_dir():
        if not any(p.is_file() and p.suffix in TEXT_SUFFIXES for p in path.rglob("*")):
            raise FileNotFoundError(f"{tag}: directory has no .jsonl or .txt files; add some or point to another source")
        return
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"{tag}: file not found; fix the path (relative paths resolve from {os.getcwd()})")
        return
    raise ValueError(
        f"{tag}: unknown source; use 'bundled', 'c4', a .jsonl file, a .txt file or a directory of those"
    )


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text_field: str, tag: str) -> list[str]:
    docs: list[str] = []
    n_rows = 0
    for lineno, line in enumerate(_read_text(path, tag).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{tag}: {path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        n_rows += 1
        if not isinstance(row, dict) or text_field not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            hint = ""
            if isinstance(row, dict):
                str_fields = [k for k, v in row.items() if isinstance(v, str)]
                if str_fields:
                    hint = f"; set text_field={str_fields[0]!r}"
            raise ValueError(
                f"text_field={text_field!r} not found in {path} line {lineno} (fields: {fields}){hint or '; set text_field to the field holding the text'}"
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(
                f"text_field={text_field!r} in {path} line {lineno} holds a {type(text).__name__}, not a string; choose a text field"
            )
        if text.strip():
            docs.append(text)
    if n_rows == 0:
        raise ValueError(f"{tag}: file {path} is empty (no JSON lines); remove it from sources or add text")
    if not docs:
        raise ValueError(f"{tag}: file {path} has {n_rows} rows but every {text_field!r} is empty; remove it from sources")
    return docs


def _read_text(path: Path, tag: str) -> str:
    """The file as UTF-8 text; one line naming the source when it is binary or in another encoding."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"{tag}: a binary file, not text; give .jsonl or .txt files of UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{tag}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _read_txt(path: Path, tag: str) -> list[str]:
    text = _read_text(path, tag)
    if not text.strip():
        raise ValueError(f"{tag}: file {path} is empty (no text); remove it from sources or add text")
    return [text]


def _read_file(path: Path, text_field: str, tag: str) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, tag)
    return _read_txt(path, tag)


def local_documents(src: str, text_field: str, tag: str) -> list[str]:
    """Every non-empty document of a local source (``bundled``, a file or a directory)."""
    if src == "bundled":
        return _read_jsonl(BUNDLED_C4_PATH, "text", tag)
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        docs: list[str] = []
        for f in files:
            docs.extend(_read_file(f, text_field, f"{tag}, file {f}"))
        return docs
    return _read_file(path, text_field, tag)


def iter_c4(seed: int) -> Iterable[str]:
    """Non-empty documents of C4 ``en`` train streamed from the hub, shuffled with ``seed``."""
    try:
        from datasets import load_dataset

        ds = load_dataset("allenai/c4", "en", split="train", streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=2_000)
        for row in ds:
            text = row.get("text") or ""
            if text.strip():
                yield text
    except Exception as e:  # network / hub errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"sources: could not stream allenai/c4 ({type(e).__name__}: {first}); check the network or use 'bundled' / a local file"
        ) from e
