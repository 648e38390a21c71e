"""`unift generate` (generate.py): answer one --prompt, or chat in the terminal without one."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, FindRunOptions, load_engine
from unift.options import opt


@dataclass
class GenerateOptions(DecodingOptions, DtypeOptions, ConfigOptions, FindRunOptions):
    prompt: str | None = opt(None, "answer this once and exit (without it: an interactive chat)")
    system: str | None = opt(None, "system prompt")


OPTIONS = GenerateOptions


def run(options: GenerateOptions) -> None:
    from unift.engine.chat import answer_once, chat_loop

    engine = load_engine(options)
    if options.prompt is not None:
        answer_once(engine, options.prompt, options.decoding(), options.system)
    else:
        chat_loop(engine, options.decoding(), options.system)
