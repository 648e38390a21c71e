"""Splitting, mixing, the tokenization cache (reuse, invalidation, parallel workers, concurrent builders)
and streaming, on the real tokenizer and small generated files."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from test_data_formats import alpaca_rows, messages_rows, sharegpt_rows, write_rows

from unift.data import DataOptions, build_datasets, get_template, load_sources, pipeline
from unift.data import options as data_options
from unift.data.tokenize import encode_conversation
from unift.errors import UniftError
from unift.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return load_tokenizer(str(embedded_dir))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFT_CACHE", str(tmp_path / "cache"))


def numbered(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(n)]


def build(tokenizer, **kw):
    options = DataOptions(**kw)
    return build_datasets(load_sources(options), get_template("auto"), tokenizer, options)


def decoded_answers(tokenizer, rows) -> list[str]:
    return [tokenizer.decode([t for t in r["labels"] if t != -100]) for r in rows]


def test_split_is_seeded_disjoint_and_complete(tmp_path, tokenizer):
    path = write_rows(tmp_path / "a.jsonl", numbered(20, "a"))
    one = build(tokenizer, data=[str(path)], val_set_size=0.25, seed=1)
    again = build(tokenizer, data=[str(path)], val_set_size=0.25, seed=1)
    other = build(tokenizer, data=[str(path)], val_set_size=0.25, seed=2)
    train, val = decoded_answers(tokenizer, one.train), decoded_answers(tokenizer, one.val)
    assert (len(train), len(val)) == (15, 5)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 20
    assert train == decoded_answers(tokenizer, again.train)
    assert train != decoded_answers(tokenizer, other.train)
    assert set(one.train[0]) == {"input_ids", "labels"}


def test_max_samples_per_source_and_mixing_ratios(tmp_path, tokenizer):
    a = write_rows(tmp_path / "a.jsonl", numbered(30, "a"))
    b = write_rows(tmp_path / "b.jsonl", numbered(6, "b"))
    capped = build(tokenizer, data=[str(a), str(b)], max_samples=5)
    assert [s["train"] for s in capped.stats["sources"]] == [5, 5]
    mixed = build(tokenizer, data=[str(a), str(b)], data_ratios=[1, 1], val_set_size=4)
    sources = Counter(text.split()[0] for text in decoded_answers(tokenizer, mixed.train))
    # The training size stays the sum (36 - 4 held out), split half and half: b is repeated to fill its half.
    assert sum(sources.values()) == 32 and sources["a"] == sources["b"] == 16
    assert [s["train"] for s in mixed.stats["sources"]] == [16, 16]
    held_out = set(decoded_answers(tokenizer, mixed.val))
    assert not held_out & set(decoded_answers(tokenizer, mixed.train))  # upsampling never leaks val rows


def test_long_prompts_are_cut_and_long_answers_dropped_and_counted(tmp_path, tokenizer):
    rows = numbered(4, "a")
    rows[0]["instruction"] = "long " * 200  # kept: the prompt loses its front, the answer stays whole
    rows[1]["output"] = "long " * 200  # the answer alone exceeds the cutoff: dropped
    path = write_rows(tmp_path / "a.jsonl", rows)
    data = build(tokenizer, data=[str(path)], cutoff_len=64)
    assert (data.stats["dropped"], data.stats["long_answers"], data.stats["truncated"]) == (1, 1, 1)
    assert sorted(decoded_answers(tokenizer, data.train)) == [f"a answer {i}<|im_end|>\n" for i in (0, 2, 3)]
    kept = build(tokenizer, data=[str(path)], cutoff_len=64, truncation="keep")
    assert (kept.stats["dropped"], kept.stats["long_answers"], len(kept.train)) == (0, 1, 4)
    with pytest.raises(UniftError, match="no example has an answer token within --cutoff_len 4"):
        build(tokenizer, data=[str(path)], cutoff_len=4)


def test_second_run_reuses_the_cache_without_reading_or_tokenizing(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "CACHE_MIN_RECORDS", 1)
    path = write_rows(tmp_path / "a.json", alpaca_rows(6))
    first = build(tokenizer, data=[str(path)], val_set_size=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(pipeline, "_tokenize", forbidden)
    monkeypatch.setattr(pipeline, "iter_conversations", forbidden)
    monkeypatch.setattr(data_options, "iter_conversations", forbidden)  # Source.iter reads through it
    second = build(tokenizer, data=[str(path)], val_set_size=2)
    assert list(second.train) == list(first.train) and list(second.val) == list(first.val)
    # Changing the data, the template or the cutoff means tokenizing again.
    with pytest.raises(AssertionError, match="cache should have been used"):
        build(tokenizer, data=[str(path)], cutoff_len=100)
    with pytest.raises(AssertionError, match="cache should have been used"):
        build(tokenizer, data=[str(path)], overwrite_cache=True)
    write_rows(path, alpaca_rows(5))
    with pytest.raises(AssertionError, match="cache should have been used"):
        build(tokenizer, data=[str(path)])


def test_parallel_workers_give_the_same_rows(tmp_path, tokenizer):
    path = write_rows(tmp_path / "s.json", sharegpt_rows(12))
    serial = build(tokenizer, data=[str(path)])
    parallel = build(tokenizer, data=[str(path)], num_proc=2)
    assert list(parallel.train) == list(serial.train)


def test_auto_workers_stay_off_for_small_data():
    assert pipeline.auto_num_proc(100, None) == 1
    assert pipeline.auto_num_proc(100, 3) == 3


def test_concurrent_builders_tokenize_once(tmp_path, tokenizer, monkeypatch):
    """As two torchrun ranks starting together: one builds the cache under the lock, the other loads it."""
    monkeypatch.setattr(pipeline, "CACHE_MIN_RECORDS", 1)
    path = write_rows(tmp_path / "m.jsonl", messages_rows(8))
    calls = Counter()
    real = pipeline._tokenize

    def counting(*args, **kwargs):
        calls["tokenize"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_tokenize", counting)
    results, errors = [], []

    def rank():
        try:
            results.append(build(tokenizer, data=[str(path)]))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls["tokenize"] == 1
    assert list(results[0].train) == list(results[1].train)


def test_streaming_yields_the_same_rows_and_holds_out_validation(tmp_path, tokenizer, monkeypatch):
    from unift.data import streaming

    monkeypatch.setattr(streaming, "SHUFFLE_BUFFER", 4)
    path = write_rows(tmp_path / "a.jsonl", numbered(12, "a"))
    data = build(tokenizer, data=[str(path)], streaming=True, stream_length=40, val_set_size=3)
    assert len(data.train) == 40 and len(data.val) == 3
    rows = []
    for row in data.train:
        rows.append(row)
        if len(rows) == 27:  # three passes over the 9 training conversations
            break
    answers = Counter(decoded_answers(tokenizer, rows))
    val = set(decoded_answers(tokenizer, data.val))
    assert set(answers) | val == {f"a answer {i}<|im_end|>\n" for i in range(12)}
    assert not set(answers) & val
    # Each row is exactly what the in-memory path makes of that conversation.
    template = get_template("auto")
    expected = {tuple(encode_conversation(
        [{"role": "user", "content": f"a question {i}"}, {"role": "assistant", "content": f"a answer {i}"}],
        template, tokenizer, 512).input_ids) for i in range(12)}
    assert {tuple(r["input_ids"]) for r in rows} <= expected


def test_streaming_reports_a_bad_record_when_it_reaches_it(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "STREAM_CHECK", 2)
    rows = numbered(6, "a")
    del rows[4]["output"]
    path = write_rows(tmp_path / "a.jsonl", rows)
    data = build(tokenizer, data=[str(path)], streaming=True, stream_length=10)
    with pytest.raises(UniftError, match=f"{path}: record 5: field 'output' is missing"):
        list(zip(range(10), data.train))
