"""What a command writes on stderr: unift's own lines as `[unift] ...`, and everything else held back
until the command is under way.

A command that fails on bad input must print exactly one line (`unift: error: ...`) whatever the machine:
importing bitsandbytes, kernels, deepspeed or the hub client logs lines of their own on some CPUs and
images (a kernel that cannot be fetched, an accelerator probed), and those would come first. So while a
command runs, sys.stderr is a HeldStderr: what other libraries write there (log handlers, Python warnings,
prints) is kept in memory until unift writes its first line or the command succeeds, then written in
order. A command that ends in a UniftError drops it; one that crashes writes it before its traceback (it
may explain the crash). Writes to file descriptor 2 from C code are not Python's to hold.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

# libraries that attach a stderr handler of their own when imported; their records go to the root logger
# (and so through sys.stderr) instead, formatted as `name: message`
OWN_HANDLERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "DeepSpeed", "kernels")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (callers and tests swap it after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class HeldStderr(io.TextIOBase):
    """A stand-in for sys.stderr that keeps what is written until release()."""

    def __init__(self, target) -> None:
        super().__init__()
        self.target = target
        self.held: list[str] = []
        self.released = False

    def write(self, text: str) -> int:
        if self.released:
            return self.target.write(text)
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        if self.released:
            self.target.flush()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.target.write("".join(self.held))
            self.held.clear()
            self.target.flush()

    def drop(self) -> None:
        self.held.clear()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self):  # as the stream it stands in for
        return getattr(self.target, "encoding", "utf-8")


def release() -> None:
    """The command is under way: what was held goes out now, and later writes pass straight through."""
    if isinstance(sys.stderr, HeldStderr):
        sys.stderr.release()


def drop_held() -> None:
    """The command failed on bad input: what other libraries said until now is not worth a line."""
    if isinstance(sys.stderr, HeldStderr):
        sys.stderr.drop()


@contextlib.contextmanager
def held_stderr() -> Iterator[HeldStderr]:
    """sys.stderr held for the duration; the real stream is back afterwards (released or dropped by the
    caller before the context ends; anything still held is written)."""
    original = sys.stderr
    held = HeldStderr(original)
    sys.stderr = held
    try:
        yield held
    finally:
        sys.stderr = original
        if not held.released and held.held:
            original.write("".join(held.held))


class _OursHandler(_StderrHandler):
    """unift's own lines: the first one releases what was held before it."""

    def emit(self, record: logging.LogRecord) -> None:
        release()
        super().emit(record)


def _route_library_handlers() -> None:
    """A library imported before set-up (by a caller of main(), or a test) holds a handler bound to the
    stderr of that time, which would bypass the hold: its records go to the root logger instead. One
    imported later binds its handler to the held stream, which needs nothing here."""
    for name in OWN_HANDLERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler:
                library.removeHandler(handler)
        library.propagate = True


def setup_logging() -> None:
    """unift's messages as `[unift] ...` (rank 0 only); other libraries' WARNING and above as
    `name: message`, through sys.stderr (so held while a command holds it). Idempotent."""
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    if not any(type(h) is _StderrHandler for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    _route_library_handlers()
    ours = logging.getLogger("unift")
    if not any(isinstance(h, _OursHandler) for h in ours.handlers):
        handler = _OursHandler()
        handler.setFormatter(logging.Formatter("[unift] %(message)s"))
        ours.addHandler(handler)
    ours.propagate = False
    ours.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    from unift.compat import quiet

    quiet.apply()  # other libraries' warnings that are not the user's to act on
