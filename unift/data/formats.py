"""The former home of reading and converting, split into unift.data.readers (files -> records),
unift.data.layouts (records -> conversations) and unift.data.conversations (the two joined).

Kept only as a re-export for importers outside unift/data (unift.models.runcard imports DATA_SUFFIXES);
delete it once they import from the modules above.
"""

from __future__ import annotations

from unift.data.conversations import iter_conversations, to_conversations
from unift.data.layouts import CONVERTERS, FORMATS, check_turns, detect_format, normalize_format
from unift.data.readers import DATA_SUFFIXES, data_files, file_columns, iter_records, read_records

__all__ = [
    "CONVERTERS",
    "DATA_SUFFIXES",
    "FORMATS",
    "check_turns",
    "data_files",
    "detect_format",
    "file_columns",
    "iter_conversations",
    "iter_records",
    "normalize_format",
    "read_records",
    "to_conversations",
]
