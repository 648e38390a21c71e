"""Streaming mode: records are read lazily from the files, mixed, shuffled in a bounded buffer and
tokenized on the fly, so data larger than memory trains in constant memory.

The stream is endless (each source starts over when it ends), so training needs --max_steps; its
reported length is steps x batch. Sources are drawn at random in the --data_ratios proportions, or in
proportion to their file sizes without them. The first --val_set_size conversations of the stream are
held out as the validation set and skipped whenever the stream reaches them again. Records are validated
as they are read: the first STREAM_CHECK of each source before training starts, the rest when reached
(the same one-line errors).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from unift.data.options import DataBundle, DataOptions, Source
from unift.data.templates import Message
from unift.data.tokenize import IGNORE_INDEX, encode_conversation
from unift.errors import UniftError

SHUFFLE_BUFFER = 1024  # streaming shuffle buffer


def _endless(source: Source) -> Iterator[tuple[int, list[Message]]]:
    """(position in the source, conversation), starting over at the end."""
    while True:
        for position, (_, conversation) in enumerate(source.iter()):
            yield position, conversation


def mixed_stream(sources: list[Source], options: DataOptions) -> Iterator[tuple[tuple[int, int], list[Message]]]:
    """((source, position), conversation) from all sources, interleaved at random in the asked proportions."""
    weights = options.data_ratios or [max(1, s.bytes) for s in sources]
    streams = [_endless(s) for s in sources]
    live = [i for i, w in enumerate(weights) if w > 0]
    rng = random.Random(options.seed)
    while True:
        (i,) = rng.choices(live, weights=[weights[j] for j in live])
        position, conversation = next(streams[i])
        yield (i, position), conversation


class StreamingRows(torch.utils.data.IterableDataset):
    """Endless tokenized rows {"input_ids", "labels"}; `len()` is the number the run will consume."""

    def __init__(self, sources: list[Source], template, tokenizer, options: DataOptions,
                 held_out: set[tuple[int, int]]) -> None:
        super().__init__()
        self.sources, self.template, self.tokenizer = sources, template, tokenizer
        self.options, self.held_out = options, held_out

    def __len__(self) -> int:
        return self.options.stream_length

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        rng = random.Random(self.options.seed + 1)
        buffer: list[list[Message]] = []
        skipped = 0
        for key, conversation in mixed_stream(self.sources, self.options):
            if key in self.held_out:  # a validation conversation, in this pass or a later one
                skipped += 1
                if skipped > 100 * len(self.held_out) + 1000:
                    raise UniftError("--val_set_size holds out every example of the stream; lower it")
                continue
            skipped = 0
            if len(buffer) < SHUFFLE_BUFFER:
                buffer.append(conversation)
                continue
            slot = rng.randrange(len(buffer))
            conversation, buffer[slot] = buffer[slot], conversation
            row = encode_row(conversation, self.template, self.tokenizer, self.options)
            if row is not None:
                yield row


def encode_row(conversation: list[Message], template, tokenizer, options: DataOptions) -> dict[str, Any] | None:
    enc = encode_conversation(conversation, template, tokenizer, options.cutoff_len, options.train_on_prompt,
                              options.truncation)
    trained = sum(label != IGNORE_INDEX for label in enc.labels)
    if not trained:
        return None
    return {"input_ids": enc.input_ids, "labels": enc.labels, "length": enc.length, "truncated": enc.truncated,
            "trained": trained, "long_answer": enc.long_answer}


def streaming_bundle(sources: list[Source], template, tokenizer, options: DataOptions) -> DataBundle:
    n_val = int(options.val_set_size)
    held_out: dict[tuple[int, int], list[Message]] = {}
    for drawn, (key, conversation) in enumerate(mixed_stream(sources, options)):  # the first distinct ones
        if len(held_out) >= n_val:
            break
        if drawn > 100 * n_val + 1000:
            raise UniftError(f"--val_set_size {n_val}: the data has fewer distinct examples than that")
        held_out.setdefault(key, conversation)
    val_full = [row for row in (encode_row(c, template, tokenizer, options) for c in held_out.values()) if row]
    val = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in val_full]
    stats = {
        "examples": options.stream_length + len(val), "train": options.stream_length, "val": len(val),
        "truncated": sum(r["truncated"] for r in val_full), "dropped": n_val - len(val_full), "streaming": True,
        "skipped": sum(s.skipped.get("count", 0) for s in sources),
        "long_answers": sum(r["long_answer"] for r in val_full), "truncation": options.truncation,
        "sources": [{"name": s.name, "path": str(s.entry.path), "formats": s.formats, "records": None,
                     "dropped": None, "train": None, "val": None, "notes": s.notes,
                     "skipped": s.skipped} for s in sources],
    }
    return DataBundle(StreamingRows(sources, template, tokenizer, options, set(held_out)), val, stats, sources,
                      None, val_full)
