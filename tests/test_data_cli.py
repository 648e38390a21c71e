"""`unift data check` and `unift data convert` through the real command line."""

from __future__ import annotations

import json

import pytest
from after_training_helpers import cli_result
from test_data_formats import alpaca_rows, messages_rows, sharegpt_rows, write_rows

from unift.data import to_conversations


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFT_CACHE", str(tmp_path / "cache"))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code, out, err = cli_result(argv, capsys)
    return code, out, "".join(line for line in err.splitlines(True) if not line.startswith("[unift]"))  # log lines


def test_data_check_shows_counts_formats_lengths_truncation_and_the_marked_example(tmp_path, capsys, embedded_dir):
    a = write_rows(tmp_path / "a.json", alpaca_rows(6))
    s = write_rows(tmp_path / "tools.jsonl", sharegpt_rows(4))
    code, out, err = run(["data", "check", "--data", str(a), str(s), "--model_name_or_path", str(embedded_dir),
                          "--cutoff_len", "150", "--val_set_size", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.split()[:6] == ["a", "alpaca", "6", "0", "4", "2"] or line.split()[:6] == ["a", "alpaca", "6", "0", "5", "1"]
               for line in lines)
    assert any(line.split()[:4] == ["tools", "sharegpt", "4", "0"] for line in lines)
    assert any(line.split()[:3] == ["total", "10", "0"] for line in lines)
    assert "template:  auto (the tokenizer's own chat template)" in out
    assert "tokens per example (train + val, before the cutoff):" in out and "median" in out and "█" in out
    truncated = next(line for line in lines if line.startswith("truncated by --cutoff_len 150:"))
    assert truncated.split(":")[1].split()[0] == "4"  # the tool dialogues are longer than 150 tokens
    assert "first example of a (" in out and "first example of tools (150 tokens, cut from" in out
    # The trained part is marked: the answer inside the marks, the question outside.
    assert "⟦The code is w0.<|im_end|>\n⟧" in out
    example = out.split("first example of a (")[1].split("\n", 1)[1]
    assert "Say the code word 0." in example.split("⟦")[0]


def test_data_check_mixing_line(tmp_path, capsys, embedded_dir):
    a = write_rows(tmp_path / "a.jsonl", alpaca_rows(6))
    code, out, _ = run(["data", "check", "--data", str(a), str(a), "--data_ratios", "3", "1", "--no_example",
                        "--model_name_or_path", str(embedded_dir)], capsys)
    assert code == 0 and "mixing: --data_ratios 3 1" in out and "first example" not in out


@pytest.mark.parametrize("chain", [("sharegpt", "messages", "alpaca"), ("messages", "alpaca", "sharegpt")])
def test_convert_round_trips_alpaca(tmp_path, capsys, chain):
    rows = alpaca_rows(4)
    for row in rows:
        row.pop("input")  # alpaca's input is merged into the instruction, so only input-free data round-trips
    source = write_rows(tmp_path / "a.json", rows)
    expected = to_conversations(source)
    current = source
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}.{'json' if step % 2 else 'jsonl'}"
        code, printed, err = run(["data", "convert", "--data", str(current), "--to", target, "--output", str(out)], capsys)
        assert code == 0, err
        assert printed.strip() == f"wrote 4 {target} records to {out}"
        assert to_conversations(out) == expected
        current = out
    if chain[-1] == "sharegpt":
        first = json.loads(out.read_text().splitlines()[0])  # the last step wrote JSONL
        assert first == {"conversations": [{"from": "human", "value": "Say the code word 0."},
                                           {"from": "gpt", "value": "The code is w0."}]}


def test_convert_keeps_tool_calls_between_sharegpt_and_messages(tmp_path, capsys):
    source = write_rows(tmp_path / "s.json", sharegpt_rows(3))
    expected = to_conversations(source)
    as_messages = tmp_path / "m.jsonl"
    assert run(["data", "convert", "--data", str(source), "--to", "messages", "--output", str(as_messages)], capsys)[0] == 0
    record = json.loads(as_messages.read_text().splitlines()[0])
    assert record["messages"][2]["tool_calls"][0]["function"]["name"] == "add"
    assert record["messages"][3] == {"role": "tool", "content": '{"result": 2}'}
    assert isinstance(record["tools"], list)
    back = tmp_path / "s2.json"
    assert run(["data", "convert", "--data", str(as_messages), "--to", "sharegpt", "--output", str(back)], capsys)[0] == 0
    assert to_conversations(back) == expected
    assert to_conversations(as_messages) == expected


def test_convert_refuses_what_the_target_cannot_hold(tmp_path, capsys):
    source = write_rows(tmp_path / "m.jsonl", messages_rows(1))
    code, _, err = run(["data", "convert", "--data", str(source), "--to", "alpaca", "--output",
                        str(tmp_path / "x.json")], capsys)
    assert code == 2
    assert err == f"unift: error: {source}: record 1: alpaca has no place for tool calls; convert to sharegpt or messages\n"
    assert not (tmp_path / "x.json").exists()
