"""Dataset formats and their auto-detection.

Detected from the fields of the first record (the first match wins, in this order):

=============  ============================================================  =====================================
format         fields of one record                                          trained on / extracted
=============  ============================================================  =====================================
``chat``       ``messages``: ``[{"role": "system"|"user"|"assistant",        loss on assistant turns only;
               "content": str}, ...]`` (OpenAI / HF chat format)             rendered with the chat template
``sharegpt``   ``conversations``: ``[{"from": "human"|"gpt"|"system",        as ``chat`` (human -> user,
               "value": str}, ...]``                                         gpt -> assistant)
``alpaca``     ``instruction``, ``output``, optional ``input``               loss on the output
               (or the seed-task layout ``instruction`` + ``instances``)
``text``       ``text``: str (JSONL), or a ``.txt`` file: one document per   every token, no chat template
               paragraph (blocks separated by blank lines)
=============  ============================================================  =====================================

Nothing matches: one line naming the fields each format expects. A later record that lacks its format's field
names the file, the line and the missing field. ``columns`` renames a dataset's own field names to these
(``{"instruction": "question", "output": "answer"}``) before detection, for local files and hub datasets alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from lorascope.data.examples import Example, _record_to_example
from lorascope.data.records import Record
from lorascope.errors import LorascopeError

FORMATS = ("chat", "sharegpt", "alpaca", "text")
EXPECTED_FIELDS = (
    "'messages' (chat: [{role, content}]), 'conversations' (ShareGPT: [{from, value}]), "
    "'instruction' + 'output' (Alpaca) or 'text' (plain text)"
)
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_DETECT = (
    ("chat", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "instances")),
    ("text", ("text",)),
)


def rename_columns(value: object, columns: Mapping[str, str] | None) -> object:
    """Record with the dataset's field names mapped to lorascope's (``columns``: {lorascope_field: dataset_field})."""
    if not columns or not isinstance(value, dict):
        return value
    out = {k: v for k, v in value.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in value:
            out[ours] = value[theirs]
    return out


def detect_format(records: Sequence[Record], source: str) -> str:
    """The format of the first record (by its fields); raises one line naming the expected fields otherwise."""
    if not records:
        raise LorascopeError(f"dataset {source} has no records", fix="give a non-empty file")
    first = records[0]
    if not isinstance(first.value, dict):
        raise LorascopeError(
            f"{first.where}: expected a JSON object, got {type(first.value).__name__}",
            fix=f"give one object per record with {EXPECTED_FIELDS}",
        )
    for fmt, keys in _DETECT:
        if any(k in first.value for k in keys):
            return fmt
    found = ", ".join(sorted(map(str, first.value))) or "none"
    raise LorascopeError(
        f"{first.where}: no known dataset format (fields found: {found})",
        fix=f"give {EXPECTED_FIELDS}; or map your field names with the data *_columns setting",
    )


def _content(value: object) -> str | None:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": ...}] joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def _turns(
    rec: dict, where: str, field: str, role_key: str, text_key: str, roles: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    msgs = rec.get(field)
    if not isinstance(msgs, list) or not msgs:
        what = f"missing field '{field}'" if field not in rec else f"field '{field}' must be a non-empty list"
        raise LorascopeError(
            f"{where}: {what}", fix=f"each record needs '{field}': [{{'{role_key}': ..., '{text_key}': ...}}, ...]"
        )
    turns = []
    for i, m in enumerate(msgs):
        missing = [k for k in (role_key, text_key) if not isinstance(m, dict) or k not in m]
        if missing:
            raise LorascopeError(
                f"{where}: {field}[{i}] is missing field '{missing[0]}'",
                fix=f"every turn needs '{role_key}' and '{text_key}'",
            )
        role, text = roles.get(str(m[role_key]).lower()), _content(m[text_key])
        if role is None:
            raise LorascopeError(
                f"{where}: {field}[{i}] has {role_key} {m[role_key]!r}", fix=f"use one of {', '.join(sorted(roles))}"
            )
        if text is None:
            raise LorascopeError(
                f"{where}: {field}[{i}] field '{text_key}' must be a string", fix="give the turn's text as a string"
            )
        turns.append((role, text))
    return tuple(turns)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def chat_example(turns: tuple[tuple[str, str], ...], source: str, number: int) -> Example:
    """An Example from chat turns; ``instruction``/``output`` hold the first user / last assistant turn."""
    users = [t for r, t in turns if r == "user"]
    answers = [t for r, t in turns if r == "assistant"]
    first = users[0] if users else turns[0][1]
    return Example(
        f"{source}:{number}:{_digest(repr(turns))}", first, "", answers[-1] if answers else "", messages=turns
    )


def text_example(text: str, source: str, number: int) -> Example:
    return Example(f"{source}:{number}:{_digest(text)}", text[:80], text=text)


def record_to_example(rec: Record, fmt: str, source: str) -> Example:
    """Convert one record of a known format; a missing or malformed field names ``rec.where``."""
    value = rec.value
    if fmt == "alpaca":
        return _record_to_example(value, rec.where, source, rec.number)
    if not isinstance(value, dict):
        raise LorascopeError(
            f"{rec.where}: expected a JSON object, got {type(value).__name__}",
            fix=f"give one object per record ({fmt} format)",
        )
    if fmt == "chat":
        roles = {r: r for r in CHAT_ROLES}
        return chat_example(_turns(value, rec.where, "messages", "role", "content", roles), source, rec.number)
    if fmt == "sharegpt":
        turns = _turns(value, rec.where, "conversations", "from", "value", SHAREGPT_ROLES)
        return chat_example(turns, source, rec.number)
    if fmt == "text":
        if not isinstance(value.get("text"), str):
            what = "missing field 'text'" if "text" not in value else "field 'text' must be a string"
            raise LorascopeError(f"{rec.where}: {what}", fix="each record needs a string field 'text'")
        return text_example(value["text"], source, rec.number)
    raise LorascopeError(f"unknown dataset format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")


def records_to_examples(
    records: Sequence[Record], source: str, columns: Mapping[str, str] | None = None, fmt: str | None = None
) -> tuple[str, list[Example]]:
    """(detected format, examples) of ``records``; empty text documents are dropped."""
    if columns:
        records = [Record(rename_columns(r.value, columns), r.where, r.number) for r in records]
    fmt = fmt or detect_format(records, source)
    examples = [record_to_example(r, fmt, source) for r in records]
    if fmt == "text":
        examples = [e for e in examples if e.text and e.text.strip()]
    if not examples:
        raise LorascopeError(f"dataset {source} has no examples", fix="give a non-empty dataset")
    return fmt, examples


__all__ = [
    "CHAT_ROLES",
    "EXPECTED_FIELDS",
    "FORMATS",
    "SHAREGPT_ROLES",
    "chat_example",
    "detect_format",
    "record_to_example",
    "records_to_examples",
    "rename_columns",
    "text_example",
]
