"""Prompt templates. One object renders a conversation for training, loss masking and inference alike,
so the three can never drift apart (the template name is recorded in the run card).

A conversation is a list of messages {"role": ..., "content": str}. Roles:
  system         first message only; may carry "tools" (a JSON text describing callable tools)
  user           a human turn (masked)
  assistant      an answer (trained)
  function_call  the assistant calling a tool, e.g. {"name": ..., "arguments": ...} (trained)
  observation    a tool's result handed back to the assistant (masked)
  text           plain text for continued pre-training: the only message of its conversation (all trained)
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from unift.errors import UniftError

Message = dict[str, str]

TRAINED_ROLES = ("assistant", "function_call")
PROMPT_ROLES = ("user", "observation")
ROLES = ("system", "user", "assistant", "function_call", "observation", "text")

TOOLS_PREAMBLE = (
    "You can call the following tools. To call one, reply with a JSON object "
    '{"name": <tool name>, "arguments": <arguments>}.\n'
)


def system_text(system: str, tools: str | None) -> str:
    """The system prompt with the tool descriptions appended: one rendering for every template."""
    if not tools:
        return system
    return (system + "\n\n" if system else "") + TOOLS_PREAMBLE + tools


def split_system(messages: list[Message]) -> tuple[str | None, str | None, list[Message]]:
    """(system content or None, tools or None, the other messages)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[0].get("tools") or None, messages[1:]
    return None, None, messages


@dataclass(frozen=True)
class FormatTemplate:
    """A template written as per-role format strings.

    Placeholders: `{content}` the message text, `{eos}`/`{bos}` the tokenizer's end/begin-of-sequence
    tokens. `user` and `observation` end with the assistant header, so the generation prompt is the
    rendering of the conversation up to the last user (or tool-result) turn.
    """

    name: str
    user: str
    assistant: str
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""  # text before everything (e.g. a BOS string)
    observation: str | None = None  # a tool result; default: rendered like a user turn
    function_call: str | None = None  # a tool call; default: rendered like an assistant turn
    system_in_user: bool = False  # Llama 2 puts the system block inside the first [INST]
    aliases: tuple[str, ...] = ()
    description: str = ""

    def render(self, messages: list[Message], add_generation_prompt: bool, tokenizer=None) -> str:
        eos = (getattr(tokenizer, "eos_token", None) if tokenizer is not None else None) or ""
        bos = (getattr(tokenizer, "bos_token", None) if tokenizer is not None else None) or ""
        system, tools, rest = split_system(messages)
        system = system_text(system or self.default_system, tools)
        parts = [self.prefix.format(bos=bos, eos=eos)]
        pending = ""
        if system:
            block = self.system.format(content=system, bos=bos, eos=eos)
            if self.system_in_user:
                pending = block
            else:
                parts.append(block)
        formats = {
            "user": self.user, "assistant": self.assistant,
            "observation": self.observation or self.user, "function_call": self.function_call or self.assistant,
        }
        for message in rest:
            fmt = formats.get(message["role"])
            if fmt is None:
                raise UniftError(f"template {self.name}: cannot render role {message['role']!r}")
            content = message["content"]
            if pending and message["role"] == "user":
                content, pending = pending + content, ""
            parts.append(fmt.format(content=content, eos=eos, bos=bos))
        # The generation prompt is already inside `user`/`observation`; add_generation_prompt needs nothing.
        return "".join(parts)


@dataclass(frozen=True)
class TokenizerTemplate:
    """`auto`: the tokenizer's own chat template (Jinja), as the model's authors trained it.

    Tool calls are given to it as assistant messages (their JSON as the text) and tool results as
    role "tool"; a chat template that rejects or silently drops "tool" messages is reported, not hidden.
    `native` (`model`): where the chat template renders tools, they go in its own form instead (the `tools`
    argument, `tool_calls`; unift.data.native_chat).
    """

    name: str = "auto"
    aliases: tuple[str, ...] = ()
    description: str = "the tokenizer's own chat template"
    source: str = ""  # a Jinja chat template of its own (--template FILE.jinja, `model`); "": the tokenizer's
    native: bool = False

    def render(self, messages: list[Message], add_generation_prompt: bool, tokenizer=None) -> str:
        if tokenizer is None or not (self.source or getattr(tokenizer, "chat_template", None)):
            raise UniftError(f"template {self.name!r} needs a tokenizer with a chat template; pass --template alpaca")
        system, tools, rest = split_system(messages)
        native = None
        if self.native and (tools or any(m["role"] == "function_call" for m in rest)):
            from unift.data.native_chat import native_conversation, renders_tools

            if renders_tools(tokenizer, self.source or model_chat_template(tokenizer) or ""):
                native = native_conversation(system, tools, rest)
        plain, schemas = native or ([], None)
        if native is None:
            if system is not None or tools:
                plain.append({"role": "system", "content": system_text(system or "", tools)})
            for message in rest:
                role = {"function_call": "assistant", "observation": "tool"}.get(message["role"], message["role"])
                plain.append({"role": role, "content": message["content"]})
        try:
            text = tokenizer.apply_chat_template(
                plain, tokenize=False, add_generation_prompt=add_generation_prompt,
                **({"chat_template": self.source} if self.source else {}), **({"tools": schemas} if schemas else {}),
            )
        except Exception as err:  # Jinja raises its own exception types, e.g. "roles must alternate"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = " (it may not know the 'tool' role: choose e.g. --template chatml)" if any(
                m["role"] == "tool" for m in plain) else ""
            raise UniftError(f"template {self.name}: the chat template failed: {first}{hint}") from None
        for message in plain:
            if message["role"] == "tool" and message["content"] not in text:
                raise UniftError(
                    f"template {self.name}: the chat template drops tool results (role 'tool'); "
                    "choose a template that renders them, e.g. --template chatml"
                )
        return text


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

TEMPLATES: dict[str, FormatTemplate | TokenizerTemplate] = {}
ALIASES: dict[str, str] = {}


def register_template(template: FormatTemplate | TokenizerTemplate) -> None:
    TEMPLATES[template.name] = template
    for alias in template.aliases:
        ALIASES[alias] = template.name


register_template(TokenizerTemplate())
# resolve_template fills in the checkpoint's chat template; the run card keeps its text (template_definition)
register_template(TokenizerTemplate(name="model", native=True, description="the checkpoint's own chat template"))
register_template(FormatTemplate(
    name="alpaca", system="{content}\n\n", default_system=ALPACA_SYSTEM,
    user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
    observation="### Observation:\n{content}\n\n### Response:\n",
    description="Stanford Alpaca (the original toolkit's prompt)",
))
register_template(FormatTemplate(
    name="vicuna", system="{content} ",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    user="USER: {content} ASSISTANT:", assistant=" {content}{eos}",
    observation="OBSERVATION: {content} ASSISTANT:", description="Vicuna v1.1",
))
register_template(FormatTemplate(
    name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", assistant="{content}<|im_end|>\n",
    observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    description="ChatML",
))
register_template(FormatTemplate(
    name="qwen", system="<|im_start|>system\n{content}<|im_end|>\n", default_system="You are a helpful assistant.",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", assistant="{content}<|im_end|>\n",
    observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    function_call="<tool_call>\n{content}\n</tool_call><|im_end|>\n",
    description="Qwen (ChatML with a default system prompt, Qwen2.5-style tool calls)",
))
register_template(FormatTemplate(
    name="llama2", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True,
    user="{bos}[INST] {content} [/INST]", assistant=" {content} {eos}", description="Llama 2 chat",
))
register_template(FormatTemplate(
    name="llama3", prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    description="Llama 3 instruct",
))
register_template(FormatTemplate(
    name="chatglm", prefix="[gMASK]<sop>", system="<|system|>\n{content}",
    # GLM's own format ends an answer with nothing (the next <|user|> ends it): teach EOS, which its
    # generation config stops on, or a tuned model never learns to stop.
    user="<|user|>\n{content}<|assistant|>\n", assistant="{content}{eos}",
    observation="<|observation|>\n{content}<|assistant|>\n", aliases=("glm",),
    description="GLM-4 / ChatGLM",
))
register_template(FormatTemplate(
    name="internlm", prefix="{bos}", system="<|System|>:{content}\n",
    user="<|User|>:{content}<eoh>\n<|Bot|>:", assistant="{content}<eoa>\n",
    observation="<|Environment|>:{content}<eoh>\n<|Bot|>:", description="InternLM (1)",
))
register_template(FormatTemplate(
    name="moss", system="{content}\n",
    default_system="You are an AI assistant whose name is MOSS.",
    user="<|Human|>: {content}<eoh>\n<|MOSS|>:", assistant=" {content}<eom>\n",
    observation="<|Results|>: {content}<eor>\n<|MOSS|>:", description="MOSS",
))
register_template(FormatTemplate(
    name="bloom", user="Human: {content}\n\nAssistant: ", assistant="{content}{eos}\n\n",
    observation="Observation: {content}\n\nAssistant: ", description="BELLE-style Human/Assistant for BLOOM",
))


_SENTINEL = "\u2063unift-answer\u2063"  # text no real answer contains
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn(template: FormatTemplate | TokenizerTemplate, tokenizer) -> str:
    """The marker that ends an answer in this template's rendering ("<|im_end|>", "<eoa>", the EOS token),
    or "" when the rendering ends an answer with nothing (GLM-4's own chat template): training then
    appends EOS to every answer, and generation stops on the marker in every command."""
    cache = _END_OF_TURN.setdefault(tokenizer, {}) if tokenizer is not None else {}
    # the template itself, not its name: two template files may share a name
    key = (template, getattr(tokenizer, "chat_template", None))
    if key not in cache:
        text = template.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}],
                               add_generation_prompt=False, tokenizer=tokenizer)
        after = text.split(_SENTINEL, 1)[1].strip() if _SENTINEL in text else ""
        known = [*(getattr(tokenizer, "all_special_tokens", None) or []),
                 *(tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {})]
        special = sorted({str(t) for t in known}, key=len, reverse=True)
        marker = next((t for t in special if t and after.startswith(t)), None)
        cache[key] = marker if marker is not None else (after.split()[0] if after else "")
    return cache[key]


def get_template(name: str) -> FormatTemplate | TokenizerTemplate:
    try:
        return TEMPLATES[ALIASES.get(name, name)]
    except KeyError:
        known = sorted([*TEMPLATES, *ALIASES])
        raise UniftError(f"unknown --template {name!r}; known: {', '.join(known)}") from None


def model_chat_template(tokenizer) -> str | None:
    """The checkpoint's own chat template text (the default one where a tokenizer carries several)."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default") or next(iter(source.values()), None)
    return source or None


def check_template(value: str | dict) -> str | dict:
    """--template when the flags are parsed: a known name or alias, or a template file that reads as one
    (a run card's definition, a mapping, passes as it is). One line before any model loads."""
    if isinstance(value, str):
        if is_template_file(value):
            load_template_file(value)
        else:
            get_template(value)
    return value


def resolve_template(name: str | dict | None, family_default: str, tokenizer) -> FormatTemplate | TokenizerTemplate:
    """--template if given (a name, a template file, or a run card's definition), else the family's default;
    `auto` falls back to alpaca without a chat template."""
    if isinstance(name, dict):
        return template_from_definition(name)
    if name and is_template_file(name):
        return load_template_file(name)
    chosen = name or family_default
    if chosen == "model":
        source = model_chat_template(tokenizer)
        if not source:
            raise UniftError("--template model: this checkpoint ships no chat template (tokenizer.chat_template); "
                             "choose another --template")
        return replace(TEMPLATES["model"], source=source)
    if chosen == "auto" and not getattr(tokenizer, "chat_template", None):
        if name == "auto":
            raise UniftError("--template auto: this tokenizer has no chat template; choose another --template")
        chosen = "alpaca"
    return get_template(chosen)


# ---- templates from a file (--template FILE) -----------------------------------------------------------

TEMPLATE_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jinja")
FILE_FIELDS = ("prefix", "system", "default_system", "user", "assistant", "observation", "function_call",
               "system_in_user")


def is_template_file(value: str) -> bool:
    """A --template value naming a file (by its suffix, so a missing file is reported, not taken as a name)."""
    return Path(value).suffix.lower() in TEMPLATE_FILE_SUFFIXES


def load_template_file(path: str | Path) -> FormatTemplate | TokenizerTemplate:
    """A YAML/JSON file with FormatTemplate's fields, or a Jinja chat template (.jinja)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UniftError(f"--template {path}: cannot read the template file ({err.strerror or err})") from None
    if path.suffix.lower() == ".jinja":
        if not text.strip():
            raise UniftError(f"--template {path}: the Jinja chat template is empty")
        return template_from_definition({"name": path.stem, "description": f"chat template from {path.name}",
                                         "jinja": text}, where=f"--template {path}")
    try:
        if path.suffix.lower() == ".json":
            import json

            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 (json and yaml raise their own types; one line either way)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UniftError(f"--template {path}: not valid {path.suffix[1:].upper()}: {first}") from None
    if not isinstance(values, dict):
        raise UniftError(f"--template {path}: expected a mapping of template fields ({', '.join(FILE_FIELDS)})")
    return template_from_definition({"name": path.stem, "description": f"from {path.name}", "format": values},
                                    where=f"--template {path}")


def template_from_definition(definition: dict, where: str = "the run card's template") -> \
        FormatTemplate | TokenizerTemplate:
    """A template from what template_definition wrote ({"name", "description", "format": fields} or
    {"name", "description", "jinja"})."""
    name = str(definition.get("name") or "custom")
    description = str(definition.get("description") or "")
    if "jinja" in definition:
        return TokenizerTemplate(name=name, description=description, source=definition["jinja"],
                                 native=bool(definition.get("native")))
    values = definition.get("format")
    if not isinstance(values, dict):
        raise UniftError(f"{where}: a template definition needs 'format' or 'jinja'")
    unknown = [k for k in values if k not in FILE_FIELDS]
    if unknown:
        raise UniftError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(FILE_FIELDS)}")
    for required in ("user", "assistant"):
        if not isinstance(values.get(required), str) or not values[required]:
            raise UniftError(f"{where}: field {required!r} is missing (a text with {{content}})")
    for key, value in values.items():
        if key == "system_in_user":
            if not isinstance(value, bool):
                raise UniftError(f"{where}: field 'system_in_user' must be true or false")
        elif value is not None and not isinstance(value, str):
            raise UniftError(f"{where}: field {key!r} must be a text")
    template = FormatTemplate(name=name, description=description, **values)
    try:  # a stray brace or an unknown placeholder fails here, naming the field, not mid-training
        for key in ("prefix", "system", "user", "assistant", "observation", "function_call"):
            text = getattr(template, key)
            if text is not None:
                text.format(content="", bos="", eos="")
    except (KeyError, IndexError, ValueError) as err:
        raise UniftError(f"{where}: field {key!r}: bad placeholder {err} (known: {{content}}, "
                         "{bos}, {eos}; write {{ and }} for braces)") from None
    return template


def template_definition(template: FormatTemplate | TokenizerTemplate) -> str | dict:
    """What the run card stores: a built-in template's name, else the template itself (so a run keeps
    prompting the same when the file it came from is gone)."""
    if TEMPLATES.get(template.name) == template:
        return template.name
    if isinstance(template, TokenizerTemplate):  # `model` too: its text, so the run never needs its base
        return {"name": template.name, "description": template.description, "jinja": template.source,
                **({"native": True} if template.native else {})}
    values = asdict(template)
    return {"name": template.name, "description": template.description, "format": {k: values[k] for k in FILE_FIELDS
                                              if values[k] != FormatTemplate.__dataclass_fields__[k].default}}
