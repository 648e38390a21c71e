"""Continuous batching (unift.inference.decode driven by the Scheduler): requests join a running batch between
decode steps and leave it when done, and every answer is still the one the model gives alone (fp32, a tiny
random llama; rounding differs between batch shapes by ~1e-5 on logits, well below the top-2 gaps of
these prompts over these lengths). The paths that must not use the loop (a seed, a model whose forward
hands back no transformers cache) go through `generate` instead."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from unift.inference.decode import RunningBatch, Sampler
from unift.inference.settings import GenerationSettings
from unift.inference.streams import _Request

SHORT = [{"role": "user", "content": "What is 2 plus 3?"}]
LONG = [{"role": "user", "content": "Please list " + "many things, " * 20}]  # longer than SHORT's cache
HI = [{"role": "user", "content": "Hi"}]
COLOUR = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def generator(tiny_model, one_torch_thread):
    from unift.inference.generator import Generator

    return Generator.load(None, base_model=str(tiny_model("llama")), dtype=torch.float32)


def alone(generator, prompt, settings: GenerationSettings):
    """The answer of model.generate for this prompt by itself (the reference every batched row must meet)."""
    return generator.generate([prompt], settings, batch_size=1)[0]


def text(stream) -> str:
    return "".join(stream).strip()


@contextlib.contextmanager
def paced(generator, seconds: float = 0.01):
    """Every forward pass takes at least `seconds`: a 300-token runner then lasts 3 s or more, so the rows
    meant to join it still find it running when this thread is held up on a busy machine."""
    model = generator.model
    forward = model.forward

    @functools.wraps(forward)  # the same signature: the scheduler reads it to choose its path
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow
    try:
        yield
    finally:
        del model.forward


def test_rows_that_join_and_leave_mid_flight_answer_as_alone(generator):
    # the references first: generate() waits for the model, which a running batch holds
    expected = {name: alone(generator, prompt, GenerationSettings(max_new_tokens=n)).text
                for name, prompt, n in (("runner", SHORT, 300), ("long", LONG, 6), ("hi", HI, 12),
                                        ("colour", COLOUR, 8))}
    stats = generator.scheduler.stats
    before = dict(stats)
    with paced(generator):
        runner = generator.open_stream(SHORT, GenerationSettings(max_new_tokens=300))  # runs until closed
        pieces = [next(runner)]  # it is decoding now
        long = generator.open_stream(LONG, GenerationSettings(max_new_tokens=6))  # more columns than the runner
        hi = generator.open_stream(HI, GenerationSettings(max_new_tokens=12))  # fewer
        assert text(long) == expected["long"]
        assert long.finish_reason == "length" and long.completion_tokens == 6
        pieces.append(next(runner))  # the runner goes on after a row left (its padding columns cut)
        colour = generator.open_stream(COLOUR, GenerationSettings(max_new_tokens=8))  # joins after one left
        assert text(hi) == expected["hi"]
        assert text(colour) == expected["colour"]
        runner.close()
    pieces.extend(runner)
    assert runner.completion_tokens < 300  # it was running all along, so the others joined it mid-flight
    assert expected["runner"].startswith("".join(pieces).strip())
    assert stats["joined"] - before["joined"] >= 2 and stats["batches"] - before["batches"] == 1
    assert stats["requests"] - before["requests"] == 4
    assert not generator.lock.locked()


def test_closing_one_row_leaves_the_others_as_alone(generator):
    settings = GenerationSettings(max_new_tokens=30)
    expected = [alone(generator, p, settings).text for p in (SHORT, HI)]
    with generator.lock:  # all three start together
        streams = [generator.open_stream(p, settings) for p in (SHORT, LONG, HI)]
    next(streams[1])
    streams[1].close()
    assert streams[1].finish_reason == "stop" and streams[1].completion_tokens < 30
    assert [text(streams[0]), text(streams[2])] == expected
    assert streams[0].finish_reason == streams[2].finish_reason == "length"


def test_stop_strings_and_max_tokens_per_row(generator):
    free = alone(generator, HI, GenerationSettings(max_new_tokens=16)).text
    two = alone(generator, LONG, GenerationSettings(max_new_tokens=2)).text
    stop = free[4:7]
    assert stop.strip() and stop in free
    with paced(generator):
        runner = generator.open_stream(SHORT, GenerationSettings(max_new_tokens=300))
        next(runner)
        stopped = generator.open_stream(HI, GenerationSettings(max_new_tokens=16, stop=(stop,)))  # joins mid-flight
        short = generator.open_stream(LONG, GenerationSettings(max_new_tokens=2))
        full = generator.open_stream(HI, GenerationSettings(max_new_tokens=16))
        answer = text(stopped)
        assert stop not in answer and free.startswith(answer) and stopped.finish_reason == "stop"
        assert text(short) == two and short.completion_tokens == 2 and short.finish_reason == "length"
        assert text(full) == free and full.completion_tokens == 16 and full.finish_reason == "length"
        runner.close()
    assert runner.completion_tokens < 300


def test_a_seeded_request_runs_alone_through_generate(generator):
    seeded = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.8, seed=7)
    expected = alone(generator, HI, seeded).text
    stats = generator.scheduler.stats
    before = dict(stats)
    with paced(generator):
        runner = generator.open_stream(SHORT, GenerationSettings(max_new_tokens=300))
        next(runner)
        first = generator.open_stream(HI, seeded)  # waits for the running batch instead of joining it
        second = generator.open_stream(HI, seeded)  # and does not share a batch with the first either
        runner.close()
    assert [text(first), text(second)] == [expected, expected]  # reproducible
    assert stats["static"] - before["static"] == 2 and stats["batches"] - before["batches"] == 3
    assert stats["joined"] == before["joined"]


def test_the_sampler_draws_as_generate_does(generator):
    """One row through the decode loop with the RNG seeded as generate() seeds it: the same tokens, so the
    logits processors (repetition penalty, no-repeat n-grams, temperature, top-k, top-p) are generate's."""
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, top_k=40,
                                  repetition_penalty=1.3, no_repeat_ngram_size=2)
    ids = generator.prompt_ids(HI)
    torch.manual_seed(3)
    with torch.inference_mode():
        expected = generator.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                            pad_token_id=generator.tokenizer.pad_token_id, **settings.generate_kwargs())
    request = _Request(ids, settings, adapter=False)
    torch.manual_seed(3)
    with torch.inference_mode():
        batch = RunningBatch(generator.model, Sampler(settings), generator.tokenizer.pad_token_id, set(), generator.tokenizer)
        batch.admit([request])
        while not request.done:
            batch.step()
    assert request.tokens == expected[0, len(ids):].tolist()


def test_greedy_with_penalties_batched_as_alone(generator):
    settings = GenerationSettings(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2)
    with generator.lock:
        streams = [generator.open_stream(p, settings) for p in (SHORT, LONG, HI)]
    assert [text(s) for s in streams] == [alone(generator, p, settings).text for p in (SHORT, LONG, HI)]


def test_a_forward_without_a_transformers_cache_falls_back_to_generate(tmp_path, embedded_dir, one_torch_thread):
    """A remote-code model that builds no cache of its own (tests/remote_glm_modeling.py): found at the first
    prefill, and answered through generate() as before."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unift.inference.generator import Generator
    from unift.models import load_tokenizer

    folder = tmp_path / "glm"
    folder.mkdir()
    shutil.copy(Path(__file__).with_name("remote_glm_modeling.py"), folder / "modeling_tinyglm.py")
    tokenizer = load_tokenizer(str(embedded_dir))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tinyglm", "architectures": ["TinyGLMForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_tinyglm.TinyGLMConfig",
                     "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForCausalLM"},
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    glm = Generator.load(None, base_model=str(folder), model_type="chatglm", trust_remote_code=True)
    settings = GenerationSettings(max_new_tokens=6)
    for _ in range(2):
        with glm.lock:
            streams = [glm.open_stream(p, settings) for p in (SHORT, HI)]
        assert [text(s) for s in streams] == [alone(glm, p, settings).text for p in (SHORT, HI)]
    assert glm.scheduler.stats["static"] == 2 and glm.scheduler.stats["joined"] == 0


@pytest.mark.slow
def test_the_embedded_model_joins_mid_flight_as_alone(one_torch_thread):
    """The real SmolLM2 (fp32): a row that joins a running batch answers as it does alone."""
    from unift.inference.generator import Generator

    real = Generator.load(None, dtype=torch.float32)
    settings = GenerationSettings(max_new_tokens=12)
    expected = alone(real, SHORT, settings).text
    runner = real.open_stream([{"role": "user", "content": "Write a long story about the sea."}],
                              GenerationSettings(max_new_tokens=300))
    next(runner)
    joiner = real.open_stream(SHORT, settings)
    assert text(joiner) == expected
    runner.close()
    assert runner.completion_tokens < 300 and real.scheduler.stats["joined"] == 1
