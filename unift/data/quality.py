"""Real-world files: records that cannot be trained, and text that is not UTF-8.

Published datasets carry a few records with nothing to learn from (the Stanford Alpaca file has outputs
that are empty strings; scraped chats end on a user turn). Such a record is skipped, counted and reported
with its record number; `--strict_data` refuses the file instead. A file where most records are unusable
is refused all the same: that is a column mapping or format mistake, not noise. Structural problems
(not JSON, wrong types, a mapping that names nothing) always refuse the file.
"""

from __future__ import annotations

import codecs
from collections import Counter
from pathlib import Path
from typing import Any

from unift.errors import UniftError

SHOWN = 5  # record numbers kept for the report


class Untrainable(UniftError):
    """A well-formed record with nothing to train on (an empty answer, no final assistant turn)."""


class Skipped:
    """Untrainable records of one source: how many, the first few (file and record number), and why."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.count = 0
        self.first: list[str] = []
        self.reasons: Counter = Counter()

    def add(self, err: Untrainable) -> None:
        """Record a skipped record, or raise it under --strict_data."""
        if self.strict:
            raise UniftError(f"{err} (--strict_data refuses records that cannot be trained)") from None
        self.count += 1
        text = str(err)
        where, sep, reason = text.partition(": field ")  # "FILE: record N: field 'output' is empty"
        if sep:
            reason = "field " + reason
        else:
            where, _, reason = text.rpartition(": ")
        if len(self.first) < SHOWN:
            self.first.append(where)
        self.reasons[reason] += 1

    def refuse_if_most(self, file: Path, skipped: int, read: int) -> None:
        """A file in which most records cannot be trained is a mapping mistake: refuse it."""
        if read and skipped * 2 > read:
            reason = self.reasons.most_common(1)[0][0]
            raise UniftError(f"{file}: {skipped} of {read} records cannot be trained (e.g. {self.first[0]}: "
                             f"{reason}); check the format and column mapping")

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": list(self.first), "reasons": dict(self.reasons)}


def skipped_summary(name: str, skipped: dict[str, Any] | None) -> str | None:
    """One line for logs and reports: '3 records skipped (cannot be trained): a.json: record 285, ...'."""
    if not skipped or not skipped.get("count"):
        return None
    count = skipped["count"]
    shown = ", ".join(_short(w) for w in skipped["first"]) + (", ..." if count > len(skipped["first"]) else "")
    reasons = "; ".join(f"{r} ({n})" for r, n in sorted(skipped["reasons"].items(), key=lambda x: -x[1]))
    return f"{name}: {count} record{'s' if count != 1 else ''} skipped, nothing to train on: {shown} [{reasons}]"


def _short(where: str) -> str:
    """'/long/path/file.json: record 285' -> 'file.json: record 285'."""
    path, sep, rest = where.partition(": ")
    return f"{Path(path).name}{sep}{rest}"


def not_utf8(path: Path) -> UniftError:
    """One line naming the file and the byte offset of the first byte that is not UTF-8."""
    with path.open("rb") as raw:
        head = raw.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return UniftError(f"{path}: the file is UTF-16 (byte order mark at byte 0); save it as UTF-8")
        raw.seek(0)
        offset, pending = 0, b""  # file offset of pending[0]; pending: bytes not yet decoded
        while True:
            chunk = raw.read(1 << 16)
            pending += chunk
            try:
                pending.decode("utf-8")
                offset, pending = offset + len(pending), b""
            except UnicodeDecodeError as err:
                if chunk and err.reason == "unexpected end of data":  # a character cut at the chunk's end
                    offset, pending = offset + err.start, pending[err.start:]
                    continue
                return UniftError(f"{path}: not UTF-8 text: invalid byte 0x{pending[err.start]:02x} at byte "
                                  f"offset {offset + err.start} (convert the file to UTF-8, e.g. "
                                  "iconv -f GBK -t UTF-8)")
            if not chunk:
                break
    return UniftError(f"{path}: not UTF-8 text")
