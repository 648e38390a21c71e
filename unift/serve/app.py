"""The web service (web.py / `unift serve`): one process, one port, serving

- an HTTP API compatible with OpenAI's under /v1 (models, chat completions, completions; streaming by
  server-sent events; OpenAI-shaped errors; an optional bearer key; a bounded request queue), and
- a browser chat UI at / (gradio, mounted in the same FastAPI app), unless --no_ui.

Both drive one Engine: concurrent requests are generated together in batches (unift.engine.batching), a burst
waits in the queue, only requests beyond its (large) bound are refused with 429 and Retry-After, and a
client that goes away stops its own answer at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request

from unift.data import Message
from unift.engine.batching import TextStream
from unift.engine.engine import Engine
from unift.engine.settings import GenerationSettings, QueueFull
from unift.errors import UniftError

log = logging.getLogger(__name__)

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI's API
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request parsing ----------------------------------------------------------------------------------

def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{key} must be a number", key)
    if not low <= value <= high:
        raise _invalid(f"{value} is not a valid {key}: it must be between {low} and {high}", key)
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{key} must be an integer", key)
    if value < low:
        raise _invalid(f"{value} is less than the minimum of {low} - '{key}'", key)
    return value


def _stops(body: dict) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOPS:
        raise _invalid(f"stop takes at most {MAX_STOPS} sequences", "stop")
    return tuple(s for s in stop if s)


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _invalid(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(f"{where} must be a string or a list of text parts", where)


def parse_messages(body: dict) -> list[Message]:
    messages = body.get("messages")
    if messages is None:
        raise _invalid("you must provide a messages parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty array", "messages")
    parsed: list[Message] = []
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _invalid(f"{where}.role {role!r} is not supported; use one of {', '.join(CHAT_ROLES)}",
                           f"{where}.role")
        role = CHAT_ROLES[role]
        if role == "system" and parsed:
            raise _invalid(f"{where}: a system message may only come first", f"{where}.role")
        parsed.append({"role": role, "content": _text_content(message.get("content"), f"{where}.content")})
    if parsed[-1]["role"] != "user":
        raise _invalid("the last message must have role 'user'", f"messages.[{len(parsed) - 1}].role")
    return parsed


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _invalid("prompt must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise _invalid("prompt must not be empty", "prompt")
    return prompt


# ---- the service -------------------------------------------------------------------------------------

class Service:
    def __init__(self, engine: Engine, settings: GenerationSettings, *, served_name: str | None = None,
                 api_key: str | None = None, max_tokens_limit: int = 4096,
                 max_prompt_tokens: int | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.name = served_name or engine.name
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self.created = int(time.time())
        # model id -> adapter on? ("base" ids only exist when an adapter is loaded)
        self.models: dict[str, bool] = {self.name: True}
        if engine.has_adapter:
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
            raise _invalid("you must provide a model parameter", "model")
        if model not in self.models:
            raise APIError(404, f"The model '{model}' does not exist; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[model]

    def settings_for(self, body: dict, default_max_tokens: int) -> GenerationSettings:
        n = _integer(body, "n", 1)
        if n not in (None, 1):
            raise _invalid("only n=1 is supported", "n")
        for key in ("logprobs", "echo"):
            if body.get(key):
                raise _invalid(f"{key} is not supported", key)
        if body.get("tools") or body.get("functions"):
            raise _invalid("tools are not supported", "tools")
        if body.get("suffix"):
            raise _invalid("suffix is not supported", "suffix")
        if not isinstance(body.get("stream", False), bool):
            raise _invalid("stream must be a boolean", "stream")
        max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise _invalid(f"max_tokens is too large: {max_tokens}; this server allows at most "
                           f"{self.max_tokens_limit}", "max_tokens")
        temperature = _number(body, "temperature", 0, 2)
        top_p = _number(body, "top_p", 0, 1)
        _number(body, "presence_penalty", -2, 2)  # accepted and ignored, as many local servers do
        _number(body, "frequency_penalty", -2, 2)
        seed = _integer(body, "seed", -(2**63))
        stops = _stops(body)
        settings = replace(self.settings, max_new_tokens=max_tokens or default_max_tokens)
        if temperature is not None:
            # temperature 0 asks for the most likely answer: greedy decoding.
            settings = replace(settings, do_sample=temperature > 0, temperature=temperature or 1.0)
        if top_p is not None:
            settings = replace(settings, top_p=top_p if top_p > 0 else 1e-6)
        if stops is not None:
            settings = replace(settings, stop=stops)
        if seed is not None:
            settings = replace(settings, seed=seed)
        return settings

    def open(self, prompt: list[Message] | str, settings: GenerationSettings, adapter: bool) -> TextStream:
        """Admit one request and start it; the caller must close the stream and release the slot."""
        try:
            self.engine.acquire_slot()
        except QueueFull as err:
            raise APIError(429, str(err), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "2"}) from None
        try:
            return self.engine.open_stream(prompt, settings, adapter=adapter,
                                           max_prompt_tokens=self.max_prompt_tokens)
        except UniftError as err:
            self.engine.release_slot()
            raise _invalid(str(err)) from None
        except BaseException:
            self.engine.release_slot()
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
                self.engine.release_slot()

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


# ---- the app -----------------------------------------------------------------------------------------

def create_app(engine: Engine, settings: GenerationSettings, *, api_key: str | None = None, ui: bool = True,
               served_name: str | None = None, max_tokens_limit: int = 4096,
               max_prompt_tokens: int | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = Service(engine, settings, served_name=served_name, api_key=api_key,
                      max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    app = FastAPI(title="unift", docs_url="/v1/docs" if not api_key else None, redoc_url=None,
                  openapi_url="/v1/openapi.json" if not api_key else None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        detail = err.detail if isinstance(err.detail, str) else "request failed"
        return JSONResponse(APIError(err.status_code, f"{detail}: {request.method} {request.url.path}",
                                     type_=kind).body(), status_code=err.status_code)

    async def read_body(request: Request) -> dict:
        service.check_key(request.headers.get("authorization"))
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _invalid("We could not parse the JSON body of your request. Send a JSON object "
                           "with 'Content-Type: application/json'.") from None
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        service.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card(m) for m in service.models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        service.check_key(request.headers.get("authorization"))
        service.adapter_for({"model": model_id})
        return model_card(model_id)

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": service.created, "owned_by": "unift"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queued, "max_queue": engine.max_queue,
                "max_batch": engine.scheduler.max_batch, **engine.scheduler.stats}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        adapter = service.adapter_for(body)
        messages = parse_messages(body)
        settings = service.settings_for(body, service.settings.max_new_tokens)
        return await respond(request, body, messages, settings, adapter, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        adapter = service.adapter_for(body)
        prompt = parse_prompt(body)
        settings = service.settings_for(body, 16)  # OpenAI's default max_tokens for completions
        return await respond(request, body, prompt, settings, adapter, chat=False)

    async def respond(request: Request, body: dict, prompt: list[Message] | str, settings: GenerationSettings,
                      adapter: bool, chat: bool):
        stream = service.open(prompt, settings, adapter)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": ident, "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(events(stream, meta, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = await collect(request, stream)
        finally:
            service.finish(stream)
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

    async def events(stream: TextStream, meta: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
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

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str, request: Request):
        # Without it, unknown /v1 paths would fall through to the UI mounted at / and get its 404 page.
        raise APIError(404, f"Unknown request URL: {request.method} /v1/{path}", type_="not_found_error")

    if ui:
        import gradio as gr

        auth = None
        if api_key:
            def auth(username: str, password: str) -> bool:  # any user name; the password is the key
                return hmac.compare_digest(password.encode(), api_key.encode())
        app = gr.mount_gradio_app(app, build_ui(service), path="/", auth=auth,
                                  auth_message="Enter any user name and the server's API key.",
                                  theme=ui_theme(), footer_links=[], ssr_mode=False)
    return app


# ---- the browser UI ----------------------------------------------------------------------------------

TUNED, BASE = "fine-tuned", "base"


def ui_theme():
    import gradio as gr

    # System fonts only: the default theme fetches web fonts, which offline machines cannot reach.
    return gr.themes.Soft(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def build_ui(service: Service):
    """Chat with streaming answers, multi-turn history, a clear button, decoding sliders, base vs tuned."""
    import gradio as gr

    engine, defaults = service.engine, service.settings
    choices = [TUNED, BASE] if engine.has_adapter else [BASE]

    def respond(message: str, history: list[Message], display: list[dict], model: str, temperature: float,
                top_p: float, max_new_tokens: float, repetition_penalty: float):
        message = (message or "").strip()
        if not message:
            yield "", history, display
            return
        history = [*history, {"role": "user", "content": message}]
        display = [*display, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        settings = replace(defaults, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=top_p or 1.0, max_new_tokens=int(max_new_tokens),
                           repetition_penalty=repetition_penalty)
        try:
            engine.acquire_slot()
        except QueueFull as err:
            raise gr.Error(str(err)) from None
        text = ""
        stream = None
        try:
            stream = engine.open_stream(history, settings, adapter=(model == TUNED),
                                        max_prompt_tokens=service.max_prompt_tokens)
            yield "", history, display
            for piece in stream:
                text += piece
                display[-1] = {"role": "assistant", "content": text.lstrip()}
                yield "", history, display
        except UniftError as err:
            raise gr.Error(str(err)) from None
        finally:
            if stream is not None:
                stream.close()  # also when the user presses Stop: frees the model at the next token
            engine.release_slot()
        history = [*history, {"role": "assistant", "content": text.strip()}]
        yield "", history, display

    with gr.Blocks(title=f"unift: {service.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"### unift chat: `{service.name}`" + (
            "  \nThe fine-tuned model, or the base model without the adapter." if engine.has_adapter else ""))
        history = gr.State([])
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot", buttons=["copy"],
                             feedback_options=None)
        with gr.Row():
            box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, scale=5,
                             elem_id="prompt", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("Model and decoding", open=True):
            model = gr.Radio(choices, value=choices[0], label="Model", interactive=len(choices) > 1,
                             elem_id="model")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=defaults.temperature if defaults.do_sample else 0, step=0.05,
                                        label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top p")
                max_new = gr.Slider(1, service.max_tokens_limit, value=min(defaults.max_new_tokens,
                                                                            service.max_tokens_limit),
                                    step=1, label="Max new tokens")
                penalty = gr.Slider(1, 2, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty")
        inputs = [box, history, chatbot, model, temperature, top_p, max_new, penalty]
        outputs = [box, history, chatbot]
        submitted = box.submit(respond, inputs, outputs)
        clicked = send.click(respond, inputs, outputs)
        stop.click(None, None, None, cancels=[submitted, clicked])
        chatbot.clear(lambda: [], None, history, cancels=[submitted, clicked])  # its own trash button
        clear.click(lambda: ("", [], []), None, outputs, cancels=[submitted, clicked])
    # UI users stream concurrently, so the scheduler can batch them with each other and with API clients
    demo.queue(max_size=engine.max_queue, default_concurrency_limit=engine.scheduler.max_batch)
    return demo


def serve(engine: Engine, settings: GenerationSettings, *, host: str = "127.0.0.1", port: int = 7860,
          api_key: str | None = None, ui: bool = True, served_name: str | None = None,
          max_tokens_limit: int = 4096, max_prompt_tokens: int | None = None) -> None:
    import uvicorn

    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without --api_key: anyone who can reach this port can use the model", host)
    app = create_app(engine, settings, api_key=api_key, ui=ui, served_name=served_name,
                     max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    shown = f"[{host}]" if ":" in host else host
    log.info("OpenAI-compatible API at http://%s:%d/v1 (model ids: %s)%s", shown, port,
             ", ".join(app.state.service.models), f"; chat UI at http://{shown}:{port}/" if ui else "")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("UNIFT_SERVE_LOG_LEVEL", "warning"))
