"""Chatting in the terminal: streaming answers, multi-turn history, /reset /exit /help.
One implementation serves `unift chat` (server.py) and `unift generate` without --prompt."""

from __future__ import annotations

import sys
from typing import TextIO

from unift.data import Message
from unift.inference import Engine, GenerationSettings

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this"


def answer_once(engine: Engine, prompt: str, settings: GenerationSettings, system: str | None = None,
                out: TextIO = sys.stdout) -> str:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    pieces = []
    for piece in engine.stream(messages, settings):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces).strip()


def chat_loop(engine: Engine, settings: GenerationSettings, system: str | None = None,
              stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    if not stdin.isatty():
        # Piped input: the whole of stdin is one prompt, answered once.
        prompt = stdin.read().strip()
        if prompt:
            answer_once(engine, prompt, settings, system, out)
        return
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    out.write(f"Chatting with {engine.name}. {HELP}\n")
    while True:
        try:
            line = input("\nYou> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("Bot> ")
        out.flush()
        pieces = []
        try:
            for piece in engine.stream(history, settings):
                out.write(piece)
                out.flush()
                pieces.append(piece)
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
