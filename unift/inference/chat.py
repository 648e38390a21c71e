"""Chatting in the terminal: streaming answers, multi-turn history, /reset /exit /help (and /base /tuned).
One implementation serves `unift chat` (server.py) and `unift generate` without --prompt."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from unift.data import Message
from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings

HELP = ("commands: /reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this; "
        "Ctrl-C stops an answer")
ADAPTER_HELP = "; /base and /tuned switch between the base model and the fine-tuned one"


def answer_once(generator: Generator, prompt: str, settings: GenerationSettings, system: str | None = None,
                out: TextIO | None = None) -> str:
    out = out or sys.stdout  # looked up per call: callers (and tests) may have replaced it since import
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return _stream_answer(generator, messages, settings, out, adapter=None)


def _stream_answer(generator: Generator, messages: list[Message], settings: GenerationSettings, out: TextIO,
                   adapter: bool | None) -> str:
    """Print the answer as it comes; Ctrl-C stops it (and the model) and keeps what was said so far."""
    pieces: list[str] = []
    stream = generator.open_stream(messages, settings, adapter=adapter)
    try:
        for piece in stream:
            if not pieces:
                piece = piece.lstrip()  # the first token often carries the space after the header
            out.write(piece)
            out.flush()
            pieces.append(piece)
    except KeyboardInterrupt:
        out.write(" [stopped]")
    finally:
        stream.close()  # stops the generation thread at its next token when we leave early
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """Make Ctrl-C raise KeyboardInterrupt for the duration of a terminal chat.

    A process started with SIGINT ignored (a background job of a non-interactive shell, nohup, some CI
    runners and test launchers) inherits SIG_IGN, and Python then never installs its own handler: the
    terminal echoes ^C but nothing stops the answer. A person at the terminal means it, so take it back."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def chat_loop(generator: Generator, settings: GenerationSettings, system: str | None = None,
              stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if not stdin.isatty():
        # Piped input: the whole of stdin is one prompt, answered once.
        prompt = stdin.read().strip()
        if prompt:
            answer_once(generator, prompt, settings, system, out)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    with ctrl_c_interrupts():
        _interactive(generator, settings, system, out)


def _interactive(generator: Generator, settings: GenerationSettings, system: str | None, out: TextIO) -> None:
    help_text = HELP + (ADAPTER_HELP if generator.has_adapter else "")
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    use_adapter = True
    out.write(f"Chatting with {generator.name}. {help_text}\n")
    out.flush()
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
            out.write(help_text + "\n")
            continue
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if text in ("/base", "/tuned"):
            if getattr(generator, "holds_model", False):  # duck-typed generators (tests) may lack it
                out.write("(this run folder holds the whole fine-tuned model: there is no adapter to switch off)\n")
                continue
            if not generator.has_adapter:
                out.write("(no adapter loaded: this is the base model)\n")
                continue
            use_adapter = text == "/tuned"
            out.write(f"(now answering with the {'fine-tuned' if use_adapter else 'base'} model)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {help_text}\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("Bot> ")
        out.flush()
        answer = _stream_answer(generator, history, settings, out, adapter=use_adapter)
        history.append({"role": "assistant", "content": answer})
