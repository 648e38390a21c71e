"""Template parity: does unift's --template render conversations as the checkpoint's own chat template does?

A model trained with one template and served with another (vLLM, llama.cpp, transformers' pipelines all
read `tokenizer.chat_template`) answers worse than it tested. `unift train` (one line at start) and
`unift data check` (every probe) render a few probe conversations both ways and report the first token
where they part, with both renderings around it. unift's side is tokenized exactly as training tokenizes
(unift.data.tokenize); the checkpoint's side as serving stacks do: the chat template's text, tokenized
without added special tokens. A probe with a tool call is added where the chat template renders tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from unift.data.native_chat import renders_tools
from unift.data.templates import Message, TokenizerTemplate, model_chat_template
from unift.data.tokenize import encode_conversation, encode_prompt
from unift.errors import UniftError

_TOOLS = json.dumps([{"name": "add", "description": "add two integers",
                      "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                      "b": {"type": "integer"}}}}])
_TURNS: list[Message] = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Which of the two is larger?"},
    {"role": "assistant", "content": "Paris has more people."},
]
# (name, conversation, whether the generation prompt is compared rather than the trained conversation)
PROBES: list[tuple[str, list[Message], bool]] = [
    ("system prompt and three turns", _TURNS, False),
    ("no system prompt", [{"role": "user", "content": "Name a colour of the sea."},
                          {"role": "assistant", "content": "Blue."}], False),
    ("generation prompt after two turns", _TURNS[:-1], True),
]
TOOL_PROBE: tuple[str, list[Message], bool] = ("tool call", [
    {"role": "system", "content": "You are a calculator.", "tools": _TOOLS},
    {"role": "user", "content": "What is 17 plus 25?"},
    {"role": "function_call", "content": json.dumps({"name": "add", "arguments": {"a": 17, "b": 25}})},
    {"role": "observation", "content": json.dumps({"result": 42})},
    {"role": "assistant", "content": "17 plus 25 is 42."},
], False)
BEFORE, AFTER = 6, 8  # tokens shown around the first difference


@dataclass
class ProbeResult:
    name: str
    first_difference: int | None = None  # token index where the renderings part; None: identical
    unift: str = ""  # unift's rendering around it (the difference starts after ⟪)
    model: str = ""  # the checkpoint's
    lengths: tuple[int, int] = (0, 0)  # tokens: unift's, the checkpoint's
    error: str = ""  # a side that could not render the probe

    @property
    def identical(self) -> bool:
        return self.first_difference is None and not self.error


@dataclass
class ParityReport:
    template: str  # unift's template's name
    results: list[ProbeResult] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(r.identical for r in self.results)

    def summary(self) -> str:
        """One line: what `unift train` logs at start."""
        n = len(self.results)
        if self.identical:
            return (f"template parity: --template {self.template} renders the {n} probe conversations token for "
                    "token as the checkpoint's chat template")
        differ = [r for r in self.results if not r.identical]
        first = differ[0]
        where = (f"'{first.name}': {first.error}" if first.error else
                 f"'{first.name}' at token {first.first_difference}: unift {first.unift} | checkpoint {first.model}")
        return (f"template parity: --template {self.template} differs from the checkpoint's chat template in "
                f"{len(differ)} of {n} probe conversations; first {where} (`unift data check` shows each; "
                "--template model trains with the checkpoint's own)")

    def lines(self) -> list[str]:
        """Every probe: what `unift data check` prints."""
        out = []
        for r in self.results:
            if r.error:
                out.append(f"  {r.name}: {r.error}")
            elif r.first_difference is None:
                out.append(f"  {r.name}: identical ({r.lengths[0]} tokens)")
            else:
                out.append(f"  {r.name}: differs at token {r.first_difference} (unift {r.lengths[0]} tokens, "
                           f"checkpoint {r.lengths[1]})")
                out.append(f"    unift:      {r.unift}")
                out.append(f"    checkpoint: {r.model}")
        return out


def _show(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]  # one line: newlines as \n, tabs as \t


def _window(tokenizer: Any, ids: list[int], at: int) -> str:
    start = max(0, at - BEFORE)
    head, tail = tokenizer.decode(ids[start:at]), tokenizer.decode(ids[at:at + AFTER])
    return (("…" if start else "") + _show(head) + "⟪" + (_show(tail) if at < len(ids) else "(end)")
            + ("…" if at + AFTER < len(ids) else ""))


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _error(side: str, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{side} cannot render it ({first})"


def compare_probe(name: str, messages: list[Message], prompt: bool, template: Any, model: TokenizerTemplate,
                  tokenizer: Any) -> ProbeResult:
    """unift's tokens for the probe (as training or serving encodes it) against the checkpoint's."""
    result = ProbeResult(name)
    try:
        ours = encode_prompt(messages, template, tokenizer) if prompt else \
            encode_conversation(messages, template, tokenizer, cutoff_len=10**9).input_ids
    except UniftError as err:
        result.error = _error("unift's template", err)
        return result
    try:
        text = model.render(messages, add_generation_prompt=prompt, tokenizer=tokenizer)
    except UniftError as err:
        result.error = _error("the checkpoint's chat template", err)
        return result
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    result.lengths = (len(ours), len(theirs))
    result.first_difference = at = _first_difference(ours, theirs)
    if at is not None:
        result.unift, result.model = _window(tokenizer, ours, at), _window(tokenizer, theirs, at)
    return result


def check_parity(template: Any, tokenizer: Any) -> ParityReport | None:
    """The probes rendered by `template` and by the tokenizer's chat template; None when it has none."""
    source = model_chat_template(tokenizer)
    if not source:
        return None
    model = TokenizerTemplate(name="model", native=True, source=source)
    probes = [*PROBES, TOOL_PROBE] if renders_tools(tokenizer, source) else PROBES
    return ParityReport(template.name, [compare_probe(*probe, template, model, tokenizer) for probe in probes])


def parity_at_start(template: Any, tokenizer: Any, mode: str) -> str | None:
    """`unift train`'s line (None: nothing to compare, or --template_check off). Never fatal, except that
    --template_check strict refuses a template that differs."""
    if mode == "off":
        return None
    try:
        report = check_parity(template, tokenizer)
    except Exception as err:  # noqa: BLE001 (a report must not stop a run; strict mode says it could not check)
        if mode == "strict":
            raise UniftError(f"--template_check strict: the parity check failed: {err}") from None
        return f"template parity: not checked ({type(err).__name__}: {err})"
    if report is None:
        return None
    if mode == "strict" and not report.identical:
        raise UniftError(f"--template_check strict: {report.summary()}")
    return report.summary()
