"""Streaming generation for many clients at once: concurrent requests are decoded together.

Every streamed answer (web service, browser UI, terminal chat) goes through one Scheduler per Generator. A
worker thread takes the oldest waiting request and every other waiting request that decodes the same way
(`_Request.key()`: adapter on/off and sampling settings), up to `max_batch`, and decodes them together;
on a CPU, decoding 16 answers at once costs little more than decoding one (the weights are read once per
step for the whole batch). Two paths:

- Continuous batching (unift.inference.decode), the common case: unift's own decode loop over the KV cache.
  Between two decode steps, waiting requests with the running batch's key join it (prefilled, then merged
  into its cache), and rows that are done or whose reader left are dropped, so a request that arrives
  mid-answer waits one step rather than for the whole batch, and a short answer does not hold a row.
  Greedy decoding and sampling with temperature / top_p / top_k / repetition_penalty /
  no_repeat_ngram_size, with transformers' logits processors.
- Static batching (`model.generate` over one left-padded batch, which then runs until its longest row
  ends), wherever the loop cannot be trusted to decode as `generate` does: a request with a seed (it runs
  alone, so its answer is reproducible), prompt-learning adapters (prompt/p-tuning need equal lengths,
  see Generator.equal_lengths; prefix tuning puts its keys in the cache), beam search, a checkpoint whose
  generation_config asks for a logits processor the loop does not implement, and a model whose forward
  takes no transformers `cache` or does not hand back a plain DynamicCache (remote-code ChatGLM/MOSS
  style models; found at the first prefill, then remembered). `decode.static_reason` has the list.

A running batch holds `Generator.lock` (and the adapter state) until its last row ends; a waiting request
that cannot join it (another key) stops further joins, so it is served when the batch drains instead of
being overtaken for ever.

Each answer streams on its own (unift.inference.streams): its tokens are decoded as they come, stop strings
and the row's own max_tokens end it early while the others go on, and a reader who goes away (client
disconnect, Ctrl-C, the UI's Stop) ends only its own row. `stats` (shown by the service's /health):
batches started, requests served, the largest number of rows decoded at once, requests that joined a
running batch, and batches that took the static path.
"""

from __future__ import annotations

import collections
import logging
import threading
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

import torch

from unift.inference.decode import NotContinuous, RunningBatch, Sampler, static_reason
from unift.inference.settings import GenerationSettings
from unift.inference.streams import TextStream, _Request

log = logging.getLogger(__name__)

__all__ = ["BatchingGenerator", "Scheduler", "TextStream"]


class BatchingGenerator(Protocol):
    """What the Scheduler uses of its Generator (unift.inference.generator), named here so that the
    generator imports the scheduler and not the other way round."""

    model: Any
    tokenizer: Any
    lock: threading.Lock
    eos_ids: list[int]

    def equal_lengths(self, adapter: bool | None) -> bool: ...

    def _adapter_state(self, enabled: bool | None) -> AbstractContextManager[None]: ...


class _BatchStreamer:
    """generate()'s streamer on the static path: each step's new token for every row, turned into that
    row's text pieces."""

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
            request.accept(token, self.eos, self.tokenizer)
            if request.done and any(not r.done for r in self.requests):
                request.end()
            # else: the last answer of the batch ends once the model is free again (Scheduler._loop)

    def end(self) -> None:
        """generate() calls this while it still holds the model: the last answers end after it."""

    def settle(self) -> None:
        """After generate(): every answer is done (what is left of its text handed over); the scheduler
        ends the still-open ones once the model is free."""
        for request in self.requests:
            if not request.done:
                request.finish("stop" if request.cancel.is_set() else "length")


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
    """Owns the generation thread of one Generator: `submit` queues a request and returns its stream."""

    def __init__(self, generator: BatchingGenerator, max_batch: int = 32) -> None:
        self.generator = generator
        self.max_batch = max(1, max_batch)  # most rows decoded at once
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._no_cache: dict[bool, str] = {}  # adapter on/off -> why its forward cannot use the decode loop
        # shown by the service's /health; "static": batches decoded by generate() (see the module docstring)
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "joined": 0, "static": 0}

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
                self._never_ran(request)

    @staticmethod
    def _never_ran(request: _Request) -> None:
        request.done = True
        request.finish_reason = "stop"
        request.end()

    def _drop_cancelled(self) -> None:
        """Readers who left while waiting need no generation at all (called with self._wake held)."""
        for request in [r for r in self._waiting if r.cancel.is_set()]:
            self._waiting.remove(request)
            self._never_ran(request)

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting request and those that can join it (called once the model is free, so
        everything that arrived meanwhile is considered)."""
        with self._wake:
            self._drop_cancelled()
            if not self._waiting:
                return []
            first = self._waiting.popleft()
            batch = [first]
            same_length = self.generator.equal_lengths(first.adapter)  # see Generator.equal_lengths
            for request in list(self._waiting):
                if len(batch) >= self.max_batch:
                    break
                if request.key() == first.key() and (not same_length or len(request.ids) == len(first.ids)):
                    self._waiting.remove(request)
                    batch.append(request)
            self._count(batch, joined=False, rows=len(batch))
            return batch

    def _take_joiners(self, key: tuple, room: int) -> list[_Request]:
        """Waiting requests that can join the running batch, oldest first; none past an older request that
        cannot (it gets the model once the running batch drains)."""
        with self._wake:
            self._drop_cancelled()
            joiners: list[_Request] = []
            for request in list(self._waiting):
                if len(joiners) >= room or request.key() != key:
                    break
                self._waiting.remove(request)
                joiners.append(request)
            return joiners

    def _count(self, requests: list[_Request], joined: bool, rows: int) -> None:
        self.stats["batches"] += 0 if joined else 1
        self.stats["requests"] += len(requests)
        self.stats["joined"] += len(requests) if joined else 0
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
            batch: list[_Request] = []  # every request this turn serves (the continuous path adds joiners)
            try:
                with self.generator.lock:  # the batch is formed once the model is free
                    batch = self._take_batch()
                    if batch:
                        self._serve(batch)
            except BaseException as err:  # every reader of this batch still waiting hears about it
                log.debug("batched generation failed", exc_info=True)
                for request in batch:
                    request.fail(err)
                continue
            for request in batch:  # the model is free again: answers still open end now
                if not request.done:
                    request.finish("stop" if request.cancel.is_set() else "length")
                request.end()

    def _static_reason(self, first: _Request) -> str | None:
        if self.generator.equal_lengths(first.adapter):
            return "prompt or p-tuning adapter (rows must share a length)"
        return self._no_cache.get(first.adapter) or static_reason(self.generator.model, first.settings)

    def _serve(self, batch: list[_Request]) -> None:
        """Decode `batch` (generator.lock is held) by the continuous loop where it can, else by generate()."""
        reason = self._static_reason(batch[0])
        if reason is None:
            first = list(batch)
            try:
                self._continuous(batch)
                return
            except NotContinuous as why:
                if batch != first or any(r.tokens or r.done for r in batch):
                    raise RuntimeError(f"the decode loop broke off: {why}") from why  # not at the first prefill
                self._no_cache[batch[0].adapter] = reason = str(why)  # nothing taken yet: generate() instead
        log.debug("static batch of %d: %s", len(batch), reason)
        self.stats["static"] += 1
        self._generate(batch)

    def _continuous(self, batch: list[_Request]) -> None:
        generator = self.generator
        key = batch[0].key()
        with torch.inference_mode(), generator._adapter_state(batch[0].adapter):
            running = RunningBatch(generator.model, Sampler(batch[0].settings), generator.tokenizer.pad_token_id,
                                   set(generator.eos_ids), generator.tokenizer)
            running.admit(batch)
            while True:
                gone = running.drop_done()
                joiners = self._take_joiners(key, self.max_batch - len(running.rows))
                if not running.rows and not joiners:
                    return  # the last answers end once the model is free (_loop)
                for request in gone:  # the model goes on: these answers end now
                    request.end()
                if joiners:
                    fresh = not running.rows  # the batch had drained: this starts a new one
                    batch.extend(joiners)
                    running.admit(joiners)
                    self._count(joiners, joined=not fresh, rows=len(running.rows))
                    continue  # drop those done at their first token, admit more while there is room
                running.step()

    def _generate(self, batch: list[_Request]) -> None:
        generator = self.generator
        width = max(len(r.ids) for r in batch)
        pad = generator.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):
            ids[i, width - len(request.ids):] = torch.tensor(request.ids)
            mask[i, width - len(request.ids):] = 1
        settings = replace(batch[0].settings, max_new_tokens=max(r.settings.max_new_tokens for r in batch))
        streamer = _BatchStreamer(batch, generator.tokenizer, set(generator.eos_ids))
        device = generator.model.device
        with torch.inference_mode(), generator._adapter_state(batch[0].adapter):  # generator.lock is held
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            generator.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer,
                pad_token_id=pad, eos_token_id=generator.eos_ids,
                stopping_criteria=[_row_stops(batch, width)], **settings.generate_kwargs())
        streamer.settle()
