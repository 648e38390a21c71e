"""Data: formats -> conversations, templates, the dataset registry, tokenization with prompt masking."""

from __future__ import annotations

from pathlib import Path

from unift.data.formats import to_conversations
from unift.data.registry import DatasetEntry, resolve_dataset
from unift.data.templates import TEMPLATES, Message, get_template, resolve_template
from unift.data.tokenize import IGNORE_INDEX, encode_conversation, encode_prompt, tokenize_conversations


def load_conversations(names: list[str], dataset_dir: Path | None = None) -> list[list[Message]]:
    """Every --data entry (names or paths), validated and merged in the given order."""
    conversations: list[list[Message]] = []
    for name in names:
        entry = resolve_dataset(name, dataset_dir)
        conversations += to_conversations(entry.path, entry.formatting, entry.columns)
    return conversations


__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "DatasetEntry",
    "Message",
    "encode_conversation",
    "encode_prompt",
    "get_template",
    "load_conversations",
    "resolve_dataset",
    "resolve_template",
    "tokenize_conversations",
]
