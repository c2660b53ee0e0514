"""Read dataset files into records: JSON lists, JSONL and plain text, with strict encoding rules.

Encoding: UTF-8, with or without a byte-order mark (files saved by Windows tools and Excel start with one). Any
other encoding (Latin-1, UTF-16, …) is refused with the file and the line of the first undecodable byte and the
fix (re-save as UTF-8). A ``.json`` file must hold a *list* of records; a top-level object (``{"data": [...]}``)
is refused with that explanation.

Each record comes with ``where`` ("FILE line N" for JSONL and text, "FILE item N" for a JSON list) so every later
error can name it.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError

TEXT_SUFFIXES = (".txt", ".text", ".md")
_REENCODE = "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`, or 'Save as UTF-8' in the editor)"


@dataclass(frozen=True)
class Record:
    """One raw record of a dataset file: its parsed value, where it came from, and its 1-based number."""

    value: object
    where: str
    number: int


def read_text_utf8(path: Path) -> str:
    """The file decoded as UTF-8 (a leading BOM is dropped); other encodings raise with the file and line."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not raw.startswith(codecs.BOM_UTF8):
        raise LorascopeError(f"{path} is UTF-16 encoded (it starts with a UTF-16 byte-order mark)", fix=_REENCODE)
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorascopeError(
            f"{path} line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}: the file is in "
            "another encoding, e.g. Latin-1 or Windows-1252)",
            fix=_REENCODE,
        ) from None


def _top_level_object_error(path: Path) -> LorascopeError:
    return LorascopeError(
        f"{path}: the top level is a JSON object, but it must be a list of records (or use JSONL)",
        fix='write [ {...}, {...} ] or one JSON object per line; e.g. take the list out of {"data": [...]}',
    )


def _json_list(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LorascopeError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})", fix="fix the file or use JSONL"
        ) from exc
    if isinstance(value, dict):
        raise _top_level_object_error(path)
    if not isinstance(value, list):
        raise LorascopeError(
            f"{path}: the top level is a JSON {type(value).__name__}, not a list of records",
            fix="write [ {...}, {...} ] or one JSON object per line",
        )
    return [Record(rec, f"{path} item {i}", i) for i, rec in enumerate(value)]


def _jsonl(path: Path, text: str) -> list[Record]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == 1 and line.strip() == "{":  # a pretty-printed object: JSON, not JSONL
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    raise _top_level_object_error(path) from None
            raise LorascopeError(
                f"{path} line {lineno} is not valid JSON ({exc.msg})",
                fix="one JSON object per line (JSONL), or a JSON list in a .json file",
            ) from exc
        out.append(Record(rec, f"{path} line {lineno}", lineno))
    if len(out) == 1 and isinstance(out[0].value, dict) and _wraps_records(out[0].value):
        raise _top_level_object_error(path)
    return out


def _wraps_records(obj: dict) -> bool:
    """An object whose only job is to hold a list of records ({"data": [{...}, ...]})."""
    return any(isinstance(v, list) and v and all(isinstance(x, dict) for x in v) for v in obj.values()) and not any(
        k in obj for k in ("messages", "conversations", "instruction", "text", "instances")
    )


def _paragraphs(path: Path, text: str) -> list[Record]:
    """Plain text: one document per paragraph (blocks separated by one or more blank lines)."""
    out, block, start = [], [], 0
    for lineno, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            out.append(Record({"text": "\n".join(block)}, f"{path} line {start}", start))
            block = []
    return out


def read_records(path: str | Path) -> list[Record]:
    """Records of a dataset file: ``.json`` (a list), ``.jsonl`` / other (JSONL), ``.txt``/``.md`` (paragraphs)."""
    path = Path(path)
    if not path.is_file():
        raise LorascopeError(
            f"dataset file {path} does not exist",
            fix="check the path (JSON, JSONL or .txt; see README 'Your own data')",
        )
    text = read_text_utf8(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return _paragraphs(path, text)
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_list(path, text)
    if path.suffix.lower() == ".json" and stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise _top_level_object_error(path)
    return _jsonl(path, text)


__all__ = ["TEXT_SUFFIXES", "Record", "read_records", "read_text_utf8"]
