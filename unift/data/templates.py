"""Prompt templates. One object renders a conversation for training, loss masking and inference alike,
so the three can never drift apart (the template name is recorded in the run card).

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str} messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from unift.errors import UniftError

Message = dict[str, str]


@dataclass(frozen=True)
class FormatTemplate:
    """A template written as per-role format strings. `{content}` is the message text, `{eos}` the
    tokenizer's end-of-sequence token. `user` ends with the assistant header, so the generation prompt
    is the rendering of the conversation up to the last user turn."""

    name: str
    user: str
    assistant: str
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""  # text before everything (e.g. a BOS string)
    description: str = ""

    def render(self, messages: list[Message], add_generation_prompt: bool, tokenizer=None) -> str:
        eos = (tokenizer.eos_token if tokenizer is not None else None) or ""
        parts = [self.prefix]
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if system:
            parts.append(self.system.format(content=system))
        for message in messages:
            fmt = {"user": self.user, "assistant": self.assistant}.get(message["role"])
            if fmt is None:
                raise UniftError(f"template {self.name}: cannot render role {message['role']!r}")
            parts.append(fmt.format(content=message["content"], eos=eos))
        # The generation prompt is already inside `user`; add_generation_prompt needs nothing more.
        return "".join(parts)


@dataclass(frozen=True)
class TokenizerTemplate:
    """`auto`: the tokenizer's own chat template (Jinja), as the model's authors trained it."""

    name: str = "auto"
    description: str = "the tokenizer's own chat template"

    def render(self, messages: list[Message], add_generation_prompt: bool, tokenizer=None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UniftError("template 'auto' needs a tokenizer with a chat template; pass --template alpaca")
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

TEMPLATES: dict[str, FormatTemplate | TokenizerTemplate] = {}


def register_template(template: FormatTemplate | TokenizerTemplate) -> None:
    TEMPLATES[template.name] = template


register_template(TokenizerTemplate())
register_template(FormatTemplate(
    name="alpaca", system="{content}\n\n", default_system=ALPACA_SYSTEM,
    user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
    description="Stanford Alpaca (the original toolkit's prompt)",
))
register_template(FormatTemplate(
    name="vicuna", system="{content} ",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    user="USER: {content} ASSISTANT:", assistant="{content}{eos}", description="Vicuna v1.1",
))
register_template(FormatTemplate(
    name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", assistant="{content}<|im_end|>\n",
    description="ChatML",
))
register_template(FormatTemplate(
    name="qwen", system="<|im_start|>system\n{content}<|im_end|>\n", default_system="You are a helpful assistant.",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", assistant="{content}<|im_end|>\n",
    description="Qwen (ChatML with a default system prompt)",
))
register_template(FormatTemplate(
    name="llama2", prefix="", system="[INST] <<SYS>>\n{content}\n<</SYS>>\n\n",
    user="[INST] {content} [/INST]", assistant=" {content} {eos}", description="Llama 2 chat",
))
register_template(FormatTemplate(
    name="llama3", prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>", description="Llama 3 instruct",
))
register_template(FormatTemplate(
    name="chatglm", prefix="[gMASK]<sop>", system="<|system|>\n{content}",
    user="<|user|>\n{content}<|assistant|>\n", assistant="{content}", description="GLM-4 / ChatGLM",
))
register_template(FormatTemplate(
    name="internlm", system="<|System|>:{content}\n",
    user="<|User|>:{content}<eoh>\n<|Bot|>:", assistant="{content}<eoa>\n", description="InternLM (1)",
))
register_template(FormatTemplate(
    name="moss", system="{content}\n",
    default_system="You are an AI assistant whose name is MOSS.",
    user="<|Human|>: {content}<eoh>\n<|MOSS|>:", assistant=" {content}<eom>\n", description="MOSS",
))
register_template(FormatTemplate(
    name="bloom", user="Human: {content}\n\nAssistant: ", assistant="{content}{eos}\n\n",
    description="BELLE-style Human/Assistant for BLOOM",
))


def get_template(name: str):
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UniftError(f"unknown --template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def resolve_template(name: str | None, family_default: str, tokenizer) -> FormatTemplate | TokenizerTemplate:
    """--template if given, else the family's default; `auto` falls back to alpaca without a chat template."""
    chosen = name or family_default
    if chosen == "auto" and not getattr(tokenizer, "chat_template", None):
        if name == "auto":
            raise UniftError("--template auto: this tokenizer has no chat template; choose another --template")
        chosen = "alpaca"
    return get_template(chosen)
