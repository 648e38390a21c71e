"""`unift chat` (server.py): chat in the terminal with streaming answers."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, FindRunOptions, load_generator
from unift.models.flags import ChatFlags, DecodingFlags
from unift.options import like


@dataclass
class ChatOptions(ChatFlags, DecodingOptions, DtypeOptions, ConfigOptions, FindRunOptions):
    preset: str = like(DecodingFlags, "preset", "chat")  # a conversation: sampled answers


OPTIONS = ChatOptions


def run(options: ChatOptions) -> None:
    from unift.inference.chat import chat_loop

    chat_loop(load_generator(options), options.decoding(), options.system)
