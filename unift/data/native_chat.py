"""unift's conversations in the form checkpoints' chat templates take natively (`--template model`): tool
descriptions as the `tools` argument, tool calls as an assistant message's `tool_calls`, tool results as role
"tool". Only used where the chat template renders tools (`renders_tools`); elsewhere tools stay text, as in
`--template auto`, so nothing a template does not know is silently dropped."""

from __future__ import annotations

import json
import weakref
from typing import Any

_PROBE_NAME = "unift_probe_tool"  # a tool name no real template prints unless it renders tools
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}}}
_RENDERS_TOOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tools_argument(tools: str | None) -> list[dict] | None:
    """The system turn's tool descriptions (JSON text) as a list of tool schemas; None when they are not
    JSON objects (they then stay text in the system prompt)."""
    if not tools:
        return None
    try:
        value = json.loads(tools)
    except (TypeError, ValueError):
        return None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        return None
    # OpenAI's {"type": "function", "function": {...}} wrapping, which chat templates expect
    return [v if "function" in v else {"type": "function", "function": v} for v in value]


def tool_call(content: str) -> dict | None:
    """A function_call turn's text ({"name": ..., "arguments": ...}) as an OpenAI-style tool call, or None."""
    try:
        value = json.loads(content)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = value.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends arguments as JSON text; templates print them with tojson
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def native_conversation(system: str | None, tools: str | None, rest: list[dict[str, str]]) \
        -> tuple[list[dict[str, Any]], list[dict] | None] | None:
    """(messages, tools) for apply_chat_template, or None when a tool description or tool call is not JSON
    (the caller then renders the conversation as text)."""
    schemas = tools_argument(tools)
    if tools and schemas is None:
        return None
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    for message in rest:
        role = message["role"]
        if role == "function_call":
            call = tool_call(message["content"])
            if call is None:
                return None
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool" if role == "observation" else role, "content": message["content"]})
    return messages, schemas


def renders_tools(tokenizer: Any, source: str) -> bool:
    """Whether the chat template prints both a tool description and a tool call it is given."""
    cache = _RENDERS_TOOLS.setdefault(tokenizer, {})
    if source not in cache:
        call = {"type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}
        try:
            described = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}], tools=[_PROBE_TOOL], chat_template=source, tokenize=False)
            called = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}],
                chat_template=source, tokenize=False)
            cache[source] = _PROBE_NAME in described and _PROBE_NAME in called
        except Exception:  # noqa: BLE001 (a template that fails on tools does not render them)
            cache[source] = False
    return cache[source]
