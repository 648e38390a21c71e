"""The generator shared by generate, chat, eval, predict and serve: a base model plus (optionally) an
adapter from a run folder, the run's template, and batched or streaming generation.

Thread safety: one generation at a time per model (`Generator.lock`); the adapter is switched on or off
inside that lock, so concurrent "base" and "tuned" requests never see each other's state. Streamed
answers of concurrent callers are batched by the generator's Scheduler (unift.inference.batching).
`admit()` bounds how many requests may wait for the model at once (the web service answers 429 beyond
it). Settings, presets and Completion live in unift.inference.settings, which the scheduler shares
without importing this.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from unift import compat, loader
from unift.data import Message, encode_prompt
from unift.data.templates import end_of_turn
from unift.data.tokenize import bos_to_add
from unift.errors import UniftError
from unift.inference.batching import Scheduler, TextStream
from unift.inference.settings import PRESETS, Completion, GenerationSettings, QueueFull, truncate_at_stop
from unift.models.runcard import MERGED_CARD, RunCard, read_merged_card  # noqa: F401 (both were defined here)

# A prompt is a conversation ending with a user turn (rendered with the template), or raw text
# (tokenized as is: the OpenAI /v1/completions API).
Prompt = list[Message] | str


class Generator:
    def __init__(self, model, tokenizer, template, card: RunCard | None = None, name: str = "model",
                 max_queue: int = 256, max_batch: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.card = card
        self.name = name
        self.lock = threading.Lock()  # one generation at a time per model
        self.end_of_turn = end_of_turn(template, tokenizer)
        self.eos_ids = self._eos_ids()
        self.max_queue = max_queue  # requests admitted at once (running + waiting)
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._adapter_default = True  # flipped by base_only()
        self.scheduler = Scheduler(self, max_batch)  # streamed answers, batched across concurrent requests
        self.merged = False  # the adapter folded into the weights in memory (see merge_in_memory)
        config = getattr(model, "peft_config", {}).get("default")
        self._virtual_tokens_first = str(getattr(config, "peft_type", "")).endswith(("PROMPT_TUNING", "P_TUNING"))

    @classmethod
    def load(
        cls,
        adapter_dir: str | None = None,
        *,
        base_model: str | None = None,
        model_type: str | None = None,
        template: str | None = None,
        trust_remote_code: bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        allow_reward: bool = False,
        rope_scaling: str | None = None,
        attn_implementation: str | None = None,
    ) -> Generator:
        """A run folder (adapter + card) or any PEFT adapter folder, a merged or base model folder, or the
        embedded model, placed on --device (default: the first GPU, else the CPU) in that device's dtype
        unless `dtype` is given (unift.loader, unift.models.dtypes); --rope_scaling and --attn_implementation
        default to the run card's."""
        compat.apply()
        loaded = loader.load(adapter_dir, base_model=base_model, model_type=model_type, template=template,
                             trust_remote_code=trust_remote_code, dtype=dtype, device=device,
                             allow_reward=allow_reward, rope_scaling=rope_scaling,
                             attn_implementation=attn_implementation)
        generator = cls(loaded.model, loaded.tokenizer, loaded.template, loaded.card, name=loaded.name)
        generator.merged = merge_in_memory(loaded.model, loaded.card)
        return generator

    def _eos_ids(self) -> list[int]:
        """The tokenizer's EOS, the generation config's, and the template's end-of-turn token: a base
        checkpoint tuned with ChatML ends answers with <|im_end|> while its EOS is <|endoftext|>."""
        ids = set()
        marker = self.end_of_turn
        marker_ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        generation = getattr(self.model, "generation_config", None)  # a reward model (--stage rm) has none
        for source in (self.tokenizer.eos_token_id, getattr(generation, "eos_token_id", None),
                       marker_ids if len(marker_ids) == 1 else None):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        return sorted(ids)

    def stops(self, settings: GenerationSettings) -> tuple[str, ...]:
        """The caller's stop strings, plus the template's end-of-turn text where it is not one token (a
        tokenizer that does not know <eoa> as a token still stops on the text)."""
        marker = self.end_of_turn
        if marker and len(self.tokenizer(marker, add_special_tokens=False)["input_ids"]) > 1:
            return tuple(dict.fromkeys([*settings.stop, marker]))
        return tuple(settings.stop)

    @property
    def has_adapter(self) -> bool:
        return self.card is not None and not self.card.holds_model

    @property
    def holds_model(self) -> bool:
        """The model is a run's whole trained model (--peft_type full, freeze): tuned, but no adapter to
        switch off, so there is no base model to compare with in memory."""
        return self.card is not None and self.card.holds_model

    # ---- adapter on/off ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def base_only(self):
        """Generate with the adapter switched off: the base model, without loading it twice.

        Changes the default of later calls in this context; concurrent callers (the web service)
        pass `adapter=False` per call instead."""
        previous = self._adapter_default
        self._adapter_default = False
        try:
            yield
        finally:
            self._adapter_default = previous

    @contextlib.contextmanager
    def _adapter_state(self, enabled: bool | None):
        """Only ever entered with `self.lock` held."""
        if enabled is None:
            enabled = self._adapter_default
        if enabled or not self.has_adapter:
            yield
            return
        if self.merged:
            self.model.unmerge_adapter()  # the base weights as they were, exactly (fp32)
        try:
            with self.model.disable_adapter():
                yield
        finally:
            if self.merged:
                self.model.merge_adapter()

    @contextlib.contextmanager
    def adapter_enabled(self, enabled: bool | None = None):
        """The model with the adapter on or off (None: the default), for forward passes of one's own
        (scoring), holding the lock like generation does."""
        with self.lock, self._adapter_state(enabled):
            yield self.model

    # ---- admission (a bounded queue in front of the lock) ------------------------------------------

    def acquire_slot(self) -> None:
        """Take a place in the bounded queue for one request; QueueFull when every place is taken."""
        with self._admit_lock:
            if self._admitted >= self.max_queue:
                raise QueueFull(f"the model is busy: {self._admitted} requests are queued; try again later")
            self._admitted += 1

    def release_slot(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    @contextlib.contextmanager
    def admit(self):
        """A place in the bounded queue for the duration of the block."""
        self.acquire_slot()
        try:
            yield
        finally:
            self.release_slot()

    @property
    def queued(self) -> int:
        return self._admitted

    # ---- prompts -------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt, max_prompt_tokens: int | None = None) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            if not prompt or prompt[-1]["role"] != "user":
                raise UniftError("a prompt must end with a user message")
            ids = encode_prompt(prompt, self.template, self.tokenizer)
        if not ids:
            raise UniftError("the prompt is empty")
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            # keep the end (the question and the assistant header), and BOS where the tokenizer adds it
            bos = bos_to_add(self.tokenizer) if ids[0] == self.tokenizer.bos_token_id else None
            keep_bos = bos is not None and max_prompt_tokens > 1
            ids = [bos, *ids[-(max_prompt_tokens - 1):]] if keep_bos else ids[-max_prompt_tokens:]
        return ids

    # ---- batched generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, conversations: Sequence[Prompt], settings: GenerationSettings = PRESETS["greedy"],
        batch_size: int = 8, *, adapter: bool | None = None, max_prompt_tokens: int | None = None,
    ) -> list[Completion]:
        """Answers for many prompts, batched with left padding, in the order given."""
        encoded = [self.prompt_ids(p, max_prompt_tokens) for p in conversations]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):  # one group, or one per prompt length (see equal_lengths)
            groups.setdefault(len(ids) if self.equal_lengths(adapter) else 0, []).append(i)
        results: list[Completion | None] = [None] * len(encoded)
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                for i, done in zip(chunk, self._generate_batch([encoded[i] for i in chunk], settings, adapter)):
                    results[i] = done
        return results  # type: ignore[return-value]

    def equal_lengths(self, adapter: bool | None) -> bool:
        """Whether rows must share a length to be batched: prompt and p-tuning put their virtual tokens in
        front of the left padding and peft drops position ids, so a padded row would see its prompt at
        shifted positions and answer differently than alone."""
        enabled = self._adapter_default if adapter is None else adapter
        return bool(enabled and self.has_adapter and self._virtual_tokens_first)

    def _generate_batch(self, encoded: list[list[int]], settings: GenerationSettings,
                        adapter: bool | None) -> list[Completion]:
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        device = self.model.device
        kwargs = settings.generate_kwargs()
        stops = self.stops(settings)
        if stops:
            # Lets each row finish at its stop string instead of running on to max_new_tokens.
            kwargs.update(stop_strings=list(stops), tokenizer=self.tokenizer)
        with self.lock, self._adapter_state(adapter):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                eos_token_id=self.eos_ids, **kwargs,
            )
        completions = []
        for i, row in enumerate(encoded):
            new = out[i, width:].tolist()
            ended = any(t in self.eos_ids for t in new)
            if ended:
                new = new[: min(new.index(t) for t in self.eos_ids if t in new)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, stops)
            completions.append(Completion(
                text=text.strip(), prompt_tokens=len(row), completion_tokens=len(new),
                finish_reason="stop" if (ended or stopped) else "length",
            ))
        return completions

    # ---- streaming -------------------------------------------------------------------------------------

    def stream(self, messages: Prompt, settings: GenerationSettings = PRESETS["chat"], *,
               adapter: bool | None = None) -> Iterator[str]:
        """Text pieces as they are generated (for the terminal chat and server-sent events)."""
        yield from self.open_stream(messages, settings, adapter=adapter)

    def open_stream(self, prompt: Prompt, settings: GenerationSettings = PRESETS["chat"], *,
                    adapter: bool | None = None, max_prompt_tokens: int | None = None) -> TextStream:
        """Like stream(), but the returned object also reports token counts and the finish reason. Streams
        of concurrent callers are generated together (unift.inference.batching)."""
        settings = replace(settings, stop=self.stops(settings))
        return self.scheduler.submit(self.prompt_ids(prompt, max_prompt_tokens), settings,
                                     self._adapter_default if adapter is None else adapter)


def merge_in_memory(model, card: RunCard | None) -> bool:
    """Fold an additive adapter into fp32 base weights in memory: generation then costs what the base
    model costs (no adapter matmuls per layer and token). Half-precision and quantized bases keep the
    adapter apart, as the sum would be rounded to the base's precision. Returns whether it merged."""
    if card is None or card.quantization_bit or getattr(model, "dtype", None) != torch.float32:
        return False
    from unift.peft import get_method, merge_refusal

    try:
        method = get_method(card.peft_type)
    except UniftError:
        return False
    # Only an additive merge (MethodSpec.additive_merge): base-only requests subtract it again exactly up to
    # fp32 rounding, where a multiplicative one would drift a little with every undo.
    if not method.additive_merge or merge_refusal(method, model.peft_config["default"]):
        return False
    model.merge_adapter()
    return True


__all__ = ["Generator", "Prompt"]
