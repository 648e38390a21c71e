"""Data: files -> records -> conversations, templates, the dataset registry, tokenization with prompt masking,
cached parallel tokenization, splitting and mixing, streaming."""

from __future__ import annotations

from unift.data.conversations import iter_conversations, to_conversations
from unift.data.layouts import FORMATS, detect_format
from unift.data.pipeline import (
    DataBundle,
    DataOptions,
    Source,
    build_datasets,
    cutoff_summary,
    load_conversations,
    load_sources,
)
from unift.data.readers import read_records
from unift.data.registry import DatasetEntry, resolve_dataset
from unift.data.templates import TEMPLATES, Message, get_template, resolve_template, template_definition
from unift.data.tokenize import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    segments,
    tokenize_conversations,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "DataBundle",
    "DataOptions",
    "DatasetEntry",
    "Message",
    "Source",
    "build_datasets",
    "cutoff_summary",
    "detect_format",
    "encode_conversation",
    "encode_prompt",
    "get_template",
    "iter_conversations",
    "load_conversations",
    "load_sources",
    "read_records",
    "resolve_dataset",
    "resolve_template",
    "template_definition",
    "segments",
    "to_conversations",
    "tokenize_conversations",
]
