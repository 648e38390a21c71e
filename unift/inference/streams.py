"""One streamed answer, as both decoding paths of the Scheduler (unift.inference.batching) see it: the request
with its settings and the tokens generated so far, the bookkeeping that turns each new token into text
pieces (stop strings, max_new_tokens, EOS, half multi-byte characters held back), and the reader's end,
`TextStream`."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from unift.inference.settings import GenerationSettings, truncate_at_stop

_END = object()


class Withdrawing(Protocol):
    def withdraw(self, request: _Request) -> None: ...


@dataclass(eq=False)
class _Request:
    ids: list[int]
    settings: GenerationSettings
    adapter: bool
    pieces: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (up to a stop string)
    emitted: int = 0  # characters of `text` handed to the reader
    done: bool = False  # no more tokens wanted
    ended: bool = False  # the reader has been told
    finish_reason: str | None = None

    def key(self) -> tuple:
        """Requests with equal keys can share a batch (they decode the same way)."""
        s = self.settings
        if s.seed is not None:
            return ("alone", id(self))
        sampling = (s.temperature, s.top_p, s.top_k) if s.do_sample else ()
        return (self.adapter, s.do_sample, sampling, s.repetition_penalty, s.no_repeat_ngram_size)

    def accept(self, token: int, eos: set[int], tokenizer) -> None:
        """One new token for this answer: EOS ends it, else it is decoded and handed over."""
        if self.done:
            return
        if token in eos:
            self.finish("stop")
            return
        self.tokens.append(token)
        self._emit(tokenizer)
        if not self.done and len(self.tokens) >= self.settings.max_new_tokens:
            self.finish("length")

    def _emit(self, tokenizer) -> None:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        stops = self.settings.stop
        text, stopped = truncate_at_stop(text, stops)
        self.text = text
        hold = 0 if stopped else max((len(s) for s in stops), default=0)  # may be the start of a stop
        safe = len(text) - hold
        if safe > self.emitted:
            self.pieces.put(text[self.emitted:safe])
            self.emitted = safe
        if stopped:
            self.finish("stop")

    def finish(self, reason: str) -> None:
        """No more tokens: what is left of the text goes to the reader (who is told the end separately)."""
        self.flush()
        self.done = True
        self.finish_reason = reason

    def flush(self) -> None:
        if len(self.text) > self.emitted and not self.ended:
            self.pieces.put(self.text[self.emitted:])
            self.emitted = len(self.text)

    def end(self) -> None:
        """Tell the reader the answer is complete (once)."""
        if not self.ended:
            self.ended = True
            self.pieces.put(_END)

    def fail(self, err: BaseException) -> None:
        if not self.ended:
            self.done = self.ended = True
            self.finish_reason = "error"
            self.pieces.put(err)


class TextStream:
    """One answer as text pieces, while the scheduler generates it (possibly beside others). Reports token
    counts and the finish reason; closing it early stops this answer at the next token."""

    def __init__(self, request: _Request, scheduler: Withdrawing) -> None:
        self._request = request
        self._scheduler = scheduler
        self.prompt_tokens = len(request.ids)
        self.cancel = request.cancel

    @property
    def completion_tokens(self) -> int:
        return len(self._request.tokens)

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self._request.pieces.get()
        if item is _END:
            self._request.pieces.put(_END)  # later calls keep ending
            raise StopIteration
        if isinstance(item, BaseException):
            self._request.pieces.put(_END)
            raise item
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stop this answer and wait until it has ended (the model is then free unless it is still busy
        with other requests' answers)."""
        self.cancel.set()
        self._scheduler.withdraw(self._request)
        request, deadline = self._request, time.monotonic() + timeout
        while True:
            try:
                item = request.pieces.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if item is _END:
                request.pieces.put(_END)
                return
