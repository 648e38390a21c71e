"""Bad input: each case gives one line naming the file, the record and the field, and exit status 2,
before any model is loaded (the model path given does not even exist)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unift.cli import main

OK = {"instruction": "Say hi.", "input": "", "output": "Hi."}
TURNS_OK = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (file name, file text, expected error after "unift: error: <file>: "). Records that are well formed but
# cannot be trained (an empty answer) are skipped instead: tests/test_data_quality.py.
CASES = [
    ("empty.jsonl", "", "the file is empty"),
    ("empty.json", "", "the file is empty"),
    ("blank.json", " \n\n", "the file is empty"),
    ("blank.jsonl", "\n\n", "the file is empty"),
    ("no_records.json", "[]", "no records (an empty list)"),
    ("header_only.csv", "instruction,input,output\n", "no records (only a header)"),
    ("broken.json", json.dumps([OK])[:-3], "record 1: invalid JSON at line 1 column 52"),
    ("broken.jsonl", jsonl(OK) + '{"instruction": "x",\n', "line 2: invalid JSON"),
    ("not_a_list.json", '"hello"', "invalid JSON: expected a list of records"),
    ("not_objects.jsonl", jsonl(OK, [1, 2]), "record 2: expected an object, found list"),
    ("no_answer.jsonl", jsonl(OK, {"instruction": "Say hi.", "input": ""}), "record 2: field 'output' is missing"),
    ("wrong_type.jsonl", jsonl(OK, OK, {**OK, "output": 42}), "record 3: field 'output' must be a string, found int"),
    ("bad_history.jsonl", jsonl({**OK, "history": [["only a question"]]}),
     "record 1: field 'history' turn 1 must be a [question, answer] pair"),
    ("unknown_role.json", json.dumps([{"conversations": [TURNS_OK[0], {"from": "bot", "value": "Hello."}]}]),
     "record 1: field 'conversations' turn 2: unknown role 'bot' (known: function_call, gpt, human, "
     "observation, system)"),
    ("two_users.json", json.dumps([{"conversations": [TURNS_OK[0], *TURNS_OK]}]),
     "record 1: field 'conversations' turn 2: expected 'assistant' or 'function_call' after the user turn, "
     "found 'user'"),
    ("late_system.json", json.dumps([{"conversations": [*TURNS_OK, {"from": "system", "value": "x"}, *TURNS_OK]}]),
     "record 1: field 'conversations' turn 3: a system turn is only allowed first"),
    ("turns_not_list.json", json.dumps([{"conversations": "Hi"}]),
     "record 1: field 'conversations' must be a list of turns, found str"),
    ("value_type.json", json.dumps([{"conversations": [{"from": "human", "value": 7}, TURNS_OK[1]]}]),
     "record 1: field 'conversations' turn 1: 'value' must be a string, found int"),
    ("no_role.jsonl", jsonl({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello."}]}),
     "record 1: field 'messages' turn 1: 'role' is missing"),
    ("image.jsonl", jsonl({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                                        {"role": "assistant", "content": "A cat."}]}),
     "record 1: field 'messages' turn 1: only text content is supported, found a 'image_url' part"),
    ("unknown_shape.jsonl", jsonl({"question": "q", "answer": "a"}),
     "cannot tell the format of a record with fields ['answer', 'question']"),
]


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err  # all of stderr: the error line must be the only one


def train_argv(data: list[str], tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data", *data, "--model_name_or_path", str(tmp_path / "no_model_here"),
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("allocator", ["system", "auto"])
@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_fails_in_one_line_before_the_model(tmp_path, capsys, monkeypatch, name, text, expected, allocator):
    """With glibc's malloc chosen and with the default (which, without jemalloc, has a hint for the run's
    log): the error is the only line either way."""
    monkeypatch.setenv("UNIFT_ALLOCATOR", allocator)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    code, err = run(train_argv([str(path)], tmp_path), capsys)
    assert code == 2
    assert err.startswith(f"unift: error: {path}: {expected}") and err.count("\n") == 1


def test_data_check_reports_the_same_error(tmp_path, capsys):
    path = tmp_path / "no_answer.jsonl"
    path.write_text(jsonl(OK, {"instruction": "x"}))
    code, err = run(["data", "check", "--data", str(path), "--model_name_or_path", str(tmp_path / "none")], capsys)
    assert (code, err) == (2, f"unift: error: {path}: record 2: field 'output' is missing\n")


def registry(tmp_path: Path, entries: dict) -> Path:
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return tmp_path


@pytest.mark.parametrize(
    ("file", "text", "entry", "expected"),
    [
        ("q.csv", "question,reply\nhi,hello\n", {"columns": {"prompt": "question", "response": "answer"}},
         "{path}: column mapping response -> 'answer' names a missing column (found: question, reply)"),
        ("q.jsonl", jsonl({"question": "hi", "reply": "hello"}), {"columns": {"prompt": "question", "response": "answer"}},
         "{path}: column mapping response -> 'answer' names a missing column (found: question, reply)"),
        ("c.json", json.dumps([{"conversations": TURNS_OK}]), {"formatting": "sharegpt", "columns": {"messages": "dialog"}},
         "{path}: column mapping messages -> 'dialog' names a missing column (found: conversations)"),
        ("q.jsonl", jsonl({"question": "hi", "answer": "hello"}, {"question": "hi"}),
         {"columns": {"prompt": "question", "response": "answer"}},
         "{path}: record 2: field 'answer' (mapped from 'response') is missing"),
        ("q.jsonl", jsonl(OK), {"formatting": "yaml"}, "{info}: 'mine': unknown format 'yaml'; known: alpaca, cot, "
         "sharegpt, messages, text, preference"),
        ("q.jsonl", jsonl(OK), {"columns": {"images": "pics"}},
         "{path}: column 'images': images are not supported (text only)"),
        ("q.jsonl", jsonl({"instruction": "hi", "chosen": "a", "rejected": "b"}), {"ranking": True},
         "{path}: record 1: this record holds preference pairs (chosen and rejected answers), but the run trains "
         "on instruction data; pairs train with --stage dpo, orpo or simpo"),
    ],
)
def test_registry_mapping_errors(tmp_path, capsys, file, text, entry, expected):
    path = tmp_path / file
    path.write_text(text)
    folder = registry(tmp_path, {"mine": {"file_name": file, **entry}})
    code, err = run(train_argv(["mine"], tmp_path, "--dataset_dir", str(folder)), capsys)
    assert code == 2
    assert err == "unift: error: " + expected.format(path=path, info=folder / "dataset_info.json") + "\n"


def test_missing_file_and_empty_folder(tmp_path, capsys):
    folder = registry(tmp_path, {"gone": {"file_name": "gone.json"}})
    code, err = run(train_argv(["gone"], tmp_path, "--dataset_dir", str(folder)), capsys)
    assert (code, err) == (2, f"unift: error: {tmp_path / 'gone.json'}: no such file\n")
    (tmp_path / "empty").mkdir()
    code, err = run(train_argv([str(tmp_path / "empty")], tmp_path), capsys)
    assert code == 2 and err.startswith(f"unift: error: {tmp_path / 'empty'}: no data files")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data_ratios", "1"], "--data_ratios has 1 values for 2 --data entries"),
        (["--data_ratios", "0", "0"], "--data_ratios must be non-negative with at least one positive value"),
        (["--streaming"], "--streaming needs --max_steps"),
        (["--streaming", "--max_steps", "2", "--val_set_size", "0.1"], "--streaming takes --val_set_size as a count"),
    ],
)
def test_bad_data_flags(tmp_path, capsys, extra, expected):
    path = tmp_path / "ok.jsonl"
    path.write_text(jsonl(OK, OK))
    code, err = run(train_argv([str(path), str(path)], tmp_path, *extra), capsys)
    assert code == 2 and expected in err and err.count("\n") == 1
