"""Records to conversations, one converter per layout, with one-line errors naming the record and field.

Layouts (the --data formats):
  alpaca    instruction, input, output, optional system, history ([[question, answer], ...]), tools
  cot       alpaca as the Alpaca-CoT collection ships it: literal "\\n" escapes are turned into newlines
  sharegpt  conversations: [{from, value}] with roles human, gpt, system, function_call, observation; tools
  messages  OpenAI-style messages: [{role, content}] with user, assistant, system, tool (and tool_calls)
  text      plain text for continued pre-training (a "text" field, or .txt lines)
  preference  TRL's layouts: {prompt, chosen, rejected} (paired; text or message lists, the prompt implicit
            when chosen and rejected are whole conversations) and {prompt, completion, label} (unpaired, KTO)
alpaca and sharegpt also read LLaMA-Factory's ranking entries (chosen and rejected columns; in sharegpt the
conversation ends on the user turn and each answer is a {from, value} object) and its kto_tag column.
A preference record becomes a conversation whose last assistant turn carries the other answer under
"rejected" (paired) or the verdict under "label" (unpaired); see conversation_kind.
Column names can be mapped (LLaMA-Factory's `columns` and `tags`). Reading the files is unift.data.readers';
joining the two over a file or folder is unift.data.conversations'.
"""

from __future__ import annotations

import json
from typing import Any

from unift.data.quality import Untrainable
from unift.data.records import (
    ALPACA_COLUMNS,
    CHAT_COLUMNS,
    FORMAT_ALIASES,
    FORMATS,
    KINDS,
    MESSAGES_TAGS,
    PAIR_COLUMNS,
    ROLE_SYNONYMS,
    SHAREGPT_TAGS,
    TEXT_COLUMNS,
    Converter,
    _string,
    _tools,
    _verdict,
    check_turns,
    conversation_kind,
)
from unift.data.templates import Message
from unift.errors import UniftError

__all__ = ["CONVERTERS", "FORMATS", "KINDS", "Converter", "conversation_kind", "detect_format", "normalize_format"]

class AlpacaConverter(Converter):
    format = "alpaca"
    defaults = ALPACA_COLUMNS

    def required(self) -> list[str]:
        return ["prompt", "response"]

    def _field(self, record: dict, key: str, where: str, required: bool) -> str:
        return _string(record, self.col[key], where, required, key if key in self.mapped else None)

    def clean(self, text: str) -> str:
        return text

    def __call__(self, record: dict, where: str) -> list[Message]:
        col = self.col
        instruction = self.clean(self._field(record, "prompt", where, required=True))
        extra = self.clean(self._field(record, "query", where, required=False))
        paired = col["chosen"] in record or col["rejected"] in record
        answer = "chosen" if paired else "response"
        output = self.clean(self._field(record, answer, where, required=True))
        if not instruction.strip() and not extra.strip():
            raise Untrainable(f"{where}: field {col['prompt']!r} is empty")
        if not output.strip():
            raise Untrainable(f"{where}: field {col[answer]!r} is empty")
        if "\\n" in instruction + output and self.format == "alpaca":
            self.notes["records with literal \\n escapes (Alpaca-CoT data? use formatting 'cot')"] += 1
        messages: list[Message] = []
        system = self._field(record, "system", where, required=False)
        tools = _tools(record, col["tools"], where)
        if system or tools:
            messages.append({"role": "system", "content": system, **({"tools": tools} if tools else {})})
        history = record.get(col["history"]) or []
        if not isinstance(history, list):
            raise UniftError(f"{where}: field {col['history']!r} must be a list of [question, answer] pairs")
        for turn, pair in enumerate(history, start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UniftError(f"{where}: field {col['history']!r} turn {turn} must be a [question, answer] pair")
            if not pair[1].strip():
                raise Untrainable(f"{where}: field {col['history']!r} turn {turn}: the answer is empty")
            messages += [{"role": "user", "content": self.clean(pair[0])},
                         {"role": "assistant", "content": self.clean(pair[1])}]
        prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction + extra)
        last: Message = {"role": "assistant", "content": output}
        if paired:
            last["rejected"] = self._rejected(self.clean(self._field(record, "rejected", where, required=True)),
                                              where)
        elif record.get(col["kto_tag"]) is not None:
            last["label"] = _verdict(record[col["kto_tag"]], where, col["kto_tag"])
        messages += [{"role": "user", "content": prompt}, last]
        return messages

    def _rejected(self, text: str, where: str) -> str:
        if not text.strip():
            raise Untrainable(f"{where}: field {self.col['rejected']!r} is empty")
        return text


class CotConverter(AlpacaConverter):
    """Alpaca-CoT's formatted CoT files store newlines as the two characters backslash and n."""

    format = "cot"

    def clean(self, text: str) -> str:
        return text.replace("\\n", "\n")


class ChatConverter(Converter):
    """sharegpt ({from, value}) and OpenAI-style messages ({role, content}); tags may rename both."""

    format = "sharegpt"
    defaults = CHAT_COLUMNS
    default_tags = SHAREGPT_TAGS

    def __init__(self, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        super().__init__(columns, tags)
        unknown = sorted(set(self.tags) - set(SHAREGPT_TAGS))
        if unknown:
            raise UniftError(f"unknown tags key(s) {', '.join(unknown)}; known: {', '.join(SHAREGPT_TAGS)}")
        tags = {**self.default_tags, **self.tags}
        self.role_tag, self.content_tag = tags["role_tag"], tags["content_tag"]
        self.roles = dict(ROLE_SYNONYMS)
        for key, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
                          ("function_tag", "function_call"), ("observation_tag", "observation")):
            self.roles[tags[key]] = role
        self.known = sorted({tags[k] for k in tags if k.endswith("_tag") and k not in ("role_tag", "content_tag")})

    def required(self) -> list[str]:
        return ["messages"]

    def _content(self, message: dict, where: str) -> str:
        value = message.get(self.content_tag)
        if isinstance(value, list):  # OpenAI content parts: text only
            texts = []
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise UniftError(f"{where}: only text content is supported, found a {kind!r} part")
                texts.append(part["text"])
            return "".join(texts)
        if value is None and message.get("tool_calls"):
            return ""
        if not isinstance(value, str):
            found = "nothing" if value is None else type(value).__name__
            raise UniftError(f"{where}: {self.content_tag!r} must be a string, found {found}")
        return value

    @staticmethod
    def _tool_calls(calls: Any, text: str, where: str) -> str:
        if not isinstance(calls, list) or not calls:
            raise UniftError(f"{where}: 'tool_calls' must be a non-empty list")
        out = []
        for call in calls:
            function = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise UniftError(f"{where}: each tool call needs a function name")
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass  # keep the text as the model should reproduce it
            out.append({"name": function["name"], "arguments": arguments})
        payload = json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)
        return f"{text}\n{payload}" if text.strip() else payload

    def __call__(self, record: dict, where: str) -> list[Message]:
        field = self.col["messages"]
        turns = record.get(field)
        label = f"field {field!r}" + (" (mapped from 'messages')" if "messages" in self.mapped else "")
        if turns is None:
            raise UniftError(f"{where}: {label} is missing")
        if not isinstance(turns, list):
            raise UniftError(f"{where}: {label} must be a list of turns, found {type(turns).__name__}")
        if not turns:
            raise Untrainable(f"{where}: {label} is empty")
        messages: list[Message] = []
        for number, turn in enumerate(turns, start=1):
            at = f"{where}: field {field!r} turn {number}"
            if not isinstance(turn, dict):
                raise UniftError(f"{at}: expected an object, found {type(turn).__name__}")
            tag = turn.get(self.role_tag)
            if tag is None:
                raise UniftError(f"{at}: {self.role_tag!r} is missing")
            role = self.roles.get(tag) if isinstance(tag, str) else None
            if role is None:
                raise UniftError(f"{at}: unknown role {tag!r} (known: {', '.join(self.known)})")
            content = self._content(turn, at)
            if role == "assistant" and turn.get("tool_calls"):
                role, content = "function_call", self._tool_calls(turn["tool_calls"], content, at)
            messages.append({"role": role, "content": content})
        system = _string(record, self.col["system"], where, required=False)
        tools = _tools(record, self.col["tools"], where)
        if system or tools:
            if messages[0]["role"] == "system":
                system = (messages[0]["content"] + "\n\n" + system) if system else messages[0]["content"]
                messages = messages[1:]
            messages.insert(0, {"role": "system", "content": system, **({"tools": tools} if tools else {})})
        col = self.col
        if col["chosen"] in record or col["rejected"] in record:  # LLaMA-Factory's ranking: answers apart
            chosen = self._answer(record, "chosen", where)
            messages.append({"role": "assistant", "content": chosen, "rejected": self._answer(record, "rejected", where)})
        messages = check_turns(messages, where, field, self.notes)
        if record.get(col["kto_tag"]) is not None:
            messages[-1]["label"] = _verdict(record[col["kto_tag"]], where, col["kto_tag"])
        return messages

    def _answer(self, record: dict, key: str, where: str) -> str:
        """A ranking entry's answer: a {from, value} object (or a plain string), never empty."""
        column = self.col[key]
        value = record.get(column)
        if value is None:
            raise UniftError(f"{where}: field {column!r} is missing")
        text = self._content(value, f"{where}: field {column!r}") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise UniftError(f"{where}: field {column!r} must be a {{{self.role_tag}, {self.content_tag}}} object or "
                             f"a string, found {type(value).__name__}")
        if not text.strip():
            raise Untrainable(f"{where}: field {column!r} is empty")
        return text


class MessagesConverter(ChatConverter):
    format = "messages"
    defaults = {**CHAT_COLUMNS, "messages": "messages"}
    default_tags = MESSAGES_TAGS


class TextConverter(Converter):
    format = "text"
    defaults = TEXT_COLUMNS

    def required(self) -> list[str]:
        return ["prompt"]

    def __call__(self, record: dict, where: str) -> list[Message]:
        text = _string(record, self.col["prompt"], where, True, "prompt" if "prompt" in self.mapped else None)
        if not text.strip():
            raise Untrainable(f"{where}: field {self.col['prompt']!r} is empty")
        return [{"role": "text", "content": text}]


class PreferenceConverter(Converter):
    """TRL's preference layouts. Paired: {prompt, chosen, rejected}, each a text or a message list; without a
    prompt, chosen and rejected are whole conversations that differ in their last (assistant) turn. Unpaired
    (KTO): {prompt, completion, label}."""

    format = "preference"
    defaults = PAIR_COLUMNS

    def __init__(self, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        super().__init__(columns, tags)
        self.chat = MessagesConverter(None, tags)

    def required(self) -> list[str]:
        return []

    def _turns(self, record: dict, key: str, where: str, role: str) -> list[dict]:
        column = self.col[key]
        value = record.get(column)
        if value is None:
            raise UniftError(f"{where}: field {column!r} is missing")
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        if isinstance(value, list) and all(isinstance(turn, dict) for turn in value) and value:
            return value
        raise UniftError(f"{where}: field {column!r} must be a text or a non-empty list of "
                         f"{{role, content}} messages, found {type(value).__name__}")

    def __call__(self, record: dict, where: str) -> list[Message]:
        col = self.col
        unpaired = col["completion"] in record or col["label"] in record
        answer = "completion" if unpaired else "chosen"
        chosen = self._turns(record, answer, where, "assistant")
        if col["prompt"] in record:
            prompt = self._turns(record, "prompt", where, "user")
            other = None if unpaired else self._turns(record, "rejected", where, "assistant")
        else:  # implicit prompt: the shared start of two whole conversations
            if unpaired:
                raise UniftError(f"{where}: field {col['prompt']!r} is missing")
            prompt, chosen = chosen[:-1], chosen[-1:]
            other = self._turns(record, "rejected", where, "assistant")
            if other[:-1] != prompt:
                raise UniftError(f"{where}: fields {col['chosen']!r} and {col['rejected']!r} must share every turn "
                                 "but the last (the prompt), or give the prompt in its own field")
            other = other[-1:]
        if len(chosen) != 1 or (other is not None and len(other) != 1):
            raise UniftError(f"{where}: each answer must be one assistant message")
        for key, turns in ((answer, chosen), ("rejected", other or [])):
            text = turns[0].get("content") if turns else "?"
            if isinstance(text, str) and not text.strip():
                raise Untrainable(f"{where}: field {col[key]!r} is empty")
        messages = self.chat({"messages": prompt + chosen}, where)
        if other is not None:
            rejected = self.chat({"messages": prompt + other}, where)[-1]
            messages[-1]["rejected"] = rejected["content"]
        else:
            if col["label"] not in record:
                raise UniftError(f"{where}: field {col['label']!r} is missing")
            messages[-1]["label"] = _verdict(record[col["label"]], where, col["label"])
        return messages


CONVERTERS: dict[str, type[Converter]] = {
    "alpaca": AlpacaConverter, "cot": CotConverter, "sharegpt": ChatConverter, "messages": MessagesConverter,
    "text": TextConverter, "preference": PreferenceConverter,
}


def normalize_format(name: str | None) -> str | None:
    if name is None:
        return None
    name = FORMAT_ALIASES.get(name, name)
    if name not in CONVERTERS:
        raise UniftError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return name


def detect_format(record: dict, columns: dict | None = None, tags: dict | None = None) -> str:
    """The format of a record from its fields (and any column mapping)."""
    columns = columns or {}
    if "messages" in columns:
        return "messages" if (tags or {}).get("role_tag") == "role" else "sharegpt"
    if "response" in columns or ("prompt" in columns and "query" in columns):
        return "alpaca"
    if set(columns) == {"prompt"}:  # LLaMA-Factory's pre-training entries map only the text column
        return "text"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" not in record and ("chosen" in record or "completion" in record):
        return "preference"
    if "messages" in record:
        first = record["messages"][0] if isinstance(record["messages"], list) and record["messages"] else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise UniftError(
        f"cannot tell the format of a record with fields {sorted(record)}; name the format and map the "
        "columns in dataset_info.json"
    )
