"""Conversations -> input_ids and labels, with every non-assistant token masked (-100).

The text is split at the template's own boundaries: for each trained turn (assistant, function_call), the
rendering of the conversation before it (with the generation prompt) is a prefix of the rendering that
includes it. The difference is exactly the answer, including the end-of-turn token, so the model learns
to stop. Each piece is tokenized on its own, and inference builds its prompt from the same pieces
(`encode_prompt`), so a multi-turn chat feeds the model exactly the token ids it was trained on. A chat
template that renders an earlier turn otherwise once later turns follow (one that strips earlier answers'
reasoning) has no such prefixes: the whole conversation is rendered once and each answer located in it
(`_located`), and its inference prompts are its own rendering, tokenized the same way.
Plain-text conversations (one "text" message) are trained whole, followed by EOS.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from unift.data.templates import TRAINED_ROLES, Message, end_of_turn
from unift.errors import UniftError

IGNORE_INDEX = -100
# What --cutoff_len does to a conversation that is too long: "drop"/"keep" cut the prompt and earlier turns
# from the front (an answer that alone exceeds the cutoff is dropped, or kept cut at its end); "split"
# shares the cut between each prompt and its answer, turn by turn (LLaMA-Factory's rule, see _split_lengths)
TRUNCATION = ("drop", "keep", "split")
_CONTEXT_CHARS = 32  # text before a piece that SentencePiece-style tokenizers see while encoding it

_PREFIXING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _raw(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def adds_prefix_space(tokenizer) -> bool:
    """Whether the tokenizer puts a space marker before text it starts on (SentencePiece's dummy prefix:
    Llama 2, InternLM, Baichuan). Such tokenizers must encode a piece in the context of the text before it,
    or each piece would start with an extra "▁"."""
    if tokenizer not in _PREFIXING:
        tokens = tokenizer.convert_ids_to_tokens(_raw(tokenizer, "a"))
        _PREFIXING[tokenizer] = bool(tokens) and tokens[0][:1] in ("▁", "Ġ")
    return _PREFIXING[tokenizer]


def bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself starts every text with it (Llama 2 and other SentencePiece
    models), so conversations rendered without it (alpaca, vicuna, chatml, ...) still get it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    known = _ADDS_BOS.setdefault(tokenizer, {})
    if bos not in known:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        known[bos] = with_special[:1] == [bos] and _raw(tokenizer, "a")[:1] != [bos]
    return bos if known[bos] else None


def _ids(tokenizer, text: str, before: str = "") -> list[int]:
    """Token ids of `text` as they are inside the whole rendering, where `before` precedes it."""
    if not text:
        return []
    if before and adds_prefix_space(tokenizer):
        context = before[-_CONTEXT_CHARS:]
        head, joined = _raw(tokenizer, context), _raw(tokenizer, context + text)
        if joined[: len(head)] == head:
            return joined[len(head):]
    return _raw(tokenizer, text)


def is_text(messages: list[Message]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "text"


def _not_prefix(template) -> UniftError:
    return UniftError(
        f"template {template.name}: renderings are not prefixes of each other, so the answer "
        "tokens cannot be located; choose another --template"
    )


def _pieces(messages: list[Message], template, tokenizer) -> tuple[list[tuple[str, bool]], str]:
    """(text, is_answer) pieces up to the end of the last trained turn, and that rendered text.

    Where the template ends an answer with nothing (GLM-4's own chat template), EOS is appended to the
    answer piece, so the model learns to stop."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    eos = "" if end_of_turn(template, tokenizer) else (getattr(tokenizer, "eos_token", None) or "")
    for i, message in enumerate(messages):
        if message["role"] not in TRAINED_ROLES:
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        full = template.render(messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            located = _located(messages, template, tokenizer, generation_prompt=False)
            if located is None:
                raise _not_prefix(template)
            return located[0], located[1]
        pieces += [(prompt[len(done):], False), (full[len(prompt):] + eos, True)]
        done = full
    return pieces, done


_MARK = "\u2063unift-turn\u2063"  # text no real answer contains


def _located(messages: list[Message], template, tokenizer, generation_prompt: bool) \
        -> tuple[list[tuple[str, bool]], str, str] | None:
    """For chat templates that render an earlier turn otherwise once later turns follow (those that strip
    earlier answers' reasoning): the conversation rendered once, each trained turn located in it by
    rendering it again with that turn's text replaced by a marker. (pieces, the text they cover, the whole
    rendering), or None where a turn's text does not appear verbatim (a template that rewrites it)."""
    trained = [i for i, m in enumerate(messages) if m["role"] in TRAINED_ROLES]
    last = len(messages) if generation_prompt else trained[-1] + 1
    turns = messages[:last]
    whole = template.render(turns, add_generation_prompt=generation_prompt, tokenizer=tokenizer)
    eos = "" if end_of_turn(template, tokenizer) else (getattr(tokenizer, "eos_token", None) or "")
    starts = _token_starts(tokenizer, whole)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i in trained:
        marked = [*turns[:i], {**turns[i], "content": _MARK}]
        try:
            before, found, after = template.render([*marked, *turns[i + 1:]], add_generation_prompt=generation_prompt,
                                                   tokenizer=tokenizer).partition(_MARK)
            # what the template writes after this answer when it is the last turn: its end of turn
            tail = template.render(marked, add_generation_prompt=False, tokenizer=tokenizer).partition(_MARK)[2]
        except UniftError:  # e.g. a tool call whose text is no longer JSON
            return None
        content = turns[i]["content"]
        if not found or before + content + after != whole or len(before) < done:
            return None
        end = len(before) + len(content) + (len(tail) if tail and after.startswith(tail) else 0)
        pieces += [*_cut(whole, done, len(before), starts), (whole[len(before):end] + eos, True)]
        done = end
    return pieces, whole[:done], whole


def _token_starts(tokenizer, text: str) -> list[int] | None:
    """Where the tokens of the whole text start (None: the tokenizer gives no offsets)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return None
    return sorted({start for start, end in offsets if end > start})


def _cut(text: str, start: int, end: int, starts: list[int] | None) -> list[tuple[str, bool]]:
    """text[start:end] as prompt pieces cut where the whole text's tokens start: a piece tokenized alone
    then gives the tokens the whole text has there (alone, "</think>\n\n" would end in one "\n\n" token
    where the whole text, followed by the answer, has two)."""
    cuts = [start, *(s for s in starts or () if start < s < end), end]
    return [(text[a:b], False) for a, b in zip(cuts, cuts[1:]) if a < b]


def segments(messages: list[Message], template, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces."""
    if is_text(messages):
        return [(messages[0]["content"] + (tokenizer.eos_token or ""), True)]
    return _pieces(messages, template, tokenizer)[0]


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer) -> list[tuple[list[int], bool]]:
    """Each piece's ids in the context of the text before it, BOS first where the tokenizer expects it."""
    encoded: list[tuple[list[int], bool]] = []
    before = ""
    for text, is_answer in pieces:
        encoded.append((_ids(tokenizer, text, before), is_answer))
        before += text
    bos = bos_to_add(tokenizer)
    first = next((ids for ids, _ in encoded if ids), [])
    if bos is not None and first[:1] != [bos]:
        encoded.insert(0, ([bos], False))
    return encoded


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the prompt or earlier turns were cut to fit --cutoff_len
    length: int = 0  # tokens before the cutoff
    long_answer: bool = False  # the last answer alone exceeds --cutoff_len (dropped, or kept cut)


def encode_conversation(
    messages: list[Message], template, tokenizer, cutoff_len: int, train_on_prompt: bool = False,
    truncation: str = "drop",
) -> Encoded:
    """input_ids and labels. Too long: the prompt and earlier turns are cut from the front, so the last
    answer keeps its end-of-turn token. An answer that alone exceeds the cutoff is dropped (its labels all
    masked, so the row is left out) or, with truncation="keep", trained cut at the end (without an end).
    truncation="split" instead shares the cut between each prompt and its answer (_split_cut)."""
    input_ids: list[int] = []
    labels: list[int] = []
    answer = 0  # tokens of the last trained turn (the last piece)
    for ids, is_answer in _encode_pieces(segments(messages, template, tokenizer), tokenizer):
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
        answer = len(ids) if is_answer else answer
    length = len(input_ids)
    if length <= cutoff_len:
        return Encoded(input_ids, labels, False, length)
    if truncation == "split" and not is_text(messages):
        return _split_cut(messages, template, tokenizer, cutoff_len, train_on_prompt, length)
    if is_text(messages):  # continued pre-training: no prompt to give up, the text is cut at the end
        return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], True, length)
    bos = bos_to_add(tokenizer)
    keep_bos = bos is not None and input_ids[:1] == [bos]
    if answer + int(keep_bos) >= cutoff_len:
        cut_ids, cut_labels = input_ids[:cutoff_len], labels[:cutoff_len]
        if truncation != "keep":
            cut_labels = [IGNORE_INDEX] * len(cut_labels)
        return Encoded(cut_ids, cut_labels, False, length, long_answer=True)
    tail = cutoff_len - int(keep_bos)
    head_ids, head_labels = ([bos], [IGNORE_INDEX]) if keep_bos else ([], [])
    return Encoded(head_ids + input_ids[-tail:], head_labels + labels[-tail:], True, length)


def _split_lengths(source: int, target: int, budget: int) -> tuple[int, int]:
    """How many tokens of a prompt (`source`) and its answer (`target`) fit in `budget`: a short answer is
    kept whole and the prompt cut; else a short prompt is kept whole and the answer cut; else both are cut
    in proportion to their lengths (the rule LLaMA-Factory applies, so both tools can train the same
    tokens)."""
    if 2 * target < budget:
        target_max = budget
    elif 2 * source < budget:
        target_max = budget - source
    else:
        target_max = int(budget * (target / (source + target)))
    new_target = min(target_max, target)
    return min(max(budget - new_target, 0), source), new_target


def _split_cut(messages: list[Message], template, tokenizer, cutoff_len: int, train_on_prompt: bool,
               length: int) -> Encoded:
    """truncation="split": turn by turn, each prompt keeps its start and each answer its start, the cut
    shared by _split_lengths within what the earlier turns left of the cutoff."""
    pairs: list[tuple[list[int], list[int]]] = []
    source: list[int] = []
    for ids, is_answer in _encode_pieces(segments(messages, template, tokenizer), tokenizer):
        if is_answer:
            pairs.append((source, ids))
            source = []
        else:
            source = source + ids  # BOS and the prompt before an answer belong to its turn
    input_ids: list[int] = []
    labels: list[int] = []
    long_answer = False
    for source, target in pairs:
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            break
        keep_source, keep_target = _split_lengths(len(source), len(target), budget)
        long_answer = keep_target < len(target)
        input_ids += source[:keep_source] + target[:keep_target]
        labels += (source[:keep_source] if train_on_prompt else [IGNORE_INDEX] * keep_source) + target[:keep_target]
    return Encoded(input_ids, labels, True, length, long_answer=long_answer)


def encode_prompt(messages: list[Message], template, tokenizer) -> list[int]:
    """Token ids of the generation prompt for a conversation that ends with a user (or tool-result) turn:
    the earlier turns tokenized piece by piece exactly as in training, then the new prompt."""
    pieces, done = _pieces(messages, template, tokenizer)
    prompt = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
    if not prompt.startswith(done):  # a template that renders the earlier turns otherwise now (see _located)
        located = _located(messages, template, tokenizer, generation_prompt=True)
        if located is None:
            raise _not_prefix(template)
        pieces, done, prompt = located
    ids: list[int] = []
    for piece_ids, _ in _encode_pieces([*pieces, (prompt[len(done):], False)], tokenizer):
        ids += piece_ids
    return ids


def tokenize_conversations(
    conversations: list[list[Message]], template, tokenizer, cutoff_len: int, train_on_prompt: bool = False,
    truncation: str = "drop",
) -> tuple[list[dict], dict]:
    """Encode all conversations; drop those left without an answer token. Returns rows and stats."""
    rows, truncated, dropped, long_answers = [], 0, 0, 0
    for messages in conversations:
        enc = encode_conversation(messages, template, tokenizer, cutoff_len, train_on_prompt, truncation)
        truncated += enc.truncated
        long_answers += enc.long_answer
        if all(label == IGNORE_INDEX for label in enc.labels):
            dropped += 1
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    if not rows:
        raise UniftError(f"no example has an answer token within --cutoff_len {cutoff_len}; raise it")
    return rows, {"examples": len(rows), "truncated": truncated, "dropped": dropped, "long_answers": long_answers}
