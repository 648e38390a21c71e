"""Files to raw records: the data files of a --data path and the records in each, read lazily, with
one-line errors naming the file, the record (1-based) and the line or byte where it breaks.

File types: JSON (a list of objects, read incrementally, or a single object), JSONL, CSV, Parquet, plain
text (one document per line), or a folder of them. Text must be UTF-8, with or without a byte order mark.
Turning records into conversations is unift.data.layouts' job.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unift.data.quality import not_utf8
from unift.errors import UniftError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
CHUNK = 1 << 20  # JSON is read a megabyte at a time, so a file larger than memory can stream


def data_files(path: Path) -> list[Path]:
    """The data files of a --data path: the file itself, or every data file under a folder, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UniftError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
        return files
    if not path.exists():
        raise UniftError(f"{path}: no such file")
    return [path]


def _json_error(path: Path, err: json.JSONDecodeError, line_offset: int, record: int | None) -> UniftError:
    where = f"{path}: record {record}: " if record else f"{path}: "
    return UniftError(f"{where}invalid JSON at line {err.lineno + line_offset} column {err.colno} ({err.msg})")


class _JsonBuffer:
    """A JSON file read a chunk at a time: the text not yet consumed, the position in it, and how many
    lines came before it (error messages name the file's line)."""

    def __init__(self, handle: Any, path: Path) -> None:
        self.handle, self.path = handle, path
        self.buf, self.pos, self.lines_before, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def fill(self) -> bool:
        """Read the next chunk onto what is left; False once the file is exhausted."""
        if self.eof:
            return False
        chunk = self.handle.read(CHUNK)
        self.eof = not chunk
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return bool(chunk)

    def skip_space(self) -> str:
        """The next character that is not whitespace, left unconsumed ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def decode(self, number: int) -> Any:
        """The JSON value at the position (record `number`), reading on while it continues past the buffer."""
        while True:
            try:
                item, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return item
            except json.JSONDecodeError as err:
                if not self.fill():  # the item may just continue past the buffer; only at EOF is it broken
                    raise _json_error(self.path, err, self.lines_before, number) from None


def _iter_json(path: Path) -> Iterator[Any]:
    """Items of a JSON array, decoded one at a time from a buffer (a single object is one record)."""
    with path.open(encoding="utf-8-sig") as handle:
        text = _JsonBuffer(handle, path)
        first = text.skip_space()
        if not first:
            raise UniftError(f"{path}: the file is empty")
        if first == "{":  # one object, not a list: read it whole
            whole = text.buf[text.pos:] + handle.read()
            try:
                yield json.loads(whole)
            except json.JSONDecodeError as err:
                raise _json_error(path, err, text.lines_before, None) from None
            return
        if first != "[":
            raise UniftError(f"{path}: invalid JSON: expected a list of records, found {first!r}")
        text.pos += 1
        yield from _json_list_items(path, text)


def _json_list_items(path: Path, text: _JsonBuffer) -> Iterator[Any]:
    """The items of the list whose '[' was just consumed, then a check that only whitespace follows it."""
    number = 0
    while True:
        char = text.skip_space()
        if char == "]":
            break
        if number and char == ",":
            text.pos += 1
            char = text.skip_space()
        elif number:
            raise UniftError(f"{path}: record {number}: invalid JSON after it (expected ',' or ']')")
        if not char:
            raise UniftError(f"{path}: invalid JSON: the file ends inside the list")
        number += 1
        yield text.decode(number)
    text.pos += 1
    if text.skip_space():
        raise UniftError(f"{path}: invalid JSON: text after the end of the list")


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record number, record) for every record of one file, read lazily. Text is UTF-8, with or without
    a byte order mark; anything else is one line naming the byte offset."""
    try:
        yield from _records(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UniftError(f"{path}: the file is empty")
    number = 0
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise UniftError(f"{path}: the file is empty")
            for number, row in enumerate(reader, start=1):
                if None in row:
                    raise UniftError(f"{path}: record {number}: more cells than the header has columns")
                yield number, row
        if not number:
            raise UniftError(f"{path}: no records (only a header)")
        return
    if suffix == ".txt":
        with path.open(encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    number += 1
                    yield number, {"text": line.rstrip("\n")}
        if not number:
            raise UniftError(f"{path}: the file is empty")
        return
    if suffix == ".json":
        items: Iterator[Any] = _iter_json(path)
    else:  # .jsonl and anything else: one object per line
        items = _iter_jsonl(path)
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UniftError(f"{path}: record {number}: expected an object, found {type(item).__name__}")
        yield number, item
    if not number:
        raise UniftError(f"{path}: no records (an empty list)" if suffix == ".json" else f"{path}: the file is empty")


def _iter_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise UniftError(f"{path}: line {line_number}: invalid JSON ({err.msg})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq  # datasets' own Arrow backend

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise UniftError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row
    if not number:
        raise UniftError(f"{path}: no records")


def file_columns(path: Path) -> list[str] | None:
    """Column names when the file declares them (CSV header, Parquet schema), else None."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), None)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception:
            return None  # iter_records reports the unreadable file
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a file (JSON, JSONL, CSV, Parquet or text), validated as objects."""
    return [record for _, record in iter_records(data_files(path)[0] if path.is_dir() else path)]
