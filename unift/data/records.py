"""What every layout's converter shares (unift.data.layouts): the column and tag names, the kinds of record,
field readers with one-line errors naming the record and field, the check of a conversation's turn order,
and the converter base class."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from unift.data.quality import Untrainable
from unift.data.templates import PROMPT_ROLES, TRAINED_ROLES, Message
from unift.errors import UniftError

PREFERENCE_COLUMNS = {"chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history", "tools": "tools", **PREFERENCE_COLUMNS}
CHAT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools", **PREFERENCE_COLUMNS}
TEXT_COLUMNS = {"prompt": "text"}
PAIR_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completion": "completion",
                "label": "label"}
UNSUPPORTED_COLUMNS = {"images": "images", "videos": "videos", "audios": "audio"}
# What a conversation trains: instruction data (sft), a preference pair, or one answer judged good or bad
KINDS = {"sft": "instruction data", "pairs": "preference pairs (chosen and rejected answers)",
         "unpaired": "answers labelled desirable or not (KTO)",
         "prompts": "instruction data (prompts with reference answers, for rewards)"}
# The records a kind reads: GRPO's prompts come from instruction data (the answer becomes the reference)
RECORD_KIND = {"prompts": "sft"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
MESSAGES_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
# Role names seen in the wild, understood whatever the tags say.
ROLE_SYNONYMS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "chatgpt": "assistant", "system": "system", "developer": "system",
                 "function_call": "function_call", "observation": "observation", "tool": "observation",
                 "function": "observation"}
FORMAT_ALIASES = {"openai": "messages", "pt": "text", "plain": "text", "pretrain": "text"}
FORMATS = ("alpaca", "cot", "sharegpt", "messages", "text", "preference")


def conversation_kind(messages: list[Message]) -> str:
    """sft, pairs or unpaired: what the last turn of a converted record carries."""
    last = messages[-1] if messages else {}
    return "pairs" if "rejected" in last else "unpaired" if "label" in last else "sft"


def _verdict(value: Any, where: str, column: str) -> bool:
    """A KTO label: true/false, or LLaMA-Factory's kto_tag written as a string or 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UniftError(f"{where}: field {column!r} must be true or false, found {value!r}")


def _string(record: dict, column: str, where: str, required: bool, mapped_from: str | None = None) -> str:
    value = record.get(column)
    label = f"field {column!r}" + (f" (mapped from {mapped_from!r})" if mapped_from else "")
    if value is None or (value == "" and not required):
        if required:
            raise UniftError(f"{where}: {label} is missing")
        return ""
    if not isinstance(value, str):
        raise UniftError(f"{where}: {label} must be a string, found {type(value).__name__}")
    return value


def _tools(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if value in (None, "", [], {}):
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise UniftError(f"{where}: field {column!r} must be a JSON text or a list, found {type(value).__name__}")
    return value


def check_turns(messages: list[Message], where: str, field: str, notes: Counter) -> list[Message]:
    """Validate the order of roles; leading assistant turns (some sharegpt sources open with a greeting)
    are dropped and counted, since there is no prompt they answer."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    numbers = list(range(len(system) + 1, len(messages) + 1))  # 1-based turn numbers for messages
    lead = 0
    while lead < len(turns) and turns[lead]["role"] in TRAINED_ROLES:
        lead += 1
    if lead:
        notes["leading assistant turns dropped"] += 1
        turns, numbers = turns[lead:], numbers[lead:]
    if not turns:
        raise Untrainable(f"{where}: field {field!r} has no user turn")
    previous = None
    allowed = {None: PROMPT_ROLES[:1], "user": TRAINED_ROLES, "assistant": ("user",),
               "function_call": ("observation",), "observation": TRAINED_ROLES}
    for number, message in zip(numbers, turns):
        role = message["role"]
        if role == "system":
            raise UniftError(f"{where}: field {field!r} turn {number}: a system turn is only allowed first")
        if role not in allowed[previous]:
            after = f"after the {previous} turn" if previous else "first"
            expected = " or ".join(repr(r) for r in allowed[previous])
            raise UniftError(f"{where}: field {field!r} turn {number}: expected {expected} {after}, found {role!r}")
        if role in TRAINED_ROLES and not message["content"].strip():
            raise Untrainable(f"{where}: field {field!r} turn {number}: the {role} text is empty")
        previous = role
    if previous not in TRAINED_ROLES:
        raise Untrainable(f"{where}: field {field!r}: the conversation ends on a {previous} turn, with no "
                          "answer to train on")
    return system + turns


class Converter:
    """Turns the records of one source into conversations; column names and role tags resolved once."""

    format: str = ""
    defaults: dict[str, str] = {}

    def __init__(self, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        columns = dict(columns or {})
        for key in columns:
            if key in UNSUPPORTED_COLUMNS:
                raise UniftError(f"column {key!r}: {UNSUPPORTED_COLUMNS[key]} are not supported (text only)")
            if key not in self.defaults:
                raise UniftError(f"unknown column mapping key {key!r} for format {self.format}; known: "
                                 f"{', '.join(self.defaults)}")
        self.mapped = columns  # the user's explicit mapping: these columns must exist
        self.col = {**self.defaults, **columns}
        self.tags = tags or {}
        self.notes: Counter = Counter()

    def required(self) -> list[str]:
        return []

    def check_columns(self, present: list[str], where: str, declared: bool) -> None:
        """A mapping that names a missing column fails once, up front. With a header (declared) every
        mapped column must exist; in JSON records only the required ones (optional ones may be absent)."""
        needed = self.mapped if declared else {k: v for k, v in self.mapped.items() if k in self.required()}
        for key, column in needed.items():
            if column not in present:
                raise UniftError(f"{where}: column mapping {key} -> {column!r} names a missing column "
                                 f"(found: {', '.join(map(str, present)) or 'none'})")

    def __call__(self, record: dict, where: str) -> list[Message]:
        raise NotImplementedError
