"""Loss masking is exact for every template: the trained tokens are the assistant turns (and tool calls)
and nothing else, multi-turn and tool conversations included; inference prompts are the training prefixes."""

from __future__ import annotations

import json

import pytest

from unift.data import IGNORE_INDEX, TEMPLATES, encode_conversation, encode_prompt, get_template
from unift.data.templates import TRAINED_ROLES, FormatTemplate, system_text
from unift.errors import UniftError
from unift.models import load_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "Remember the number 47."},
    {"role": "assistant", "content": "Noted: 47."},
    {"role": "user", "content": "Add 5 to it."},
    {"role": "assistant", "content": "47 + 5 = 52.\nAnswer: 52"},
]
NO_SYSTEM = MULTI_TURN[1:]
TOOLS = json.dumps([{"name": "add", "parameters": {"a": "int", "b": "int"}}])
TOOL_TURNS = [
    {"role": "system", "content": "", "tools": TOOLS},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "function_call", "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
    {"role": "observation", "content": '{"result": 5}'},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "Glad to help."},
]
CONVERSATIONS = {"multi_turn": MULTI_TURN, "no_system": NO_SYSTEM, "tools": TOOL_TURNS}


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return load_tokenizer(str(embedded_dir))


def expected_answer(template, message, tokenizer) -> str:
    """The text of a trained turn as the template's own definition spells it (for `auto`: SmolLM2's
    ChatML chat template)."""
    if not isinstance(template, FormatTemplate):
        return message["content"] + "<|im_end|>\n"
    fmt = template.function_call if message["role"] == "function_call" and template.function_call else template.assistant
    return fmt.format(content=message["content"], eos=tokenizer.eos_token, bos=tokenizer.bos_token)


def trained_runs(labels: list[int]) -> list[tuple[int, list[int]]]:
    """(start, tokens) of each maximal run of trained labels."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, labels[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_are_exactly_the_assistant_turns(tokenizer, name, conversation):
    template = get_template(name)
    messages = CONVERSATIONS[conversation]
    enc = encode_conversation(messages, template, tokenizer, cutoff_len=4096)
    answers = [m for m in messages if m["role"] in TRAINED_ROLES]
    runs = trained_runs(enc.labels)
    # One run of trained tokens per assistant turn, each exactly that turn's tokens (with its end marker) ...
    assert [tokens for _, tokens in runs] == [
        tokenizer(expected_answer(template, m, tokenizer), add_special_tokens=False)["input_ids"] for m in answers
    ]
    # ... every other token masked, and the whole sequence is the template's rendering of the conversation.
    for (start, tokens) in runs:
        assert enc.input_ids[start:start + len(tokens)] == tokens
    assert sum(len(t) for _, t in runs) == sum(label != IGNORE_INDEX for label in enc.labels)
    assert tokenizer.decode(enc.input_ids) == template.render(messages, False, tokenizer)
    # Inference feeds the model exactly the training prefix before each answer.
    trained_at = [i for i, m in enumerate(messages) if m["role"] in TRAINED_ROLES]
    for (start, _), index in zip(runs, trained_at):
        assert encode_prompt(messages[:index], template, tokenizer) == enc.input_ids[:start]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_side_text_is_all_masked(tokenizer, name):
    template = get_template(name)
    enc = encode_conversation(TOOL_TURNS, template, tokenizer, cutoff_len=4096)
    masked = tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    for message in TOOL_TURNS:
        if message["role"] in ("user", "observation"):
            assert message["content"] in masked
    assert TOOLS in masked  # the tool descriptions reach the model, as prompt


def test_end_of_turn_is_trained_so_the_model_learns_to_stop(tokenizer):
    for name in ("alpaca", "vicuna", "llama2", "bloom"):
        enc = encode_conversation(NO_SYSTEM, get_template(name), tokenizer, cutoff_len=4096)
        for _, tokens in trained_runs(enc.labels):
            assert tokenizer.eos_token_id in tokens, name


def test_train_on_prompt_trains_every_token(tokenizer):
    enc = encode_conversation(MULTI_TURN, get_template("alpaca"), tokenizer, 4096, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_plain_text_is_trained_whole_with_eos(tokenizer):
    enc = encode_conversation([{"role": "text", "content": "Just some text."}], get_template("llama3"), tokenizer, 64)
    assert enc.labels == enc.input_ids
    assert enc.input_ids == tokenizer("Just some text.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_llama2_puts_the_system_prompt_inside_the_first_instruction(tokenizer):
    text = get_template("llama2").render(MULTI_TURN, False, tokenizer)
    bos = tokenizer.bos_token
    assert text.startswith(f"{bos}[INST] <<SYS>>\nYou are a careful calculator.\n<</SYS>>\n\nRemember the number 47. [/INST]")
    assert text.count("<<SYS>>") == 1 and text.count("[INST]") == 2


def test_aliases_and_defaults():
    assert get_template("glm") is get_template("chatglm")
    assert "Below is an instruction" in get_template("alpaca").render(NO_SYSTEM[:2], False)
    assert "USER: Remember" in get_template("vicuna").render(NO_SYSTEM[:2], False)
    assert system_text("S", TOOLS).startswith("S\n\nYou can call the following tools.")
    with pytest.raises(UniftError, match="unknown --template 'nope'; known: alpaca, auto"):
        get_template("nope")


@pytest.fixture
def chat_template(tokenizer):
    """Temporarily replace the tokenizer's chat template."""
    original = tokenizer.chat_template

    def use(text: str):
        tokenizer.chat_template = text
        return tokenizer

    yield use
    tokenizer.chat_template = original


def test_auto_reports_a_chat_template_that_drops_tool_results(chat_template):
    tok = chat_template("{% for m in messages %}{% if m.role in ['user', 'assistant'] %}<{{ m.role }}>{{ m.content }}"
                        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(UniftError, match="drops tool results"):
        encode_conversation(TOOL_TURNS[1:], get_template("auto"), tok, 512)


def test_auto_reports_a_chat_template_that_rejects_tool_roles(chat_template):
    tok = chat_template("{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}"
                        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                        "{{ m.content }}{% endfor %}")
    with pytest.raises(UniftError, match="chat template failed: Conversation roles must alternate.*'tool' role"):
        encode_conversation(TOOL_TURNS[1:], get_template("auto"), tok, 512)


def test_auto_refuses_a_chat_template_that_rewrites_history(chat_template):
    # Like templates that strip earlier answers' reasoning: the answer tokens cannot be located exactly.
    tok = chat_template("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<old>"
                        "{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(UniftError, match="renderings are not prefixes of each other"):
        encode_conversation(NO_SYSTEM, get_template("auto"), tok, 512)
