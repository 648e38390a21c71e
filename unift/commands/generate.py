"""`unift generate` (generate.py): answer one --prompt, or chat in the terminal without one."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, FindRunOptions, load_generator
from unift.models.flags import ChatFlags
from unift.options import opt


@dataclass
class GenerateOptions(ChatFlags, DecodingOptions, DtypeOptions, ConfigOptions, FindRunOptions):
    prompt: str | None = opt(None, "answer this once and exit (without it: an interactive chat)")


OPTIONS = GenerateOptions


def run(options: GenerateOptions) -> None:
    from unift.inference.chat import answer_once, chat_loop

    generator = load_generator(options)
    if options.prompt is not None:
        answer_once(generator, options.prompt, options.decoding(), options.system)
    else:
        chat_loop(generator, options.decoding(), options.system)
