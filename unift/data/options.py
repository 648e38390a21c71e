"""What the stages of the data pipeline hand each other: the data flags (DataOptions), a validated --data
entry (Source) and the training and validation rows (DataBundle).

A module of its own so that unift.data.pipeline and unift.data.streaming both build on it and streaming
never needs to import pipeline back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from unift.data.conversations import iter_conversations
from unift.data.quality import Skipped
from unift.data.registry import DatasetEntry
from unift.data.templates import Message
from unift.data.tokenize import TRUNCATION
from unift.errors import UniftError


@dataclass
class DataOptions:
    """The data flags, as plain values (the data package knows nothing of argparse)."""

    data: list[str]
    dataset_dir: str | None = None
    cutoff_len: int = 512
    val_set_size: float = 0
    max_samples: int | None = None
    data_ratios: list[float] | None = None
    seed: int = 42
    train_on_prompt: bool = False
    truncation: str = "drop"  # "drop"/"keep" an answer longer than cutoff_len alone, or "split" the cut
    streaming: bool = False
    num_proc: int | None = None
    overwrite_cache: bool = False
    strict_data: bool = False  # refuse records that cannot be trained instead of skipping them
    stream_length: int = 0  # rows a streaming training set reports as its length (steps x batch)
    kind: str = "sft"  # what the stage trains on: sft (instruction data), pairs (chosen/rejected), unpaired (KTO)

    @classmethod
    def from_args(cls, args: Any, **extra: Any) -> DataOptions:
        """Options from any object with the same attribute names (TrainArgs, an argparse namespace)."""
        names = [f for f in cls.__dataclass_fields__ if hasattr(args, f)]
        return cls(**{name: getattr(args, name) for name in names}, **extra)

    def check(self) -> None:
        if not self.data:
            raise UniftError("--data: give at least one dataset name or path")
        if self.cutoff_len < 1:
            raise UniftError(f"--cutoff_len must be positive, not {self.cutoff_len}")
        if self.truncation not in TRUNCATION:
            raise UniftError(f"--truncation {self.truncation!r}: choose one of {', '.join(TRUNCATION)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UniftError(f"--max_samples must be positive, not {self.max_samples}")
        if self.val_set_size < 0:
            raise UniftError(f"--val_set_size must not be negative, not {self.val_set_size}")
        if self.data_ratios is not None:
            if len(self.data_ratios) != len(self.data):
                raise UniftError(f"--data_ratios has {len(self.data_ratios)} values for {len(self.data)} --data "
                                 "entries; give one proportion per entry")
            if any(r < 0 for r in self.data_ratios) or not any(r > 0 for r in self.data_ratios):
                raise UniftError("--data_ratios must be non-negative with at least one positive value")
        if self.num_proc is not None and self.num_proc < 1:
            raise UniftError(f"--num_proc must be positive, not {self.num_proc}")
        if self.streaming and self.kind != "sft":
            raise UniftError("--streaming reads instruction data only; preference stages read their pairs whole")
        if self.streaming:
            if self.stream_length < 1:
                raise UniftError("--streaming needs --max_steps: the length of a stream is not known in advance")
            if self.val_set_size and (self.val_set_size < 1 or self.val_set_size != int(self.val_set_size)):
                raise UniftError("--streaming takes --val_set_size as a count of examples, not a fraction")


@dataclass
class Source:
    """One --data entry after validation."""

    entry: DatasetEntry
    limit: int | None
    key: str  # fingerprint of the files and the options that shape their conversations
    records: int | None = None  # None in streaming mode (not counted)
    formats: dict[str, int] = field(default_factory=dict)  # format -> number of files in it
    notes: dict[str, int] = field(default_factory=dict)
    conversations: list[list[Message]] | None = None  # None when a cache made reading unnecessary
    bytes: int = 0
    skipped: dict = field(default_factory=dict)  # untrainable records left out: count, first few, reasons
    strict: bool = False
    kind: str | None = None  # the stage's kind of record (see iter_conversations)

    @property
    def name(self) -> str:
        return self.entry.name

    def iter(self, notes: Counter | None = None, limit: int | None = None) -> Iterator[tuple[str, list[Message]]]:
        cap = min(x for x in (self.limit, limit) if x is not None) if (self.limit or limit) else None
        return iter_conversations(self.entry.path, self.entry.formatting, self.entry.columns, self.entry.tags,
                                  notes=notes, limit=cap, skipped=Skipped(self.strict), kind=self.kind)


@dataclass
class DataBundle:
    train: Any  # indexable rows {"input_ids", "labels"} (a datasets.Dataset), or a stream
    val: Any
    stats: dict[str, Any]
    sources: list[Source]
    train_full: Any = None  # the training rows with their length/truncated/trained columns (for reports)
    val_full: Any = None
    tables: list = field(default_factory=list)  # every tokenized row of each source, in file order
