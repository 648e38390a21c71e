"""Streamed answers of concurrent callers are generated together, and each still behaves as if alone:
the same greedy text, its own stop strings and max_new_tokens, its own finish reason, and closing one
ends only that one. (Rows joining and leaving a running batch: test_continuous_batching.py.)"""

from __future__ import annotations

import threading

import pytest
from after_training_helpers import trained_run

from unift.inference.settings import GenerationSettings

PROMPTS = [[{"role": "user", "content": q}] for q in
           ("What is 2 plus 3?", "Name a colour.", "Tell me a story about a cat.", "Hi")]


@pytest.fixture(scope="module")
def generator(tiny_model):
    from unift.inference.generator import Generator

    return Generator.load(str(trained_run(tiny_model("llama"))))


def submit_together(generator, prompts, settings_list):
    """Open all streams while the model is held, so they are waiting together when it is free."""
    with generator.lock:
        streams = [generator.open_stream(p, s) for p, s in zip(prompts, settings_list)]
    return streams


def test_concurrent_streams_share_a_batch_and_answer_as_alone(generator):
    settings = GenerationSettings(max_new_tokens=8)
    alone = [generator.generate([p], settings, batch_size=1)[0] for p in PROMPTS]
    before = dict(generator.scheduler.stats)
    streams = submit_together(generator, PROMPTS, [settings] * len(PROMPTS))
    texts = ["".join(s).strip() for s in streams]
    assert texts == [a.text for a in alone]
    assert [s.finish_reason for s in streams] == [a.finish_reason for a in alone]
    assert [s.completion_tokens for s in streams] == [a.completion_tokens for a in alone]
    assert generator.scheduler.stats["batches"] == before["batches"] + 1  # all four in one batch
    assert generator.scheduler.stats["largest_batch"] >= len(PROMPTS)
    assert not generator.lock.locked()


def test_each_answer_keeps_its_own_limits(generator):
    free = "".join(generator.open_stream(PROMPTS[2], GenerationSettings(max_new_tokens=12)))
    stop = free.strip()[2:5]
    assert stop
    settings = [GenerationSettings(max_new_tokens=12, stop=(stop,)), GenerationSettings(max_new_tokens=3),
                GenerationSettings(max_new_tokens=12)]
    streams = submit_together(generator, [PROMPTS[2], PROMPTS[0], PROMPTS[2]], settings)
    stopped, short, full = ("".join(s) for s in streams)
    assert stop not in stopped and free.startswith(stopped) and streams[0].finish_reason == "stop"
    assert streams[1].completion_tokens <= 3
    assert full == free and streams[2].completion_tokens == 12 and streams[2].finish_reason == "length"


def test_closing_one_answer_leaves_the_others_running(generator):
    settings = GenerationSettings(max_new_tokens=40)
    streams = submit_together(generator, PROMPTS[:3], [settings] * 3)
    next(streams[0])
    streams[0].close()
    assert streams[0].finish_reason == "stop" and streams[0].completion_tokens < 40
    rest = ["".join(s) for s in streams[1:]]
    assert all(rest) and all(s.finish_reason in ("stop", "length") for s in streams[1:])
    assert not generator.lock.locked()


def test_different_decoding_settings_do_not_share_a_batch(generator):
    before = generator.scheduler.stats["batches"]
    greedy = GenerationSettings(max_new_tokens=3)
    sampled = GenerationSettings(max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    streams = submit_together(generator, PROMPTS[:3], [greedy, sampled, greedy])
    for s in streams:
        "".join(s)
    assert generator.scheduler.stats["batches"] == before + 2  # the two greedy ones together, the seeded one alone


def test_a_request_closed_while_waiting_never_runs(generator):
    before = generator.scheduler.stats["requests"]
    with generator.lock:
        stream = generator.open_stream(PROMPTS[0], GenerationSettings(max_new_tokens=5))
        closer = threading.Thread(target=stream.close)
        closer.start()
        closer.join(timeout=10)
        assert not closer.is_alive()  # close() did not wait for the busy model
    assert list(stream) == [] and stream.finish_reason == "stop"
    assert generator.scheduler.stats["requests"] == before


@pytest.mark.parametrize("path", ["continuous", "static"])
def test_a_failing_batch_reaches_every_reader(generator, monkeypatch, path):
    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    before = generator.scheduler.stats["static"]
    if path == "static":  # a generation_config setting the decode loop does not implement: generate() decodes
        monkeypatch.setattr(generator.model.generation_config, "min_new_tokens", 1, raising=False)
        monkeypatch.setattr(generator.model, "generate", broken)
    else:
        monkeypatch.setattr(generator.model, "forward", broken)
    streams = submit_together(generator, PROMPTS[:2], [GenerationSettings(max_new_tokens=3)] * 2)
    for stream in streams:
        with pytest.raises(RuntimeError, match="fell over"):
            list(stream)
        assert stream.finish_reason == "error"
    assert generator.scheduler.stats["static"] - before == (path == "static")
    monkeypatch.undo()
    assert "".join(generator.open_stream(PROMPTS[0], GenerationSettings(max_new_tokens=2)))  # still serving
