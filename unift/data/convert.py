"""Conversations back to records in the three common forms: alpaca, sharegpt and OpenAI-style messages.

Reading any supported format and writing another is `unift data convert`; reading the written file back
gives the same conversations (tested), so a conversion never changes what is trained on.
"""

from __future__ import annotations

import json
from typing import Any

from unift.data.templates import Message, split_system
from unift.errors import UniftError

TARGETS = ("alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "function_call": "function_call",
                  "observation": "observation"}


def _check_chat(messages: list[Message], where: str, target: str) -> None:
    if messages and messages[0]["role"] == "text":
        raise UniftError(f"{where}: plain text (pre-training) data has no {target} form")


def to_alpaca(messages: list[Message], where: str) -> dict[str, Any]:
    _check_chat(messages, where, "alpaca")
    system, tools, turns = split_system(messages)
    if any(m["role"] in ("function_call", "observation") for m in turns):
        raise UniftError(f"{where}: alpaca has no place for tool calls; convert to sharegpt or messages")
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]
    record: dict[str, Any] = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if system:
        record["system"] = system
    if tools:
        record["tools"] = tools
    if len(pairs) > 1:
        record["history"] = pairs[:-1]
    return record


def to_sharegpt(messages: list[Message], where: str) -> dict[str, Any]:
    """LLaMA-Factory's sharegpt layout: system and tools as columns beside the turns."""
    _check_chat(messages, where, "sharegpt")
    system, tools, turns = split_system(messages)
    record: dict[str, Any] = {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]}
                                                for m in turns]}
    if system:
        record["system"] = system
    if tools:
        record["tools"] = tools
    return record


def _tool_calls(content: str) -> list[dict] | None:
    """A function_call text that is a JSON call (or list of calls) as OpenAI tool_calls, else None."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) else [value]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) and set(c) <= {"name", "arguments"}
               for c in calls):
        return None
    return [{"type": "function", "function": {
        "name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}} for c in calls]


def to_messages(messages: list[Message], where: str) -> dict[str, Any]:
    _check_chat(messages, where, "messages")
    system, tools, turns = split_system(messages)
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in turns:
        role = message["role"]
        if role == "function_call":
            calls = _tool_calls(message["content"])
            out.append({"role": "assistant", "content": None, "tool_calls": calls} if calls
                       else {"role": "assistant", "content": message["content"]})
        else:
            out.append({"role": "tool" if role == "observation" else role, "content": message["content"]})
    record: dict[str, Any] = {"messages": out}
    if tools:
        try:
            record["tools"] = json.loads(tools)
        except json.JSONDecodeError:
            record["tools"] = tools
    return record


CONVERT = {"alpaca": to_alpaca, "sharegpt": to_sharegpt, "messages": to_messages}


def convert_record(messages: list[Message], target: str, where: str) -> dict[str, Any]:
    if target not in CONVERT:
        raise UniftError(f"unknown target form {target!r}; known: {', '.join(TARGETS)}")
    return CONVERT[target](messages, where)
