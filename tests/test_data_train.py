"""Each data format and file type trains end to end: the real `unift train` command, a tiny llama, two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_formats import (
    alpaca_rows,
    cot_rows,
    messages_rows,
    sharegpt_rows,
    text_lines,
    write_rows,
)

from unift.cli import main


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFT_CACHE", str(tmp_path / "cache"))


def registry(folder: Path, entries: dict) -> Path:
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return folder


def alpaca_plain(n: int) -> list[dict]:
    return [{k: v for k, v in r.items() if k in ("instruction", "input", "output")} for r in alpaca_rows(n)]


def make_data(kind: str, folder: Path) -> tuple[list[str], int]:
    """(--data and extra flags, training examples expected) for one kind of input."""
    if kind == "alpaca":
        return [str(write_rows(folder / "a.json", alpaca_rows(6)))], 6
    if kind == "cot":
        write_rows(folder / "cot_train.json", cot_rows(4))
        registry(folder, {"cot_demo": {"file_name": "cot_train.json", "formatting": "cot"}})
        return ["cot_demo", "--dataset_dir", str(folder)], 4
    if kind == "sharegpt_tools":
        return [str(write_rows(folder / "s.jsonl", sharegpt_rows(4)))], 4
    if kind == "messages_tools":
        return [str(write_rows(folder / "m.json", messages_rows(4)))], 4
    if kind == "text":
        return [str(write_rows(folder / "pt.txt", text_lines(6)))], 6
    if kind == "csv_mapped":
        rows = [{"question": f"Code {i}?", "answer": f"w{i}"} for i in range(5)]
        write_rows(folder / "qa.csv", rows)
        registry(folder, {"qa": {"file_name": "qa.csv", "columns": {"prompt": "question", "response": "answer"}}})
        return ["qa", "--dataset_dir", str(folder)], 5
    if kind == "parquet":
        return [str(write_rows(folder / "a.parquet", alpaca_plain(5)))], 5
    if kind == "folder":
        write_rows(folder / "mix" / "a.jsonl", alpaca_plain(3))
        write_rows(folder / "mix" / "b.json", messages_rows(2))
        return [str(folder / "mix")], 5
    if kind == "bundled_mix":  # registry names, per-source caps and mixing proportions
        return ["multiturn", "zh", "--max_samples", "6", "--data_ratios", "2", "1", "--val_set_size", "2"], 10
    raise ValueError(kind)


KINDS = ["alpaca", "cot", "sharegpt_tools", "messages_tools", "text", "csv_mapped", "parquet", "folder", "bundled_mix"]


def train(tmp_path: Path, tiny: Path, data: list[str], *extra: str) -> dict:
    out = tmp_path / "run"
    code = main(["train", "--data", *data, "--model_name_or_path", str(tiny), "--model_type", "llama",
                 "--output_dir", str(out), "--max_steps", "2", "--per_gpu_train_batch_size", "2",
                 "--cutoff_len", "256", "--compute_dtype", "fp32", "--save_steps", "1000", "--logging_steps", "1",
                 "--lora_r", "2", *extra])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and all(p["loss"] > 0 for p in metrics["loss_curve"])
    metrics["card"] = json.loads((out / "unift_run.json").read_text())
    return metrics


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_trains_end_to_end(tmp_path, tiny_model, kind):
    data, expected = make_data(kind, tmp_path)
    metrics = train(tmp_path, tiny_model("llama"), data)
    assert metrics["train_examples"] == expected
    assert metrics["card"]["template"] == "auto"


def test_streaming_trains_end_to_end(tmp_path, tiny_model):
    data = write_rows(tmp_path / "big.jsonl", alpaca_plain(6) + [{"instruction": f"q{i}", "output": f"a{i}"}
                                                                 for i in range(20)])
    metrics = train(tmp_path, tiny_model("llama"), [str(data)], "--streaming", "--val_set_size", "2",
                    "--template", "chatml")
    assert metrics["train_examples"] == 4  # 2 steps x batch 2: the rows the run consumes
    assert metrics["card"]["template"] == "chatml"
