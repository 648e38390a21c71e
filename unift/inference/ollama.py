"""An Ollama Modelfile beside a GGUF export: `ollama create NAME -f Modelfile` in that folder.

FROM the model's GGUF file (and ADAPTER the LoRA file for `--export gguf-lora`), TEMPLATE the run's prompt
template written as Ollama's Go template over .Messages, SYSTEM the template's default system prompt, and a
stop PARAMETER for the end-of-turn marker and the EOS token. A run prompted with the tokenizer's own
(Jinja) chat template gets the unift template that renders the same on a few conversations; where none does,
no TEMPLATE is written and Ollama falls back to what it derives from the file's chat template metadata.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any

from unift.errors import UniftError

log = logging.getLogger(__name__)

MODELFILE = "Modelfile"
# Conversations a template found for a Jinja chat template must render exactly as that chat template does.
PROBES = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: as it is, unless it holds what Go or the Modelfile would parse."""
    if not text:
        return ""
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ print " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def _go_format(fmt: str, content: str, eos: str, bos: str) -> str:
    """A FormatTemplate format string as Go template text, `{content}` becoming the action `content`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        parts.append(_go_literal(literal))
        if name == "content":
            parts.append(content)
        elif name in ("eos", "bos"):
            parts.append(_go_literal(eos if name == "eos" else bos))
        elif name is not None:
            raise UniftError(f"template field {{{name}}} has no Ollama equivalent")
    return "".join(parts)


def go_template(template: Any, eos: str, bos: str = "") -> str:
    """Ollama's TEMPLATE for a FormatTemplate, over .Messages (Ollama puts SYSTEM there as the first message).
    One line with no trim markers, so every literal of the template, newlines included, is kept as it is."""
    def fmt(text: str, content: str) -> str:
        return _go_format(text, content, eos, bos)

    in_user = bool(getattr(template, "system_in_user", False))
    user_content = "{{ $pending }}{{ .Content }}" if in_user else "{{ .Content }}"
    if in_user:  # Llama 2: the system block opens the first user turn
        literal, _, rest = template.system.partition("{content}")
        system = "{{ $pending = print " + ", ".join(
            [json.dumps(literal.format(eos=eos, bos=bos), ensure_ascii=False), ".Content",
             json.dumps(rest.format(eos=eos, bos=bos), ensure_ascii=False)]) + " }}"
    else:
        system = fmt(template.system, "{{ .Content }}")
    observation = getattr(template, "observation", None) or template.user
    return "".join([
        fmt(template.prefix, ""), '{{ $pending := "" }}', "{{ range .Messages }}",
        '{{ if eq .Role "system" }}', system,
        '{{ else if eq .Role "user" }}', fmt(template.user, user_content),
        '{{ $pending = "" }}' if in_user else "",
        '{{ else if eq .Role "assistant" }}', fmt(template.assistant, "{{ .Content }}"),
        '{{ else if eq .Role "tool" }}', fmt(observation, "{{ .Content }}"),
        "{{ end }}{{ end }}",
    ])


def format_template_for(template: Any, tokenizer: Any) -> Any | None:
    """The FormatTemplate that renders as `template`: itself, or for a Jinja chat template the first unift
    template that renders every probe conversation exactly as it does; None when there is none."""
    from unift.data.templates import TEMPLATES, FormatTemplate

    if isinstance(template, FormatTemplate):
        return template
    for candidate in TEMPLATES.values():
        if not isinstance(candidate, FormatTemplate):
            continue
        try:
            candidate = _with_default_system(candidate, template, tokenizer)
            if all(candidate.render(p, True, tokenizer) == template.render(p, True, tokenizer) for p in PROBES):
                return candidate
        except Exception:  # noqa: BLE001 (a template that cannot render a probe is simply not this one)
            continue
    return None


def _with_default_system(candidate: Any, template: Any, tokenizer: Any) -> Any:
    """`candidate` with the system prompt `template` puts in when a conversation has none (SmolLM2's chat
    template names the assistant), read from where the candidate would render a system prompt."""
    from dataclasses import replace

    marker = "\x00system\x00"
    plain = [{"role": "user", "content": "Hi"}]
    with_marker = candidate.render([{"role": "system", "content": marker}, *plain], True, tokenizer)
    before, _, after = with_marker.partition(marker)
    rendered = template.render(plain, True, tokenizer)
    if candidate.default_system or not rendered.startswith(before) or not rendered.endswith(after):
        return candidate
    found = rendered[len(before):len(rendered) - len(after)]
    return replace(candidate, default_system=found) if found else candidate


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UniftError('the template holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(template: Any, tokenizer: Any, model_file: str, adapter_file: str | None = None) -> str:
    """The Modelfile for a GGUF file (and a LoRA adapter file) in the same folder."""
    from unift.data.templates import end_of_turn

    lines = ["# Ollama: ollama create NAME -f Modelfile (in this folder)", f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    found = format_template_for(template, tokenizer)
    if found is not None:
        lines.append(f"TEMPLATE {_quoted(go_template(found, eos, bos))}")
        if found.default_system:
            lines.append(f"SYSTEM {_quoted(found.default_system)}")
    else:
        log.warning("no unift template renders like the chat template %s; the Modelfile has no TEMPLATE (Ollama "
                    "derives one from the GGUF file's chat template)", getattr(template, "name", "?"))
        lines.append("# no TEMPLATE: Ollama derives it from the GGUF file's chat template metadata")
    stops = []
    for stop in (end_of_turn(template, tokenizer), eos):
        if stop and stop not in stops:
            stops.append(stop)
            lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, template: Any, tokenizer: Any, *, model_file: str,
                    adapter_file: str | None = None) -> Path:
    """Write folder/Modelfile; return its path."""
    path = folder / MODELFILE
    path.write_text(modelfile_text(template, tokenizer, model_file, adapter_file), encoding="utf-8")
    return path
