"""The OpenAI wire format of the web service: errors shaped as OpenAI's, and the parsing and validation of
chat and completion requests (messages, prompt, decoding settings) into what the Generator takes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from unift.data import Message
from unift.inference.settings import GenerationSettings

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI's API


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{key} must be a number", key)
    if not low <= value <= high:
        raise invalid(f"{value} is not a valid {key}: it must be between {low} and {high}", key)
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer", key)
    if value < low:
        raise invalid(f"{value} is less than the minimum of {low} - '{key}'", key)
    return value


def _stops(body: dict) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOPS:
        raise invalid(f"stop takes at most {MAX_STOPS} sequences", "stop")
    return tuple(s for s in stop if s)


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where} must be a string or a list of text parts", where)


def parse_messages(body: dict) -> list[Message]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("you must provide a messages parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty array", "messages")
    parsed: list[Message] = []
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role {role!r} is not supported; use one of {', '.join(CHAT_ROLES)}",
                          f"{where}.role")
        role = CHAT_ROLES[role]
        if role == "system" and parsed:
            raise invalid(f"{where}: a system message may only come first", f"{where}.role")
        parsed.append({"role": role, "content": _text_content(message.get("content"), f"{where}.content")})
    if parsed[-1]["role"] != "user":
        raise invalid("the last message must have role 'user'", f"messages.[{len(parsed) - 1}].role")
    return parsed


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    return prompt


def parse_settings(body: dict, defaults: GenerationSettings, default_max_tokens: int,
                   max_tokens_limit: int) -> GenerationSettings:
    """The request's decoding settings over the server's defaults; unsupported options are refused."""
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid("only n=1 is supported", "n")
    for key in ("logprobs", "echo"):
        if body.get(key):
            raise invalid(f"{key} is not supported", key)
    if body.get("tools") or body.get("functions"):
        raise invalid("tools are not supported", "tools")
    if body.get("suffix"):
        raise invalid("suffix is not supported", "suffix")
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream must be a boolean", "stream")
    max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise invalid(f"max_tokens is too large: {max_tokens}; this server allows at most "
                      f"{max_tokens_limit}", "max_tokens")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)  # accepted and ignored, as many local servers do
    _number(body, "frequency_penalty", -2, 2)
    seed = _integer(body, "seed", -(2**63))
    stops = _stops(body)
    settings = replace(defaults, max_new_tokens=max_tokens or default_max_tokens)
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
