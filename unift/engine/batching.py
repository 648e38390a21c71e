"""Streaming generation for many clients at once: requests that wait for the model are answered together.

Every streamed answer (web service, browser UI, terminal chat) goes through one Scheduler per Engine. A
worker thread takes the oldest waiting request and every other waiting request that decodes the same way
(adapter on/off and sampling settings; a request with its own seed runs alone, so its answer is
reproducible), up to `max_batch`, and generates them as one left-padded batch. Requests that arrive
while a batch runs wait for the next one, as llama.cpp's server slots and vLLM do between steps; on a
CPU, decoding 16 answers together costs little more than decoding one (the weights are read once per
step for the whole batch).

Each answer streams on its own: a per-row streamer decodes that row's tokens as they come, stop strings
and the row's own max_tokens end it early (the row stops at the next step while the others go on), and
a reader who goes away (client disconnect, Ctrl-C, the UI's Stop) ends only its own row.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from unift.engine.settings import GenerationSettings, truncate_at_stop

log = logging.getLogger(__name__)

_END = object()


class BatchingEngine(Protocol):
    """What the Scheduler uses of its Engine (unift.engine.engine), named here so that the engine imports
    the scheduler and not the other way round."""

    model: Any
    tokenizer: Any
    lock: threading.Lock
    eos_ids: list[int]

    def equal_lengths(self, adapter: bool | None) -> bool: ...

    def _adapter_state(self, enabled: bool | None) -> AbstractContextManager[None]: ...


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
        """Requests with equal keys can share a batch."""
        s = self.settings
        if s.seed is not None:
            return ("alone", id(self))
        sampling = (s.temperature, s.top_p, s.top_k) if s.do_sample else ()
        return (self.adapter, s.do_sample, sampling, s.repetition_penalty, s.no_repeat_ngram_size)


class TextStream:
    """One answer as text pieces, while the scheduler generates it (possibly beside others). Reports token
    counts and the finish reason; closing it early stops this answer at the next token."""

    def __init__(self, request: _Request, scheduler: Scheduler) -> None:
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


class _BatchStreamer:
    """Receives each step's new token for every row and turns it into that row's text pieces."""

    def __init__(self, requests: list[_Request], tokenizer, eos: set[int]) -> None:
        self.requests = requests
        self.tokenizer = tokenizer
        self.eos = eos
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        for request, token in zip(self.requests, value.reshape(-1).tolist()):
            if request.done:
                continue
            if token in self.eos:
                self._finish(request, "stop")
                continue
            request.tokens.append(token)
            self._emit(request)
            if not request.done and len(request.tokens) >= request.settings.max_new_tokens:
                self._finish(request, "length")

    def _emit(self, request: _Request) -> None:
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        stops = request.settings.stop
        text, stopped = truncate_at_stop(text, stops)
        request.text = text
        hold = 0 if stopped else max((len(s) for s in stops), default=0)  # may be the start of a stop
        safe = len(text) - hold
        if safe > request.emitted:
            request.pieces.put(text[request.emitted:safe])
            request.emitted = safe
        if stopped:
            self._finish(request, "stop")

    def _finish(self, request: _Request, reason: str) -> None:
        if len(request.text) > request.emitted:
            request.pieces.put(request.text[request.emitted:])
            request.emitted = len(request.text)
        request.done = True
        request.finish_reason = reason
        if any(not r.done for r in self.requests):
            request.ended = True
            request.pieces.put(_END)
        # else: the last answer of the batch ends once the model is free again (Scheduler._loop)

    def end(self) -> None:
        """generate() calls this while it still holds the model: the last answers end after it."""

    def settle(self) -> None:
        """After generate(): every answer is done (what is left of its text handed over); the scheduler
        ends the still-open ones once the model is free."""
        for request in self.requests:
            if not request.done:
                request.done = True
                request.finish_reason = "stop" if request.cancel.is_set() else "length"
            if len(request.text) > request.emitted and not request.ended:
                request.pieces.put(request.text[request.emitted:])
                request.emitted = len(request.text)


def _row_stops(requests: list[_Request], width: int):
    """Per-row stopping: a row ends when its reader left or it has what it asked for."""
    from transformers import StoppingCriteria

    class RowStops(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            generated = input_ids.shape[1] - width
            done = [r.done or r.cancel.is_set() or generated >= r.settings.max_new_tokens for r in requests]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return RowStops()


class Scheduler:
    """Owns the generation thread of one Engine: `submit` queues a request and returns its stream."""

    def __init__(self, engine: BatchingEngine, max_batch: int = 16) -> None:
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}  # shown by the service's /health

    def submit(self, ids: list[int], settings: GenerationSettings, adapter: bool) -> TextStream:
        request = _Request(ids, replace(settings, num_beams=1), adapter)
        with self._wake:
            self._waiting.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="unift-generate")
                self._thread.start()
            self._wake.notify()
        return TextStream(request, self)

    def withdraw(self, request: _Request) -> None:
        """A request nobody waits for any more: if it has not started, it never will."""
        with self._wake:
            if request in self._waiting:
                self._waiting.remove(request)
                request.done = request.ended = True
                request.finish_reason = "stop"
                request.pieces.put(_END)

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting request and those that can join it (called once the model is free, so
        everything that arrived meanwhile is considered)."""
        with self._wake:
            # readers who left while waiting need no generation at all
            for request in [r for r in self._waiting if r.cancel.is_set()]:
                self._waiting.remove(request)
                request.done = request.ended = True
                request.finish_reason = "stop"
                request.pieces.put(_END)
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            batch = [first]
            same_length = self.engine.equal_lengths(first.adapter)  # see Engine.equal_lengths
            for request in list(self._waiting):
                if len(batch) >= self.max_batch:
                    break
                if request.key() == first.key() and (not same_length or len(request.ids) == len(first.ids)):
                    self._waiting.remove(request)
                    batch.append(request)
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            return batch

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
            batch: list[_Request] = []
            try:
                with self.engine.lock:  # the batch is formed once the model is free
                    batch = self._take_batch()
                    if batch:
                        self._generate(batch)
            except BaseException as err:  # every reader of this batch still waiting hears about it
                log.debug("batched generation failed", exc_info=True)
                for request in batch:
                    if not request.ended:
                        request.done = request.ended = True
                        request.finish_reason = "error"
                        request.pieces.put(err)
                continue
            for request in batch:  # the model is free again: answers still open end now
                if not request.ended:
                    request.ended = True
                    request.pieces.put(_END)

    def _generate(self, batch: list[_Request]) -> None:
        engine = self.engine
        width = max(len(r.ids) for r in batch)
        pad = engine.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):
            ids[i, width - len(request.ids):] = torch.tensor(request.ids)
            mask[i, width - len(request.ids):] = 1
        settings = replace(batch[0].settings, max_new_tokens=max(r.settings.max_new_tokens for r in batch))
        streamer = _BatchStreamer(batch, engine.tokenizer, set(engine.eos_ids))
        device = engine.model.device
        with torch.inference_mode(), engine._adapter_state(batch[0].adapter):  # engine.lock is held
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            engine.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer,
                pad_token_id=pad, eos_token_id=engine.eos_ids,
                stopping_criteria=[_row_stops(batch, width)], **settings.generate_kwargs())
        streamer.settle()
