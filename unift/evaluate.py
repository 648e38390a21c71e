"""Exact-match evaluation on a held-out split: the tuned model, and optionally the base beside it."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from unift.data import Message, load_conversations
from unift.inference import PRESETS, Engine, GenerationSettings

# The bundled sets end with an answer line: "Answer: 42" (English) or "答案：42" / "答案：四十七" (Chinese).
ANSWER = re.compile(r"(?:Answer:|答案[:：])\s*([^\s。.,，]+(?:[.,]\d+)*)")


def final_answer(text: str) -> str:
    """The value after the last answer marker when there is one, else the whole text, normalised."""
    found = ANSWER.findall(text)
    if found:
        return found[-1].replace(",", "")
    return " ".join(text.split()).lower()


@dataclass
class EvalResult:
    label: str
    correct: int
    total: int
    seconds: float
    predictions: list[str]

    @property
    def exact_match(self) -> float:
        return self.correct / self.total if self.total else 0.0


def split_prompts(conversations: list[list[Message]]) -> tuple[list[list[Message]], list[str]]:
    prompts = [c[:-1] for c in conversations]
    references = [c[-1]["content"] for c in conversations]
    return prompts, references


def exact_match(
    engine: Engine, conversations: list[list[Message]], label: str, settings: GenerationSettings,
    batch_size: int,
) -> EvalResult:
    prompts, references = split_prompts(conversations)
    started = time.perf_counter()
    outputs = [c.text for c in engine.generate(prompts, settings, batch_size=batch_size)]
    correct = sum(final_answer(o) == final_answer(r) for o, r in zip(outputs, references))
    return EvalResult(label, correct, len(prompts), time.perf_counter() - started, outputs)


def evaluate(
    adapter_dir: str | None, data: list[str], *, compare_base: bool = False, max_samples: int | None = None,
    max_new_tokens: int = 32, batch_size: int = 16, show: int = 3, base_model: str | None = None,
    model_type: str | None = None, dataset_dir: str | None = None, device: str | None = None,
) -> list[EvalResult]:
    engine = Engine.load(adapter_dir, base_model=base_model, model_type=model_type, device=device)
    conversations = load_conversations(data, Path(dataset_dir) if dataset_dir else None)[:max_samples]
    settings = replace(PRESETS["greedy"], max_new_tokens=max_new_tokens)
    results = []
    if compare_base and engine.has_adapter:
        with engine.base_only():
            results.append(exact_match(engine, conversations, "base", settings, batch_size))
    results.append(exact_match(engine, conversations, "tuned" if engine.has_adapter else "base", settings,
                               batch_size))
    print_report(results, conversations, show)
    return results


def print_report(results: list[EvalResult], conversations: list[list[Message]], show: int) -> None:
    prompts, references = split_prompts(conversations)
    for i in range(min(show, len(prompts))):
        print(f"\nQ: {prompts[i][-1]['content']}")
        print(f"   reference: {references[i]!r}")
        for r in results:
            mark = "ok " if final_answer(r.predictions[i]) == final_answer(references[i]) else "bad"
            print(f"   {r.label:>9} [{mark}]: {r.predictions[i]!r}")
    print(f"\n{'model':<10} {'exact match':>12} {'correct':>10} {'seconds':>8}")
    for r in results:
        print(f"{r.label:<10} {100 * r.exact_match:>11.1f}% {r.correct:>5}/{r.total:<4} {r.seconds:>8.1f}")
