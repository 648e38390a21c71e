"""Batch prediction: answers for every record of a file, written row by row to predictions.jsonl.

Resumable: rows already in predictions.jsonl are skipped when the same command runs again, a row cut
off by a crash mid-write is dropped and redone, so no row is lost or duplicated. Greedy decoding by
default, so predictions are reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unift.data import Message
from unift.errors import UniftError
from unift.inference.generator import Generator
from unift.inference.settings import Completion, GenerationSettings
from unift.models.hub import is_hub_adapter

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
STATE = "predict_args.json"

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
              "chatgpt": "assistant", "model": "assistant", "system": "system"}
PROMPT_FIELDS = ("prompt", "query", "question", "text")
REFERENCE_FIELDS = ("reference", "response", "answer", "output", "completion", "target")


@dataclass
class Row:
    id: str | int
    messages: list[Message]  # ends with the user turn to answer
    reference: str | None

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


# ---- reading the input -----------------------------------------------------------------------------

def read_items(path: Path) -> list[Any]:
    """JSON (a list, or one object), JSONL (one value per line), or plain text (one prompt per line)."""
    if not path.is_file():
        raise UniftError(f"--input {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UniftError(f"{path}: the file is empty")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UniftError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
        return data if isinstance(data, list) else [data]
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UniftError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
    return items


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise UniftError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    return value


def _turns(turns: Any, where: str, key: str) -> list[Message]:
    """sharegpt {from, value} or messages {role, content} turns, as messages."""
    if not isinstance(turns, list) or not turns:
        raise UniftError(f"{where}: field {key!r} must be a non-empty list of turns")
    messages: list[Message] = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise UniftError(f"{where}: {key} turn {n} must be an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_NAMES:
            raise UniftError(f"{where}: {key} turn {n}: unknown role {role!r}; known: {', '.join(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise UniftError(f"{where}: {key} turn {n}: the text must be a string")
        messages.append({"role": ROLE_NAMES[role], "content": content})
    return messages


def to_row(item: Any, index: int, where: str) -> Row:
    """One input record (alpaca, sharegpt, messages, or a plain prompt) as the prompt to answer."""
    if isinstance(item, str):
        return Row(index, [{"role": "user", "content": item}], None)
    if not isinstance(item, dict):
        raise UniftError(f"{where}: expected an object or a string, found {type(item).__name__}")
    row_id = item.get("id", index)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise UniftError(f"{where}: field 'id' must be a string or an integer")
    system = item.get("system") if isinstance(item.get("system"), str) else None
    for key in ("messages", "conversations"):
        if key in item:
            messages = _turns(item[key], where, key)
            reference = None
            if messages[-1]["role"] == "assistant":  # the recorded answer is the reference
                reference = messages.pop()["content"]
            if not messages or messages[-1]["role"] != "user":
                raise UniftError(f"{where}: field {key!r} must end with a user turn (or a user turn and its answer)")
            if system and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system})
            return Row(row_id, messages, reference)
    messages = [{"role": "system", "content": system}] if system else []
    if "instruction" in item:  # alpaca
        instruction = _string(item, "instruction", where)
        extra = _string(item, "input", where) if item.get("input") is not None else ""
        prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
        for turn, pair in enumerate(item.get("history") or [], start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UniftError(f"{where}: field 'history' turn {turn} must be a [question, answer] pair")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    else:
        key = next((k for k in PROMPT_FIELDS if k in item), None)
        if key is None:
            raise UniftError(
                f"{where}: cannot find the prompt: expected 'instruction' (alpaca), 'conversations' (sharegpt), "
                f"'messages', or one of {', '.join(PROMPT_FIELDS)}; found {', '.join(sorted(item)) or 'no fields'}")
        prompt = _string(item, key, where)
    if not prompt.strip():
        raise UniftError(f"{where}: the prompt is empty")
    messages.append({"role": "user", "content": prompt})
    reference_key = next((k for k in REFERENCE_FIELDS if isinstance(item.get(k), str)), None)
    return Row(row_id, messages, item[reference_key] if reference_key else None)


def resolve_input(name: str) -> Path:
    """A file path, or the name of a registered dataset (data/dataset_info.json), e.g. arith_test."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    from unift.data import resolve_dataset

    entry = resolve_dataset(name)
    if not entry.path.is_file():
        raise UniftError(f"--input {name}: {entry.path} is a folder; give one file")
    return entry.path


def read_rows(path: Path, max_samples: int | None = None) -> list[Row]:
    items = read_items(path)[:max_samples]
    if not items:
        raise UniftError(f"{path}: no records")
    rows = [to_row(item, i, f"{path}: record {i + 1}") for i, item in enumerate(items)]
    seen: set[str] = set()
    for i, row in enumerate(rows):
        key = str(row.id)
        if key in seen:
            raise UniftError(f"{path}: record {i + 1}: id {row.id!r} appears twice (resuming needs unique ids)")
        seen.add(key)
    return rows


# ---- resuming --------------------------------------------------------------------------------------

def load_done(out: Path) -> dict[str, dict]:
    """Rows already written. A last line without its newline was cut off by a crash: drop it."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a row cut off mid-write (%d bytes); it is predicted again", out, len(data) - end)
        with open(out, "r+b") as handle:
            handle.truncate(end)
    done: dict[str, dict] = {}
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UniftError(f"{out}: line {number} is not valid JSON ({err.msg}); move the file away to start over") \
                from None
        done[str(row.get("id"))] = row
    return done


def check_resume(result_dir: Path, state: dict, done: dict[str, dict], rows: list[Row]) -> None:
    """Refuse to mix predictions of another input, model or decoding setting into one file."""
    hint = "pass --overwrite to start over, or choose another --result_dir"
    previous_path = result_dir / STATE
    if previous_path.exists():
        previous = json.loads(previous_path.read_text(encoding="utf-8"))
        changed = [key for key in state if previous.get(key) != state[key]]
        if changed:
            raise UniftError(f"{result_dir} holds predictions made with a different {', '.join(changed)}; {hint}")
    prompts = {str(r.id): r.prompt for r in rows}
    for key, row in done.items():
        if key not in prompts or prompts[key] != row.get("prompt"):
            raise UniftError(f"{result_dir / PREDICTIONS}: row id {key} does not match --input; {hint}")


# ---- predicting ------------------------------------------------------------------------------------

@dataclass
class PredictSummary:
    path: Path
    total: int
    skipped: int  # already there from an earlier run
    predicted: int
    seconds: float
    completion_tokens: int

    @property
    def rows_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def predict(
    generator: Generator,
    input_path: str | Path,
    result_dir: str | Path,
    settings: GenerationSettings,
    *,
    batch_size: int = 16,
    max_samples: int | None = None,
    max_prompt_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    adapter_dir: str | None = None,
) -> PredictSummary:
    """Answer every row of `input_path` into `result_dir/predictions.jsonl`, resuming what is there."""
    if batch_size < 1:
        raise UniftError("--batch_size must be at least 1")
    input_path, result_dir = resolve_input(str(input_path)), Path(result_dir)
    rows = read_rows(input_path, max_samples)
    result_dir.mkdir(parents=True, exist_ok=True)
    out = result_dir / PREDICTIONS
    state = run_state(generator, input_path, settings, max_prompt_tokens, adapter_dir)
    if overwrite:
        out.unlink(missing_ok=True)
        (result_dir / STATE).unlink(missing_ok=True)
    done = load_done(out)
    check_resume(result_dir, state, done, rows)
    from unift.runtime import write_json_atomic

    write_json_atomic(result_dir / STATE, state)
    pending = [r for r in rows if str(r.id) not in done]
    if done:
        log.info("resuming: %d of %d rows are already in %s", len(done), len(rows), out)
    from tqdm import tqdm

    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), unit="row", desc="predict",
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    tokens = answer_rows(generator, pending, out, settings, batch_size, max_prompt_tokens, bar)
    bar.close()
    summary = PredictSummary(out, len(rows), len(rows) - len(pending), len(pending),
                             time.perf_counter() - started, tokens)
    if pending:
        log.info("wrote %d rows to %s (%.2f rows/s, %.1f generated tokens/s)", summary.predicted, out,
                 summary.rows_per_second, summary.tokens_per_second)
    else:
        log.info("all %d rows are already in %s; nothing to do", len(rows), out)
    return summary


def run_state(generator: Generator, input_path: Path, settings: GenerationSettings,
              max_prompt_tokens: int | None, adapter_dir: str | None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the rows already there (check_resume)."""
    local_run = adapter_dir and not is_hub_adapter(adapter_dir)
    return {"input": str(input_path.resolve()),
            "model": str(Path(adapter_dir).resolve()) if local_run else generator.name,
            "decoding": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
            "max_prompt_tokens": max_prompt_tokens, "dtype": str(getattr(generator.model, "dtype", ""))}


def answer_rows(generator: Generator, pending: list[Row], out: Path, settings: GenerationSettings,
                batch_size: int, max_prompt_tokens: int | None, bar: Any) -> int:
    """Answer `pending` batch by batch, appending each batch to `out` and advancing the progress `bar`;
    returns the tokens generated."""
    started = time.perf_counter()
    tokens = 0
    with open(out, "a", encoding="utf-8") as handle:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            completions = generator.generate([r.messages for r in batch], settings, batch_size=len(batch),
                                             max_prompt_tokens=max_prompt_tokens)
            records = [prediction_record(row, completion) for row, completion in zip(batch, completions)]
            tokens += sum(c.completion_tokens for c in completions)
            # One write per batch, flushed to disk: a crash loses at most the batch being generated.
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{tokens / elapsed:.1f} tok/s")
    return tokens


def prediction_record(row: Row, completion: Completion) -> dict[str, Any]:
    """One line of predictions.jsonl: the row's id and prompt, the answer, and how it ended."""
    record: dict[str, Any] = {"id": row.id, "prompt": row.prompt, "prediction": completion.text}
    if len(row.messages) > 1:
        record["messages"] = row.messages
    if row.reference is not None:
        record["reference"] = row.reference
    record.update(finish_reason=completion.finish_reason, completion_tokens=completion.completion_tokens)
    return record
