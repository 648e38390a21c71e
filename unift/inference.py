"""The inference engine shared by generate, chat, eval, predict and serve: a base model plus (optionally)
an adapter from a run folder, the run's template, and batched or streaming generation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from unift.data import Message, encode_prompt, get_template, resolve_template
from unift.errors import UniftError
from unift.models import get_model_spec, load_model, load_tokenizer
from unift.models.loading import resolve_model_path
from unift.runcard import RunCard


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


PRESETS: dict[str, GenerationSettings] = {
    # Reproducible answers: what eval and predict use, and the best choice for short factual answers.
    "greedy": GenerationSettings(),
    # Friendly chatting with a small model: light sampling and a mild repetition penalty.
    "chat": GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1),
    # The original toolkit's generate.py settings, kept for comparison (num_beams 1 so streaming works).
    "original": GenerationSettings(do_sample=True, temperature=1.0, top_p=0.9, top_k=40,
                                   no_repeat_ngram_size=6, repetition_penalty=1.8, max_new_tokens=512),
}


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine:
    def __init__(self, model, tokenizer, template, card: RunCard | None = None, name: str = "model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.card = card
        self.name = name
        self.lock = threading.Lock()  # one generation at a time per model
        self.eos_ids = self._eos_ids()

    @classmethod
    def load(
        cls,
        adapter_dir: str | None = None,
        *,
        base_model: str | None = None,
        model_type: str | None = None,
        template: str | None = None,
        trust_remote_code: bool | None = None,
    ) -> Engine:
        """A run folder (adapter + card), a merged or base model folder, or the embedded model."""
        card = RunCard.load(adapter_dir) if adapter_dir else None
        if card:
            base_model = base_model or card.base_model
            model_type = model_type or card.model_type
            template = template or card.template
            trust = card.trust_remote_code if trust_remote_code is None else trust_remote_code
        else:
            trust = bool(trust_remote_code)
        spec = get_model_spec(model_type or "llama")
        path = resolve_model_path(base_model)
        tokenizer = load_tokenizer(adapter_dir or path, trust_remote_code=trust, padding_side="left")
        chosen = resolve_template(template, spec.template, tokenizer)
        bits = card.quantization_bit if card else None
        model = load_model(path, spec, quantization_bit=bits, compute_dtype=torch.float32,
                           trust_remote_code=trust)
        if card:
            from peft import PeftModel

            import unift.peft  # noqa: F401  (registers unift's own PEFT methods)

            model = PeftModel.from_pretrained(model, adapter_dir)
        name = Path(adapter_dir).name if adapter_dir else Path(path).name
        return cls(model, tokenizer, chosen, card, name=name)

    def _eos_ids(self) -> list[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        return sorted(ids)

    def stops(self, settings: GenerationSettings) -> tuple[str, ...]:
        return tuple(settings.stop)

    @property
    def has_adapter(self) -> bool:
        return self.card is not None

    @contextlib.contextmanager
    def base_only(self):
        """Generate with the adapter switched off: the base model, without loading it twice."""
        if not self.has_adapter:
            yield
            return
        with self.model.disable_adapter():
            yield

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        if not messages or messages[-1]["role"] != "user":
            raise UniftError("a prompt must end with a user message")
        return encode_prompt(messages, self.template, self.tokenizer)

    @torch.inference_mode()
    def generate(
        self, conversations: list[list[Message]], settings: GenerationSettings = PRESETS["greedy"],
        batch_size: int = 8,
    ) -> list[Completion]:
        """Answers for many conversations, batched with left padding."""
        results: list[Completion] = []
        for start in range(0, len(conversations), batch_size):
            results += self._generate_batch(conversations[start:start + batch_size], settings)
        return results

    def _generate_batch(self, batch: list[list[Message]], settings: GenerationSettings) -> list[Completion]:
        encoded = [self.prompt_ids(m) for m in batch]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        device = self.model.device
        with self.lock:
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                eos_token_id=self.eos_ids, **settings.generate_kwargs(),
            )
        completions = []
        for i, row in enumerate(encoded):
            new = out[i, width:].tolist()
            ended = any(t in self.eos_ids for t in new)
            if ended:
                new = new[: min(new.index(t) for t in self.eos_ids if t in new)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, self.stops(settings))
            completions.append(Completion(
                text=text.strip(), prompt_tokens=len(row), completion_tokens=len(new),
                finish_reason="stop" if (ended or stopped) else "length",
            ))
        return completions

    def stream(self, messages: list[Message], settings: GenerationSettings = PRESETS["chat"]) -> Iterator[str]:
        """Text pieces as they are generated (for the terminal chat and server-sent events)."""
        from transformers import TextIteratorStreamer

        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = {**settings.generate_kwargs(), "num_beams": 1}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self.lock:
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
                                        **kwargs)
            except BaseException as err:  # surfaced to the reader below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = self.stops(settings)
        text = ""
        emitted = 0
        hold = max((len(s) for s in stops), default=0)  # hold back text that may be the start of a stop
        for piece in streamer:
            text += piece
            cut, stopped = truncate_at_stop(text, stops)
            if stopped:
                if len(cut) > emitted:
                    yield cut[emitted:]
                break
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        else:
            if len(text) > emitted:
                yield text[emitted:]
        thread.join()
        if errors:
            raise errors[0]


def settings_from(preset: str, **overrides) -> GenerationSettings:
    if preset not in PRESETS:
        raise UniftError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return replace(PRESETS[preset], **given)


__all__ = ["PRESETS", "Completion", "Engine", "GenerationSettings", "get_template", "settings_from"]
