"""Reading data files and turning records into conversations, with one-line errors naming the
file, the record (1-based) and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unift.data.templates import Message
from unift.errors import UniftError


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON (a list of objects) or JSONL (one object per line) file."""
    if not path.exists():
        raise UniftError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UniftError(f"{path}: the file is empty")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not stripped.startswith("[")):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UniftError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UniftError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            raise UniftError(f"{path}: expected a list of records, found {type(records).__name__}")
    if not records:
        raise UniftError(f"{path}: no records")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UniftError(f"{path}: record {number}: expected an object, found {type(record).__name__}")
    return records


def _text(record: dict, field: str, where: str, required: bool) -> str:
    value = record.get(field)
    if value is None:
        if required:
            raise UniftError(f"{where}: field {field!r} is missing")
        return ""
    if not isinstance(value, str):
        raise UniftError(f"{where}: field {field!r} must be a string, found {type(value).__name__}")
    return value


def alpaca_to_messages(record: dict, where: str, columns: dict[str, str] | None = None) -> list[Message]:
    """An alpaca record {instruction, input, output, system?, history?} as a conversation."""
    col = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
           "history": "history", **(columns or {})}
    instruction = _text(record, col["prompt"], where, required=True)
    extra = _text(record, col["query"], where, required=False)
    output = _text(record, col["response"], where, required=True)
    if not instruction.strip() and not extra.strip():
        raise UniftError(f"{where}: field {col['prompt']!r} is empty")
    if not output.strip():
        raise UniftError(f"{where}: field {col['response']!r} is empty")
    messages: list[Message] = []
    system = _text(record, col["system"], where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(col["history"]) or []
    if not isinstance(history, list):
        raise UniftError(f"{where}: field {col['history']!r} must be a list of [question, answer] pairs")
    for turn, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UniftError(f"{where}: field {col['history']!r} turn {turn} must be a [question, answer] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction + extra)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


FORMATS = {"alpaca": alpaca_to_messages}


def detect_format(record: dict) -> str:
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise UniftError(f"cannot tell the format of a record with fields {sorted(record)}")


def to_conversations(path: Path, fmt: str | None = None, columns: dict | None = None) -> list[list[Message]]:
    records = read_records(path)
    fmt = fmt or detect_format(records[0])
    if fmt not in FORMATS:
        raise UniftError(f"{path}: unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    convert = FORMATS[fmt]
    return [convert(record, f"{path}: record {n}", columns) for n, record in enumerate(records, start=1)]
