"""The OpenAI-compatible HTTP API of the web service, under /v1: models, chat completions and completions,
streamed by server-sent events, with OpenAI-shaped errors, an optional bearer key and a bounded request
queue (429 and Retry-After beyond it). unift.serve.app mounts the browser UI beside it.

Every request drives the one Generator: concurrent requests are generated together in batches
(unift.inference.batching), and a client that goes away stops its own answer at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request

from unift.data import Message
from unift.errors import UniftError
from unift.inference.batching import TextStream
from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings, QueueFull
from unift.serve.protocol import APIError, invalid, parse_messages, parse_prompt, parse_settings

log = logging.getLogger(__name__)



class Service:
    """The served Generator and what the API allows: model ids, default settings, the key, the limits."""

    def __init__(self, generator: Generator, settings: GenerationSettings, *, served_name: str | None = None,
                 api_key: str | None = None, max_tokens_limit: int = 4096,
                 max_prompt_tokens: int | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self.name = served_name or generator.name
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self.created = int(time.time())
        # model id -> adapter on? ("base" ids only exist when an adapter is loaded)
        self.models: dict[str, bool] = {self.name: True}
        if generator.has_adapter:
            self.models[f"{self.name}:base"] = False

    def check_key(self, authorization: str | None) -> None:
        if not self.api_key:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def adapter_for(self, body: dict) -> bool:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("you must provide a model parameter", "model")
        if model not in self.models:
            raise APIError(404, f"The model '{model}' does not exist; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[model]

    def settings_for(self, body: dict, default_max_tokens: int) -> GenerationSettings:
        return parse_settings(body, self.settings, default_max_tokens, self.max_tokens_limit)

    def open(self, prompt: list[Message] | str, settings: GenerationSettings, adapter: bool) -> TextStream:
        """Admit one request and start it; the caller must close the stream and release the slot."""
        try:
            self.generator.acquire_slot()
        except QueueFull as err:
            raise APIError(429, str(err), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "2"}) from None
        try:
            return self.generator.open_stream(prompt, settings, adapter=adapter,
                                              max_prompt_tokens=self.max_prompt_tokens)
        except UniftError as err:
            self.generator.release_slot()
            raise invalid(str(err)) from None
        except BaseException:
            self.generator.release_slot()
            raise

    def finish(self, stream: TextStream) -> None:
        """Stop the generation (if still running) and free the queue place, off the event loop."""
        stream.cancel.set()

        def close() -> None:
            try:
                stream.close()
            except Exception:  # the reader already saw it, or nobody is left to tell
                log.debug("closing a stream failed", exc_info=True)
            finally:
                self.generator.release_slot()

        threading.Thread(target=close, daemon=True, name="unift-close").start()


def usage(stream: TextStream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


_DONE = object()


async def _next_piece(stream: TextStream) -> Any:
    import anyio

    return await anyio.to_thread.run_sync(next, stream, _DONE)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- answering a request ------------------------------------------------------------------------------

async def read_body(service: Service, request: Request) -> dict:
    """The request's JSON object, once its key is checked."""
    service.check_key(request.headers.get("authorization"))
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request. Send a JSON object "
                       "with 'Content-Type: application/json'.") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def model_card(service: Service, model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": service.created, "owned_by": "unift"}


async def respond(service: Service, request: Request, body: dict, prompt: list[Message] | str,
                  settings: GenerationSettings, adapter: bool, chat: bool) -> Any:
    """A chat or text completion: streamed as server-sent events when the body asks, else whole."""
    from fastapi.responses import StreamingResponse

    stream = service.open(prompt, settings, adapter)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": ident, "created": int(time.time()), "model": body["model"]}
    if body.get("stream"):
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(events(service, stream, meta, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = await collect(request, stream)
    finally:
        service.finish(stream)
    return completion(meta, text, stream, chat)


def completion(meta: dict, text: str, stream: TextStream, chat: bool) -> dict:
    """The whole answer in OpenAI's chat.completion or text_completion shape."""
    if chat:
        text = text.strip()
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": stream.finish_reason, "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(stream),
                "system_fingerprint": None}
    choice = {"index": 0, "text": text, "finish_reason": stream.finish_reason, "logprobs": None}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage(stream)}


async def collect(request: Request, stream: TextStream) -> str:
    """The whole answer; if the client hangs up meanwhile, the generation is stopped."""
    import anyio

    task = asyncio.ensure_future(anyio.to_thread.run_sync(lambda: "".join(stream)))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            break
        if await request.is_disconnected():
            stream.cancel.set()
    try:
        return task.result()
    except UniftError as err:
        raise APIError(500, str(err), type_="server_error") from None


async def events(service: Service, stream: TextStream, meta: dict, chat: bool,
                 include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events, in OpenAI's chunk shapes, ending with [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict | str, finish: str | None) -> dict:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None} if chat else
                  {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
        out = {**meta, "object": kind, "choices": [choice]}
        if chat:
            out["system_fingerprint"] = None
        return out

    try:
        if chat:
            yield sse(chunk({"role": "assistant", "content": ""}, None))
        started = False
        while True:
            piece = await _next_piece(stream)
            if piece is _DONE:
                break
            if chat and not started:
                piece = piece.lstrip()  # the space a tokenizer puts before the first word
                if not piece:
                    continue
            started = True
            yield sse(chunk({"content": piece} if chat else piece, None))
        yield sse(chunk({} if chat else "", stream.finish_reason))
        if include_usage:
            yield sse({**meta, "object": kind, "choices": [], "usage": usage(stream)})
        yield sse("[DONE]")
    except Exception as err:  # the status line is already sent: report in-band, as OpenAI does
        log.exception("generation failed")
        yield sse(APIError(500, f"generation failed: {err}", type_="server_error").body())
    finally:
        service.finish(stream)


# ---- the app -----------------------------------------------------------------------------------------

def create_api(generator: Generator, settings: GenerationSettings, *, api_key: str | None = None,
               served_name: str | None = None, max_tokens_limit: int = 4096,
               max_prompt_tokens: int | None = None) -> FastAPI:
    """The /v1 routes and /health, on a FastAPI app whose `state.service` is the Service."""
    service = Service(generator, settings, served_name=served_name, api_key=api_key,
                      max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    app = FastAPI(title="unift", docs_url="/v1/docs" if not api_key else None, redoc_url=None,
                  openapi_url="/v1/openapi.json" if not api_key else None)
    app.state.service = service
    _add_error_handlers(app)
    _add_model_routes(app, service)
    _add_completion_routes(app, service)

    # Registered last, as routes match in order. Without it, unknown /v1 paths would fall through to the
    # UI mounted at / and get its 404 page.
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str, request: Request):
        raise APIError(404, f"Unknown request URL: {request.method} /v1/{path}", type_="not_found_error")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, FastAPI's own (404, 405) too."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        detail = err.detail if isinstance(err.detail, str) else "request failed"
        return JSONResponse(APIError(err.status_code, f"{detail}: {request.method} {request.url.path}",
                                     type_=kind).body(), status_code=err.status_code)


def _add_model_routes(app: FastAPI, service: Service) -> None:
    """/v1/models (the served ids) and /health (the queue and the scheduler's counters)."""
    generator = service.generator

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        service.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card(service, m) for m in service.models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        service.check_key(request.headers.get("authorization"))
        service.adapter_for({"model": model_id})
        return model_card(service, model_id)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": generator.queued, "max_queue": generator.max_queue,
                "max_batch": generator.scheduler.max_batch, **generator.scheduler.stats}


def _add_completion_routes(app: FastAPI, service: Service) -> None:
    """/v1/chat/completions and /v1/completions."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(service, request)
        adapter = service.adapter_for(body)
        messages = parse_messages(body)
        settings = service.settings_for(body, service.settings.max_new_tokens)
        return await respond(service, request, body, messages, settings, adapter, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(service, request)
        adapter = service.adapter_for(body)
        prompt = parse_prompt(body)
        settings = service.settings_for(body, 16)  # OpenAI's default max_tokens for completions
        return await respond(service, request, body, prompt, settings, adapter, chat=False)
