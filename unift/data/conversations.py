"""A file or folder as validated conversations: unift.data.readers yields its records, the converter of
its layout (unift.data.layouts, named or detected from the first record of each file) turns each into a
conversation. Untrainable records are counted and left out, or refuse the file (see unift.data.quality).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from unift.data.layouts import (
    CONVERTERS,
    KINDS,
    Converter,
    conversation_kind,
    detect_format,
    normalize_format,
)
from unift.data.quality import Skipped, Untrainable
from unift.data.readers import data_files, file_columns, iter_records
from unift.data.records import RECORD_KIND
from unift.data.templates import Message
from unift.errors import UniftError

# What to change when the data does not fit the run
STAGE_HINT = {"sft": "instruction data trains with --stage sft or grpo", "pairs": "pairs train with --stage dpo, orpo or simpo",
              "unpaired": "labelled answers train with --stage kto"}


def to_conversations(path: Path, fmt: str | None = None, columns: dict | None = None,
                     tags: dict | None = None) -> list[list[Message]]:
    """Every record of a file or folder as a validated conversation."""
    return [conv for _, conv in iter_conversations(path, fmt, columns, tags)]


def iter_conversations(
    path: Path, fmt: str | None = None, columns: dict | None = None, tags: dict | None = None,
    notes: Counter | None = None, formats: Counter | None = None, limit: int | None = None,
    skipped: Skipped | None = None, kind: str | None = None,
) -> Iterator[tuple[str, list[Message]]]:
    """(where, conversation) for the records of a file or folder, lazily, validated one by one.
    `notes` collects counted remarks (e.g. dropped leading turns), `formats` the format of each file.
    With `skipped`, records that cannot be trained are counted there and left out (see unift.data.quality);
    without it they refuse the file. With `kind` (sft, pairs, unpaired), a record of another kind refuses
    the file: preference data never trains as instruction data by accident, nor the reverse."""
    fmt = normalize_format(fmt)
    produced = 0
    for file in data_files(path):
        converter: Converter | None = None
        read = left_out = 0
        for number, record in iter_records(file):
            where = f"{file}: record {number}"
            if converter is None:
                try:
                    chosen = fmt or ("text" if file.suffix.lower() == ".txt" else detect_format(record, columns, tags))
                    converter = CONVERTERS[chosen](columns if file.suffix.lower() != ".txt" else None, tags)
                except UniftError as err:
                    raise UniftError(f"{file}: {err}") from None
                declared = file_columns(file)
                converter.check_columns(declared if declared is not None else list(record), str(file),
                                        declared is not None)
                if formats is not None:
                    formats[converter.format] += 1
            read += 1
            try:
                conversation = converter(record, where)
            except Untrainable as err:
                if skipped is None:
                    raise
                skipped.add(err)
                left_out += 1
                continue
            if kind is not None and conversation_kind(conversation) != RECORD_KIND.get(kind, kind):
                found = conversation_kind(conversation)
                raise UniftError(f"{where}: this record holds {KINDS[found]}, but the run trains on {KINDS[kind]}; "
                                 f"{STAGE_HINT[found]}")
            yield where, conversation
            produced += 1
            if limit is not None and produced >= limit:
                break
        if skipped is not None:
            skipped.refuse_if_most(file, left_out, read)
        if converter is not None and notes is not None:
            notes.update(converter.notes)
        if limit is not None and produced >= limit:
            return
