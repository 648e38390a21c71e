"""Conversations -> input_ids and labels, with every non-assistant token masked (-100).

The text is split at the template's own boundaries: for each trained turn (assistant, function_call), the
rendering of the conversation before it (with the generation prompt) is a prefix of the rendering that
includes it. The difference is exactly the answer, including the end-of-turn token, so the model learns
to stop. Each piece is tokenized on its own, and inference builds its prompt from the same pieces
(`encode_prompt`), so a multi-turn chat feeds the model exactly the token ids it was trained on.
Plain-text conversations (one "text" message) are trained whole, followed by EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from unift.data.templates import TRAINED_ROLES, Message
from unift.errors import UniftError

IGNORE_INDEX = -100


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def is_text(messages: list[Message]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "text"


def _not_prefix(template) -> UniftError:
    return UniftError(
        f"template {template.name}: renderings are not prefixes of each other, so the answer "
        "tokens cannot be located; choose another --template"
    )


def _pieces(messages: list[Message], template, tokenizer) -> tuple[list[tuple[str, bool]], str]:
    """(text, is_answer) pieces up to the end of the last trained turn, and that rendered text."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] not in TRAINED_ROLES:
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        full = template.render(messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise _not_prefix(template)
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces, done


def segments(messages: list[Message], template, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces."""
    if is_text(messages):
        return [(messages[0]["content"] + (tokenizer.eos_token or ""), True)]
    return _pieces(messages, template, tokenizer)[0]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int = 0  # tokens before the cutoff


def encode_conversation(
    messages: list[Message], template, tokenizer, cutoff_len: int, train_on_prompt: bool = False
) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments(messages, template, tokenizer):
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    length = len(input_ids)
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], length > cutoff_len, length)


def encode_prompt(messages: list[Message], template, tokenizer) -> list[int]:
    """Token ids of the generation prompt for a conversation that ends with a user (or tool-result) turn:
    the earlier turns tokenized piece by piece exactly as in training, then the new prompt."""
    pieces, done = _pieces(messages, template, tokenizer)
    prompt = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
    if not prompt.startswith(done):
        raise _not_prefix(template)
    ids: list[int] = []
    for text, _ in pieces:
        ids += _ids(tokenizer, text)
    return ids + _ids(tokenizer, prompt[len(done):])


def tokenize_conversations(
    conversations: list[list[Message]], template, tokenizer, cutoff_len: int, train_on_prompt: bool = False
) -> tuple[list[dict], dict]:
    """Encode all conversations; drop those whose answer was cut off entirely. Returns rows and stats."""
    rows, truncated, dropped = [], 0, 0
    for messages in conversations:
        enc = encode_conversation(messages, template, tokenizer, cutoff_len, train_on_prompt)
        truncated += enc.truncated
        if all(label == IGNORE_INDEX for label in enc.labels):
            dropped += 1
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    if not rows:
        raise UniftError(f"no example has an answer token within --cutoff_len {cutoff_len}; raise it")
    return rows, {"examples": len(rows), "truncated": truncated, "dropped": dropped}
