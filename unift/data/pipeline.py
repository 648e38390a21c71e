"""From --data entries to training rows: load and validate every source, tokenize (cached, in parallel for
large data), then split off the validation set and mix the sources in the asked proportions.

Order of work, and why:
1. `load_sources` reads and validates every record before the tokenizer or any model is loaded, so bad
   input fails in seconds with the file, record and field named. A source validated earlier (same file
   size and modification time, same format options) is not read again.
2. `build_datasets` tokenizes each source once per (data, tokenizer, template, cutoff) and keeps the
   result under $UNIFT_CACHE/data (default ~/.cache/unift/data); a second run loads it memory-mapped.
   Sources under CACHE_MIN_RECORDS conversations are tokenized in memory: that is faster than the cache.
   A file lock makes concurrent ranks (torchrun) build each cache entry once: the others wait, then load.
3. The validation set is drawn from the shuffled pool of all sources before mixing, so an upsampled
   example can never sit in both splits; --data_ratios then resamples the training part of each source.
Streaming mode (`--streaming`) reads files lazily instead, for data larger than memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unift.data.conversations import iter_conversations
from unift.data.options import DataBundle, DataOptions, Source
from unift.data.preference import COLUMNS, encode_preference, encode_prompt_row
from unift.data.quality import Skipped, skipped_summary
from unift.data.readers import data_files
from unift.data.registry import DatasetEntry, expand_names, resolve_dataset
from unift.data.templates import Message
from unift.data.tokenize import IGNORE_INDEX, encode_conversation
from unift.errors import UniftError
from unift.runtime import cache_dir, write_json_atomic

log = logging.getLogger("unift")

CACHE_VERSION = 2  # bump when tokenization changes, so old cache entries are not reused
CACHE_MIN_RECORDS = 1000  # below this, tokenizing in memory is faster than writing and reading a cache
RECORDS_PER_WORKER = 5000  # auto --num_proc: one worker per this many records (no pool for small data)
STREAM_CHECK = 1000  # records per source validated up front in streaming mode


def cache_root() -> Path:
    return cache_dir() / "data"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _source_key(entry: DatasetEntry, files: list[Path], limit: int | None, kind: str = "sft") -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return _digest({"v": CACHE_VERSION, "files": stats, "format": entry.formatting, "columns": entry.columns,
                    "tags": entry.tags, "limit": limit, **({"kind": kind} if kind != "sft" else {})})


def load_sources(options: DataOptions) -> list[Source]:
    """Resolve and validate every --data entry; nothing heavier than the data files is touched."""
    options.check()
    dataset_dir = Path(options.dataset_dir) if options.dataset_dir else None
    names = expand_names(options.data, dataset_dir)
    if options.data_ratios is not None and len(names) != len(options.data):
        raise UniftError(f"--data_ratios: --data {' '.join(options.data)} stands for {len(names)} datasets "
                         f"({', '.join(names)}); list them and give one proportion each")
    sources = []
    for name in names:
        entry = resolve_dataset(name, dataset_dir)
        files = data_files(entry.path)
        caps = [x for x in (options.max_samples, entry.num_samples) if x is not None]
        limit = min(caps) if caps else None
        source = Source(entry, limit, _source_key(entry, files, limit, options.kind),
                        bytes=sum(f.stat().st_size for f in files), strict=options.strict_data, kind=options.kind)
        notes: Counter = Counter()
        formats: Counter = Counter()
        skipped = Skipped(options.strict_data)
        if options.streaming:
            # A stream is validated on its first records now, and record by record as training reads it.
            for _ in iter_conversations(entry.path, entry.formatting, entry.columns, entry.tags, notes=notes,
                                        formats=formats, limit=min(STREAM_CHECK, limit or STREAM_CHECK),
                                        skipped=skipped, kind=options.kind):
                pass
            source.formats, source.notes, source.skipped = dict(formats), dict(notes), skipped.as_dict()
        else:
            marker = cache_root() / source.key / "source.json"
            known = _read_json(marker) if not options.overwrite_cache else None
            if known and not (options.strict_data and known.get("skipped", {}).get("count")):
                source.records, source.formats, source.notes = known["records"], known["formats"], known["notes"]
                source.skipped = known.get("skipped", {})
            else:
                source.conversations = [c for _, c in iter_conversations(
                    entry.path, entry.formatting, entry.columns, entry.tags, notes=notes, formats=formats,
                    limit=limit, skipped=skipped, kind=options.kind)]
                source.records, source.formats, source.notes = len(source.conversations), dict(formats), dict(notes)
                source.skipped = skipped.as_dict()
        line = skipped_summary(source.name, source.skipped)
        if line:  # nothing is left out silently: the training log says which records and why
            log.warning("%s%s", line, " (in the records checked up front)" if options.streaming else "")
        sources.append(source)
    return sources


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- tokenization ----------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Content, not path: the same tokenizer saved in two run folders shares cache entries."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _digest([type(tokenizer).__name__, hashlib.sha256(body.encode()).hexdigest(),
                    getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
                    tokenizer.pad_token, sorted(map(str, tokenizer.all_special_tokens))])


def _encode_batch(batch: dict[str, list], template, tokenizer, cutoff_len: int,
                  train_on_prompt: bool, truncation: str = "drop", kind: str = "sft") -> dict[str, list]:
    if kind != "sft":
        encode = encode_prompt_row if kind == "prompts" else encode_preference
        rows = [encode(json.loads(text), template, tokenizer, cutoff_len, truncation)
                for text in batch["conversation"]]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "trained": [],
                            "long_answer": []}
    for text in batch["conversation"]:
        enc = encode_conversation(json.loads(text), template, tokenizer, cutoff_len, train_on_prompt, truncation)
        out["long_answer"].append(enc.long_answer)
        out["input_ids"].append(enc.input_ids)
        out["labels"].append(enc.labels)
        out["length"].append(enc.length)
        out["truncated"].append(enc.truncated)
        out["trained"].append(sum(label != IGNORE_INDEX for label in enc.labels))
    return out


def auto_num_proc(records: int, asked: int | None) -> int:
    if asked:
        return asked
    return max(1, min(os.cpu_count() or 1, 8, records // RECORDS_PER_WORKER))


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[None]:
    """datasets' progress bars only where the work is long enough to watch."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            datasets.enable_progress_bars()


def _tokenize(conversations: list[list[Message]], template, tokenizer, options: DataOptions, key: str):
    import datasets

    table = datasets.Dataset.from_dict({"conversation": [json.dumps(c, ensure_ascii=False) for c in conversations]})
    workers = auto_num_proc(len(conversations), options.num_proc)
    with _progress(len(conversations) >= 10 * CACHE_MIN_RECORDS):
        return table.map(
            _encode_batch, batched=True, batch_size=256, num_proc=workers if workers > 1 else None,
            remove_columns=["conversation"], new_fingerprint=key, desc="tokenizing",
            fn_kwargs={"template": template, "tokenizer": tokenizer, "cutoff_len": options.cutoff_len,
                       "train_on_prompt": options.train_on_prompt, "truncation": options.truncation,
                       "kind": options.kind},
        )


def tokenized_source(source: Source, template, tokenizer, options: DataOptions, tok_fp: str):
    """The source's rows (input_ids, labels, length, truncated, trained), from the cache when possible."""
    import datasets
    from filelock import FileLock

    key = _digest([source.key, tok_fp, repr(template), options.cutoff_len, options.train_on_prompt,
                   options.truncation, options.kind])
    folder = cache_root() / source.key / key
    if folder.is_dir() and not options.overwrite_cache:
        return datasets.load_from_disk(str(folder))
    if source.conversations is None:
        source.conversations = [c for _, c in source.iter()]
    if len(source.conversations) < CACHE_MIN_RECORDS:
        return _tokenize(source.conversations, template, tokenizer, options, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir() and not options.overwrite_cache:  # another rank built it while we waited
            return datasets.load_from_disk(str(folder))
        log.info("tokenizing %s (%d conversations); cached in %s", source.name, len(source.conversations), folder)
        rows = _tokenize(source.conversations, template, tokenizer, options, key)
        tmp = folder.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _progress(False):
            rows.save_to_disk(str(tmp))
        if folder.is_dir():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        write_json_atomic(folder.parent / "source.json",
                    {"records": source.records, "formats": source.formats, "notes": source.notes,
                     "skipped": source.skipped, "path": str(source.entry.path)})
    return datasets.load_from_disk(str(folder))


# ---- splitting and mixing --------------------------------------------------------------------------


def _mix(pools: list[list[int]], ratios: list[float] | None, rng: random.Random) -> list[list[int]]:
    """Per source, the (shuffled) row indices to train on: all of them, or resampled to the ratios with
    the total size unchanged (a source asked for more than it has is repeated)."""
    if ratios is None:
        return pools
    total = sum(len(p) for p in pools)
    weight = sum(ratios)
    chosen = []
    for pool, ratio in zip(pools, ratios):
        want = round(total * ratio / weight)
        if want and not pool:
            raise UniftError("--data_ratios asks for examples from a source that has none left for training")
        copies, rest = divmod(want, len(pool)) if pool else (0, 0)
        chosen.append(pool * copies + rng.sample(pool, rest))
    return chosen


def build_datasets(sources: list[Source], template, tokenizer, options: DataOptions) -> DataBundle:
    """Tokenize, split and mix validated sources into training and validation rows."""
    if options.streaming:
        from unift.data.streaming import streaming_bundle  # imports torch: only when streaming

        return streaming_bundle(sources, template, tokenizer, options)
    import datasets

    tok_fp = tokenizer_fingerprint(tokenizer)
    tables = [tokenized_source(s, template, tokenizer, options, tok_fp) for s in sources]
    rng = random.Random(options.seed)
    pool, dropped, long_answers = _trainable_rows(tables)
    if not pool:
        raise UniftError(f"no example has an answer token within --cutoff_len {options.cutoff_len}; raise it")
    rng.shuffle(pool)
    size = options.val_set_size
    n_val = int(round(size * len(pool))) if 0 < size < 1 else int(size)
    if n_val >= len(pool):
        raise UniftError(f"--val_set_size {size:g} leaves no training examples (there are {len(pool)})")
    val_pairs, train_pairs = pool[:n_val], pool[n_val:]
    per_source: list[list[int]] = [[] for _ in tables]
    for number, i in train_pairs:
        per_source[number].append(i)
    mixed = _mix(per_source, options.data_ratios, rng)
    offsets = [0]
    for table in tables[:-1]:
        offsets.append(offsets[-1] + len(table))
    train_index = [offsets[s] + i for s, rows in enumerate(mixed) for i in rows]
    rng.shuffle(train_index)
    val_index = [offsets[s] + i for s, i in val_pairs]
    every = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    train_full, val_full = every.select(train_index), every.select(val_index)
    stats = _bundle_stats(sources, options, train_full, val_full, dropped, long_answers, mixed, val_pairs)
    columns = COLUMNS[options.kind]
    return DataBundle(train_full.select_columns(columns), val_full.select_columns(columns), stats,
                      sources, train_full, val_full, tables)


def _trainable_rows(tables: list) -> tuple[list[tuple[int, int]], list[int], int]:
    """(source number, row) of every row with a trained token, rows dropped per source (none left within
    the cutoff), and how many answers were longer than the cutoff on their own."""
    pool = []
    dropped = []
    long_answers = 0
    for number, table in enumerate(tables):
        trained = table["trained"]
        long_answers += sum(table["long_answer"])
        pool += [(number, i) for i, n in enumerate(trained) if n > 0]
        dropped.append(sum(1 for n in trained if n == 0))
    return pool, dropped, long_answers


def _bundle_stats(sources: list[Source], options: DataOptions, train_full, val_full, dropped: list[int],
                  long_answers: int, mixed: list[list[int]], val_pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """The figures `data check` and the run's report show, in all and per source."""
    val_counts = Counter(s for s, _ in val_pairs)
    stats = {
        "examples": len(train_full) + len(val_full),
        "train": len(train_full),
        "val": len(val_full),
        "truncated": sum(train_full["truncated"]) + sum(val_full["truncated"]),
        "dropped": sum(dropped),
        "skipped": sum(s.skipped.get("count", 0) for s in sources),
        "long_answers": long_answers,  # answers longer than the cutoff alone: dropped, or kept cut
        "truncation": options.truncation,
        "sources": [
            {"name": s.name, "path": str(s.entry.path), "formats": s.formats, "records": s.records,
             "dropped": dropped[n], "train": len(mixed[n]), "val": val_counts[n], "notes": s.notes,
             "skipped": s.skipped}
            for n, s in enumerate(sources)
        ],
    }
    if options.kind != "sft":
        stats[{"pairs": "pairs", "unpaired": "answers", "prompts": "prompts"}[options.kind]] = stats["examples"]
    return stats


def load_conversations(names: list[str], dataset_dir: Path | None = None,
                       kind: str | None = None, limit: int | None = None) -> list[list[Message]]:
    """Every --data entry (names or paths), validated and merged in the given order (of one kind, if given);
    `limit`: only the first that many in all (the later files are then not read)."""
    conversations: list[list[Message]] = []
    for name in expand_names(names, dataset_dir):
        left = None if limit is None else limit - len(conversations)
        if left is not None and left <= 0:
            break
        entry = resolve_dataset(name, dataset_dir)
        skipped = Skipped()
        caps = [n for n in (entry.num_samples, left) if n is not None]
        conversations += [c for _, c in iter_conversations(entry.path, entry.formatting, entry.columns, entry.tags,
                                                           limit=min(caps) if caps else None, skipped=skipped,
                                                           kind=kind)]
        line = skipped_summary(entry.name, skipped.as_dict())
        if line:
            log.warning("%s", line)
    return conversations


def cutoff_summary(stats: dict[str, Any], cutoff_len: int, truncation: str) -> tuple[str, bool]:
    """One line on what --cutoff_len does to the data, with the flags that change it, and whether it drops
    more than a tenth of the records (a cutoff that silently throws data away looks like a bad run)."""
    if stats.get("streaming"):
        return (f"--cutoff_len {cutoff_len}: in the held-out sample {stats.get('truncated', 0)} cut at the front, "
                f"{stats.get('dropped', 0)} dropped (streamed counts are unknown before training)", False)
    dropped, cut, long = stats.get("dropped", 0), stats.get("truncated", 0), stats.get("long_answers", 0)
    total = stats.get("examples", 0) + dropped
    share = dropped / total if total else 0.0
    parts = [f"{dropped} of {total} records dropped ({100 * share:.0f}%: no answer token within the cutoff"
             + ("; --truncation keep keeps an over-long answer cut" if truncation == "drop" else "") + ")",
             f"{cut} cut" + (" between prompt and answer (--truncation split)" if truncation == "split"
                             else " at the front (prompt or earlier turns lost)")]
    if truncation != "drop" and long:
        parts.append(f"{long} answers kept cut at the end without their end token (--truncation {truncation})")
    return f"--cutoff_len {cutoff_len}: " + ", ".join(parts) + "; raise --cutoff_len to keep more", share > 0.1
