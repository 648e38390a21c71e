"""`unift chat` (server.py): chat in the terminal with streaming answers."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import (
    PRESET_NAMES,
    ConfigOptions,
    DecodingOptions,
    DtypeOptions,
    FindRunOptions,
    load_engine,
)
from unift.options import opt


@dataclass
class ChatOptions(DecodingOptions, DtypeOptions, ConfigOptions, FindRunOptions):
    preset: str = opt("chat", "named decoding settings; 'original' = the original toolkit's", group="decoding",
                      choices=PRESET_NAMES)
    system: str | None = opt(None, "system prompt")


OPTIONS = ChatOptions


def run(options: ChatOptions) -> None:
    from unift.engine.chat import chat_loop

    chat_loop(load_engine(options), options.decoding(), options.system)
