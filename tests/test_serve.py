"""The OpenAI-compatible API, driven by the real `openai` client against a server on a loopback port:
plain and streaming chat and completions, usage, stop, base vs tuned, the bearer key, the bounded queue,
malformed requests, and a client that hangs up mid-stream."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from after_training_helpers import free_port, run_folder

from unift.inference.settings import PRESETS, GenerationSettings

KEY = "sk-unift-test"
GREEDY5 = GenerationSettings(max_new_tokens=5)
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def generator(tiny_model, tmp_path_factory):
    from unift.inference.generator import Generator

    # An adapter moved well away from the identity, so that "run" and "run:base" answer differently (the
    # 2-step trained run's adapter leaves the greedy answers of the tiny model unchanged).
    return Generator.load(str(run_folder(tiny_model("llama"), tmp_path_factory.mktemp("serve") / "run", "lora")))


def serving(generator):
    """The web service over `generator` on a free local port, in a thread: yields its /v1 address."""
    import uvicorn

    from unift.serve.app import create_app

    app = create_app(generator, PRESETS["chat"], api_key=KEY, ui=False, max_tokens_limit=2048)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(generator):
    yield from serving(generator)


@pytest.fixture(scope="module")
def embedded_url(embedded_dir, tmp_path_factory):
    """The embedded SmolLM2 with a LoRA adapter, served: a real model, whose greedy choices are decided by
    clear margins (a random tiny model's near-uniform logits tie often, and batching moves a tie)."""
    from unift.inference.generator import Generator

    generator = Generator.load(str(run_folder(embedded_dir, tmp_path_factory.mktemp("serve-embedded") / "run", "lora",
                                              perturb=0.002)))
    for url in serving(generator):
        yield url, generator


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


def post(base_url: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(base_url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["run", "run:base"]
    assert client.models.retrieve("run:base").owned_by == "unift"


def test_chat_completion_plain_and_streaming(client, generator):
    reply = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=5, temperature=0)
    expected = generator.generate([QUESTION], GREEDY5)[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == expected.prompt_tokens + 5
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="run", messages=QUESTION, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


def test_base_model_id_switches_the_adapter_off(client, generator):
    reply = client.chat.completions.create(model="run:base", messages=QUESTION, max_tokens=5, temperature=0)
    base = generator.generate([QUESTION], GREEDY5, adapter=False)[0].text
    assert reply.choices[0].message.content == base
    tuned = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=5, temperature=0)
    assert tuned.choices[0].message.content == generator.generate([QUESTION], GREEDY5)[0].text != base
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="run:base", messages=QUESTION, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == base


def test_completions_plain_and_streaming_with_stop(client, generator):
    reply = client.completions.create(model="run", prompt="Once upon a time", max_tokens=6, temperature=0)
    text = reply.choices[0].text
    # Raw text: no template, the continuation as generated (the generator's batch path strips it).
    assert text.strip() == generator.generate(["Once upon a time"], GenerationSettings(max_new_tokens=6))[0].text
    assert reply.usage.completion_tokens == 6 and reply.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="run", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == text
    stop = text.strip()[2:5]
    stopped = client.completions.create(model="run", prompt="Once upon a time", max_tokens=6, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_sampling_parameters_are_accepted(client):
    reply = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=3, temperature=0.8,
                                           top_p=0.9, seed=7, n=1)
    again = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=3, temperature=0.8,
                                           top_p=0.9, seed=7, n=1)
    assert reply.choices[0].message.content == again.choices[0].message.content  # a seed makes it repeatable


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "run", "messages": [', 400, None),
    ('["not", "an", "object"]', 400, None),
    ({"model": "run"}, 400, "messages"),
    ({"model": "run", "messages": []}, 400, "messages"),
    ({"model": "run", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.[0].role"),
    ({"model": "run", "messages": [{"role": "user", "content": 5}]}, 400, "messages.[0].content"),
    ({"model": "run", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages.[1].role"),
    ({"model": "run", "messages": QUESTION, "n": 2}, 400, "n"),
    ({"model": "run", "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ({"model": "run", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ({"model": "run", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "run", "messages": QUESTION, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "run", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "run", "messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ({"messages": QUESTION}, 400, "model"),
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "model"),
])
def test_malformed_chat_requests_get_openai_errors(base_url, body, status, param):
    response = post(base_url, "/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_malformed_completion_requests(base_url):
    for body, param in [({"model": "run"}, "prompt"), ({"model": "run", "prompt": ["a", "b"]}, "prompt"),
                        ({"model": "run", "prompt": "x", "echo": True}, "echo")]:
        response = post(base_url, "/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_errors_through_the_client(base_url, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="run", messages=QUESTION, n=3)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()


def test_bearer_key_is_required(base_url):
    assert httpx.get(base_url + "/models").status_code == 401
    response = post(base_url, "/chat/completions", {"model": "run", "messages": QUESTION}, key="wrong")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    unknown = httpx.get(base_url + "/engines", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_method.status_code in (404, 405) and "error" in wrong_method.json()


def test_a_full_queue_answers_429(client, generator):
    limit = generator.max_queue
    generator.max_queue = 1
    generator.acquire_slot()  # someone else is being served
    try:
        with pytest.raises(openai.RateLimitError) as busy:
            client.chat.completions.create(model="run", messages=QUESTION, max_tokens=2)
        assert busy.value.status_code == 429 and busy.value.body["code"] == "queue_full"
        assert busy.value.response.headers["Retry-After"].isdigit()
    finally:
        generator.release_slot()
        generator.max_queue = limit
    assert client.chat.completions.create(model="run", messages=QUESTION, max_tokens=2).choices


def test_fifty_concurrent_clients_are_all_answered_in_batches(embedded_url):
    """A burst waits in the queue instead of being refused, is answered in shared batches, and every
    answer (half of them streamed) is, but for a rounding near-tie, the one the model gives it alone."""
    base_url, generator = embedded_url
    questions = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(50)]
    # what the server decodes a temperature-0 request with: its chat preset made greedy (repetition penalty kept)
    alone = dataclasses.replace(PRESETS["chat"], max_new_tokens=6, do_sample=False, temperature=1.0)
    expected = [c.text for c in generator.generate(questions, alone, batch_size=1)]
    client = openai.OpenAI(base_url=base_url, api_key=KEY, timeout=120)  # its default retries, as users run it
    before = dict(generator.scheduler.stats)

    def ask(i: int) -> str:
        kwargs = {"model": "run", "messages": questions[i], "max_tokens": 6, "temperature": 0}
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kwargs, stream=True)).strip()
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    # Batched and alone, the GEMMs run in other shapes and round differently, by about 1e-6: a real model's
    # greedy choices are decided by far wider margins, so the answers match (a random tiny model's did not,
    # once in a few runs on a loaded machine: its logits are nearly uniform). One near-tie is allowed.
    differ = [i for i, (a, e) in enumerate(zip(answers, expected)) if a != e]
    assert len(answers) == 50 and len(differ) <= 1, (differ, answers, expected)
    stats = generator.scheduler.stats
    assert stats["requests"] - before["requests"] == 50
    assert stats["batches"] - before["batches"] < 50 and stats["largest_batch"] > 1


def test_a_client_that_hangs_up_frees_the_model(base_url, generator):
    body = {"model": "run", "messages": QUESTION, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while generator.queued or generator.lock.locked():
        assert time.monotonic() < deadline, "the generation ran on after the client left"
        time.sleep(0.05)


def test_no_ui_serves_the_api_alone(base_url):
    root = httpx.get(base_url.removesuffix("/v1") + "/", timeout=10)
    assert root.status_code == 404  # create_app(ui=False), as `web.py --no_ui`
    assert httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10).json()["status"] == "ok"
