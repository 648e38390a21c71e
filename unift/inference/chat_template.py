"""The chat template written with a merged model: transformers' `apply_chat_template` on the merged
folder renders exactly the run's prompt template, and generation stops where the template ends a turn."""

from __future__ import annotations

import json
import logging
import string
from typing import Any

from unift.errors import UniftError

log = logging.getLogger(__name__)

# The prompts a translated template is checked on before it is written.
SAMPLES = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def _jinja_expr(fmt: str, content: str, eos: str, bos: str) -> str:
    """A FormatTemplate format string as one Jinja expression: literals quoted (so the trim_blocks and
    lstrip_blocks settings transformers compiles with cannot eat any whitespace), joined with `~`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal))
        if name == "content":
            parts.append(content)
        elif name in ("eos", "bos"):
            parts.append(json.dumps(eos if name == "eos" else bos))
        elif name is not None:
            raise UniftError(f"template field {{{name}}} has no chat-template equivalent")
    return "(" + (" ~ ".join(parts) or '""') + ")"


def format_template_jinja(template: Any, eos: str, bos: str = "") -> str:
    """Jinja for transformers' apply_chat_template that renders like `template.render`.

    Checked against `render` by install_chat_template before it is used, so a template feature this
    translation misses is caught, never silently written."""
    def expr(fmt: str, content: str) -> str:
        return _jinja_expr(fmt, content, eos, bos)

    user, assistant = template.user, template.assistant
    observation = getattr(template, "observation", None) or user
    function_call = getattr(template, "function_call", None) or assistant
    system_block = expr(template.system, "system_text")
    in_user = bool(getattr(template, "system_in_user", False))
    return "".join([
        "{{ " + expr(template.prefix, '""') + " }}",
        "{% if messages and messages[0]['role'] == 'system' %}",
        "{% set system_text = messages[0]['content'] %}{% set turns = messages[1:] %}",
        "{% else %}{% set system_text = " + json.dumps(template.default_system) + " %}",
        "{% set turns = messages %}{% endif %}",
        # Llama 2 puts the system block inside the first user turn; the others put it first.
        "{% set ns = namespace(pending='') %}",
        ("{% if system_text %}{% set ns.pending = " + system_block + " %}{% endif %}") if in_user else
        ("{% if system_text %}{{ " + system_block + " }}{% endif %}"),
        "{% for message in turns %}",
        "{% if message['role'] == 'user' %}",
        "{% set text = ns.pending ~ message['content'] %}{% set ns.pending = '' %}",
        "{{ " + expr(user, "text") + " }}",
        "{% elif message['role'] == 'assistant' %}{{ " + expr(assistant, "message['content']") + " }}",
        "{% elif message['role'] in ['observation', 'tool'] %}{{ " + expr(observation, "message['content']") + " }}",
        "{% elif message['role'] == 'function_call' %}{{ " + expr(function_call, "message['content']") + " }}",
        "{% else %}{{ raise_exception('this template cannot render the role ' + message['role']) }}{% endif %}",
        "{% endfor %}",
    ])


def install_chat_template(tokenizer, template) -> bool:
    """Make the tokenizer's chat template render the run's template; True when it now does."""
    if getattr(template, "source", ""):  # a --template FILE.jinja: the merged tokenizer carries it as it is
        tokenizer.chat_template = template.source
        return True
    if getattr(template, "name", "auto") == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    jinja = format_template_jinja(template, tokenizer.eos_token or "", tokenizer.bos_token or "")
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = jinja
    for messages in SAMPLES:
        want = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if got != want:
            tokenizer.chat_template = previous
            log.warning("could not express template %s as a chat template; the merged folder keeps the "
                        "tokenizer's own (unift still prompts it right through unift_merged.json)", template.name)
            return False
    return True




def stop_on_end_of_turn(model, tokenizer, template) -> None:
    """Tools that read only the merged folder (transformers, vLLM) stop where the template ends a turn."""
    from unift.data.templates import end_of_turn

    marker = end_of_turn(template, tokenizer)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(ids) != 1 or model.generation_config is None:
        return
    current = model.generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    if ids[0] not in current:
        model.generation_config.eos_token_id = [*current, ids[0]] if current else ids[0]

