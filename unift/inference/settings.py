"""What a generation is asked for and what it answers, shared by the Generator and its batching Scheduler
(which must not import each other): decoding settings and presets, a finished answer, stop strings and
the bounded queue's refusal."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from unift.errors import UniftError


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
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            # Neutralise sampling defaults a checkpoint's generation_config may carry (they only warn).
            kwargs.update(temperature=None, top_p=None, top_k=None)
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


def settings_from(preset: str, **overrides) -> GenerationSettings:
    if preset not in PRESETS:
        raise UniftError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return replace(PRESETS[preset], **given)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class QueueFull(UniftError):
    """More requests are waiting for the model than the generator admits."""


def truncate_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
