"""`unift eval`: the figures the seed reports measure, for the base model, an adapter or a merged model.

Per held-out set of preference pairs (--pairs): preference accuracy (the chosen answer more likely than the
rejected one) and the mean log-likelihood margin between them (unift.evals.likelihood).
Per held-out set (--data): exact match with a chosen answer extractor, perplexity of the reference answers
(unift.evals.likelihood), BLEU and ROUGE-L; per exam (--exam): multiple-choice accuracy per subject and
overall (unift.evals.exams). Rows of the table are setups of the same model: the base zero-shot, the base
with --num_shots solved examples in context, and the tuned model (zero-shot), all on the same questions.
Every figure goes to eval_results.json beside the run; a Markdown table is printed; --plot draws PNGs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unift.data import IGNORE_INDEX, Message, encode_conversation, load_conversations
from unift.data.answers import answer_line, get_extractor
from unift.errors import UniftError
from unift.inference.generator import Generator
from unift.inference.settings import PRESETS
from unift.models.dtypes import dtype_name
from unift.models.flags import DataFlags, DecodingFlags
from unift.models.hub import is_hub_adapter
from unift.options import NON_NEGATIVE, Options, like, opt
from unift.runtime import write_json_atomic

if TYPE_CHECKING:
    import torch

METRICS = ("em", "ppl", "bleu", "rouge")
RESULTS = "eval_results.json"

final_answer = answer_line  # the default extractor, under its historical name


@dataclass(frozen=True)
class Setup:
    """One row of the table: the model with its adapter on or off, and k solved examples in context."""

    label: str
    adapter: bool
    shots: int = 0


@dataclass
class EvalOptions(Options):
    """What `unift eval` scores and how (its flags are generated from these fields)."""

    data: list[str] | None = like(DataFlags, "data")
    pairs: list[str] = opt([], "held-out preference pairs (chosen/rejected): preference accuracy (the chosen "
                           "answer more likely) and the mean log-likelihood margin, chosen minus rejected")
    exam: list[str] = opt([], "multiple-choice exam files or folders (MMCU JSON, C-Eval / CMMLU / MMLU CSV)")
    metrics: list[str] = opt(["em", "ppl"], "for --data: em ppl bleu rouge")
    extractor: str = opt("answer", "what exact match compares: answer (the Answer:/答案： line, default), "
                         "last_number, final_line, exact, or regex:PATTERN (its first group)")
    compare_base: bool = opt(False, "also score the base model (adapter off)")
    num_shots: int = opt(0, "also score the base model with this many solved examples in context",
                         range=NON_NEGATIVE)
    shots_from: list[str] | None = opt(None, "where the solved examples come from (default: the run's training "
                                       "data; for --exam: the other questions of the same subject)")
    choice: str = opt("letter", "exams: score the option letter (default) or the option text",
                      choices=("letter", "text"))
    max_samples: int | None = like(DataFlags, "max_samples")
    max_new_tokens: int | None = like(DecodingFlags, "max_new_tokens")
    batch_size: int = like(DataFlags, "batch_size")
    cutoff_len: int = like(DataFlags, "cutoff_len", 2048)  # scored sequences: prompt and answer together
    show: int = opt(3, "print this many questions with each answer", range=NON_NEGATIVE)
    dataset_dir: str | None = like(DataFlags, "dataset_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            self.data = [] if self.exam or self.pairs else ["arith_test"]
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UniftError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if self.num_shots < 0:
            raise UniftError(f"--num_shots must be 0 or more, not {self.num_shots}")
        if self.choice not in ("letter", "text"):
            raise UniftError(f"--choice must be letter or text, not {self.choice!r}")
        get_extractor(self.extractor)  # a bad name or regex fails before any model loads


def setups(has_adapter: bool, options: EvalOptions, holds_model: bool = False) -> list[Setup]:
    """`holds_model`: the model is a run's whole trained model (full, freeze): the tuned row only."""
    if holds_model:
        if options.compare_base or options.num_shots:
            raise UniftError("--compare_base and --num_shots score the base model, which a run folder of a "
                             "model trained whole (full, freeze) does not hold: evaluate the base on its own "
                             "(--model_name_or_path BASE)")
        return [Setup("tuned", True, 0)]
    rows = []
    if not has_adapter or options.compare_base:
        rows.append(Setup("base 0-shot", False, 0))
        if options.num_shots:
            rows.append(Setup(f"base {options.num_shots}-shot", False, options.num_shots))
    if has_adapter:
        rows.append(Setup("tuned", True, 0))
    return rows


def with_shots(conversation: list[Message], pool: list[list[Message]], k: int) -> list[Message]:
    """k solved examples from the pool as earlier turns of the conversation (never the question itself)."""
    shots = [c for c in pool if c != conversation][:k]
    return [m for c in shots for m in c] + conversation


def answer_budget(tokenizer, references: list[str]) -> int:
    """New tokens enough for the longest reference answer and a quarter more: a fixed default cut answers
    short whenever a dataset's working out is longer than it (and a cut answer has no final line to match)."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return longest + max(8, longest // 4)


def generation_task(generator: Generator, conversations: list[list[Message]], setup: Setup,
                    pool: list[list[Message]], options: EvalOptions) -> dict[str, Any]:
    """Exact match / BLEU / ROUGE-L of greedy answers and perplexity of the references, for one setup."""
    from unift.evals.likelihood import last_answer_labels, perplexity, score_rows

    figures: dict[str, Any] = {"examples": len(conversations)}
    shown = [with_shots(c, pool, setup.shots) if setup.shots else c for c in conversations]
    started = time.perf_counter()
    if "ppl" in options.metrics:
        rows = []
        for c in shown:
            encoded = encode_conversation(c, generator.template, generator.tokenizer, cutoff_len=10**9)
            rows.append((encoded.input_ids, last_answer_labels(encoded.labels)))
        with generator.adapter_enabled(setup.adapter):
            scored = score_rows(generator.model, rows, generator.tokenizer.pad_token_id, options.batch_size,
                                options.cutoff_len)
        ppl = perplexity(scored)
        figures["perplexity"] = ppl.mean_example
        figures["perplexity_corpus"] = ppl.corpus
        figures["answer_loss"] = ppl.mean_loss
        figures["answer_tokens"] = ppl.tokens
    if {"em", "bleu", "rouge"} & set(options.metrics):
        references = [c[-1]["content"] for c in conversations]
        limit = options.max_new_tokens or answer_budget(generator.tokenizer, references)
        settings = replace(PRESETS["greedy"], max_new_tokens=limit)
        prompts = [c[:-1] for c in shown]
        outputs = [c.text for c in generator.generate(prompts, settings, batch_size=options.batch_size,
                                                      adapter=setup.adapter, max_prompt_tokens=options.cutoff_len)]
        figures["max_new_tokens"] = limit
        figures["predictions"] = outputs
        if "em" in options.metrics:
            extract = get_extractor(options.extractor)
            correct = sum(bool(extract(r)) and extract(o) == extract(r) for o, r in zip(outputs, references))
            figures.update(exact_match=correct / len(references), correct=correct)
        if "bleu" in options.metrics:
            from unift.evals.text_metrics import bleu

            figures["bleu"] = bleu(outputs, references)
        if "rouge" in options.metrics:
            from unift.evals.text_metrics import rouge_l

            figures["rouge_l"] = rouge_l(outputs, references)
    figures["seconds"] = time.perf_counter() - started
    return figures


def _pair_figures(margins: list[float], margin_key: str, started: float) -> dict[str, Any]:
    won = sum(m > 0 for m in margins)
    return {"examples": len(margins), "correct": won, "preference_accuracy": won / len(margins),
            margin_key: sum(margins) / len(margins), "margins": margins, "seconds": time.perf_counter() - started}


def pairs_task(generator: Generator, conversations: list[list[Message]], setup: Setup,
               options: EvalOptions) -> dict[str, Any]:
    """How often, and by how much, the model finds each chosen answer more likely than its rejected one:
    the summed log-likelihood of each answer after the same prompt, the rows encoded as the preference
    stages train on them (unift.data.preference)."""
    from unift.data.preference import encode_preference
    from unift.evals.likelihood import score_rows

    if generator.card is not None and generator.card.stage == "rm":
        return reward_pairs_task(generator, conversations, options)
    started = time.perf_counter()
    rows = []
    for c in conversations:
        row = encode_preference(c, generator.template, generator.tokenizer, cutoff_len=10**9)
        prompt = row["prompt_ids"]
        rows += [(prompt + row[key], [IGNORE_INDEX] * len(prompt) + row[key]) for key in ("chosen_ids", "rejected_ids")]
    with generator.adapter_enabled(setup.adapter):
        scored = score_rows(generator.model, rows, generator.tokenizer.pad_token_id, options.batch_size,
                            options.cutoff_len)
    return _pair_figures([rejected.nll - chosen.nll for chosen, rejected in zip(scored[0::2], scored[1::2])],
                         "margin", started)


def reward_pairs_task(generator: Generator, conversations: list[list[Message]],
                      options: EvalOptions) -> dict[str, Any]:
    """A reward model's pairwise accuracy: how often it scores the chosen answer above the rejected one, and
    the mean reward margin (chosen minus rejected)."""
    import torch

    from unift.data.preference import encode_preference

    started = time.perf_counter()
    margins = []
    model, pad = generator.model, generator.tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in range(0, len(conversations), options.batch_size):
        rows = [encode_preference(c, generator.template, generator.tokenizer, options.cutoff_len, "split")
                for c in conversations[start:start + options.batch_size]]
        sequences = [r["prompt_ids"] + r[key] for key in ("chosen_ids", "rejected_ids") for r in rows]
        width = max(len(s) for s in sequences)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        with torch.inference_mode():
            rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        margins += (chosen - rejected).tolist()
    return _pair_figures(margins, "reward_margin", started)


def exam_task(generator: Generator, questions, pool, setup: Setup, options: EvalOptions) -> dict[str, Any]:
    from unift.evals.exams import score_exam

    started = time.perf_counter()
    with generator.adapter_enabled(setup.adapter):
        result = score_exam(generator.model, generator.tokenizer, generator.template, questions, shots_pool=pool,
                            num_shots=setup.shots, batch_size=options.batch_size, choice=options.choice,
                            max_len=options.cutoff_len)
    return {**result.as_dict(), "predictions": result.predictions, "seconds": time.perf_counter() - started}


def shot_pool(generator: Generator, options: EvalOptions) -> list[list[Message]]:
    if not options.num_shots or not options.data:
        return []
    names = options.shots_from or (generator.card.arguments.get("data") if generator.card else None)
    if not names:
        raise UniftError("--num_shots needs examples to show: pass --shots_from DATA (a run folder uses its "
                         "training data by default)")
    return load_conversations(list(names), Path(options.dataset_dir) if options.dataset_dir else None)


def load_tasks(options: EvalOptions) -> tuple[dict[str, list], dict[str, tuple]]:
    """Held-out conversations and exam questions, read and checked before any model loads."""
    from unift.evals.exams import load_exam

    dataset_dir = Path(options.dataset_dir) if options.dataset_dir else None
    tasks = {name: load_conversations([name], dataset_dir, kind="sft")[:options.max_samples] for name in options.data}
    for name in options.pairs:
        tasks[f"{name} (pairs)" if name in tasks else name] = \
            load_conversations([name], dataset_dir, kind="pairs")[:options.max_samples]
    for name, conversations in tasks.items():
        if not conversations:
            raise UniftError(f"--data {name}: no examples")
    exams = {}
    if options.exam:
        questions = load_exam(options.exam)[:options.max_samples]
        pool = load_exam(options.shots_from) if options.shots_from and options.num_shots else questions
        exams["exam"] = (questions, pool)
    return tasks, exams


def run_evaluation(generator: Generator, options: EvalOptions,
                   loaded: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """Every setup on every task; returns the results document (what eval_results.json holds)."""
    tasks, exams = loaded or load_tasks(options)
    pool = shot_pool(generator, options)
    document: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": generator.name, "peft_type": generator.card.peft_type if generator.card else None,
        "dtype": dtype_name(next(generator.model.parameters()).dtype),  # the weights as scored (--dtype)
        "options": {k: v for k, v in options.__dict__.items()}, "setups": [],
    }
    for setup in setups(generator.has_adapter, options, generator.holds_model):
        row: dict[str, Any] = {"label": setup.label, "adapter": setup.adapter, "shots": setup.shots, "tasks": {}}
        for name, conversations in tasks.items():
            paired = conversations and "rejected" in conversations[0][-1]
            row["tasks"][name] = (pairs_task(generator, conversations, setup, options) if paired
                                  else generation_task(generator, conversations, setup, pool, options))
        for name, (questions, exam_pool) in exams.items():
            row["tasks"][name] = exam_task(generator, questions, exam_pool, setup, options)
        document["setups"].append(row)
    return document


def evaluate(adapter_dir: str | None, options: EvalOptions, *, base_model: str | None = None,
             model_type: str | None = None, output: str | None = None, plot: bool = False,
             generator: Generator | None = None, device: str | None = None, dtype: torch.dtype | None = None,
             template: str | None = None, trust_remote_code: bool | None = None,
             rope_scaling: str | None = None, attn_implementation: str | None = None) -> dict[str, Any]:
    """Load, evaluate, print the table, write eval_results.json (and PNGs with plot); returns the document."""
    from unift.evals.report import markdown_table, plot_results, print_examples

    if not options.data and not options.exam and not options.pairs:
        raise UniftError("nothing to evaluate: pass --data, --pairs and/or --exam")
    loaded = load_tasks(options)  # bad data fails in a second, before the model loads
    generator = generator or Generator.load(adapter_dir, base_model=base_model, model_type=model_type,
                                            device=device, allow_reward=bool(options.pairs),
                                            dtype=dtype, template=template, trust_remote_code=trust_remote_code,
                                            rope_scaling=rope_scaling, attn_implementation=attn_implementation)
    document = run_evaluation(generator, options, loaded)
    document["adapter_dir"] = adapter_dir
    # the questions already read (and cut to --max_samples), which the predictions line up with
    print_examples(document, {n: loaded[0][n] for n in options.data[:1]}, options.show)
    print("\n" + markdown_table(document))
    # beside a local adapter; a hub adapter's folder is the hub cache, so the current folder then
    local = adapter_dir if adapter_dir and not is_hub_adapter(adapter_dir) else "."
    target = Path(output) if output else Path(local) / RESULTS
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, document)
    print(f"\nwrote {target}")
    if plot:
        for png in plot_results(document, target.parent):
            print(f"wrote {png}")
    return document


def figure(document: dict[str, Any], label: str, task: str, key: str) -> float:
    """One number from a results document (nan when absent)."""
    for row in document["setups"]:
        if row["label"] == label:
            return row["tasks"].get(task, {}).get(key, math.nan)
    return math.nan
