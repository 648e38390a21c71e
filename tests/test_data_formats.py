"""Reading every supported format and file type into conversations (no tokenizer, no model).

The sample records here are also used by the other test_data_* modules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from unift.data import readers
from unift.data.conversations import iter_conversations, to_conversations
from unift.data.registry import resolve_dataset

TOOLS = json.dumps([{"name": "add", "description": "add two numbers",
                     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}])


def alpaca_rows(n: int = 6) -> list[dict]:
    rows = [{"instruction": f"Say the code word {i}.", "input": "", "output": f"The code is w{i * 7}."}
            for i in range(n)]
    extras = [("input", "Be brief."), ("system", "You are terse."), ("history", [["What is one?", "One is 1."]])]
    for row, (key, value) in zip(rows, extras):
        row[key] = value
    return rows


def cot_rows(n: int = 4) -> list[dict]:
    # As Alpaca-CoT ships them: newlines stored as the two characters backslash and n.
    return [{"instruction": f"Question {i}?\\nOptions:\\n(A) yes\\n(B) no", "input": "",
             "output": f"Step one.\\nStep two. So the answer is (A) {i}."} for i in range(n)]


def sharegpt_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"conversations": [
            {"from": "human", "value": f"Add {i} and 2."},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": i, "b": 2}})},
            {"from": "observation", "value": json.dumps({"result": i + 2})},
            {"from": "gpt", "value": f"The sum is {i + 2}."},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You are welcome."},
        ], "tools": TOOLS})
    rows[0]["conversations"].insert(0, {"from": "system", "value": "Use the tools."})
    return rows


def messages_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"Colour number {i}?"},
            {"role": "assistant", "content": f"Blue{i}."},
            {"role": "user", "content": "Add 1 and 2."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "Three."},
        ]})
    return rows


def text_lines(n: int = 6) -> list[str]:
    return [f"Document {i}: the quick brown fox number {i} jumps over the lazy dog." for i in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write records as .json, .jsonl, .csv or .parquet, by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".txt":
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    else:
        raise ValueError(path)
    return path


# ---- formats -----------------------------------------------------------------------------------------


def test_alpaca_with_system_history_and_input(tmp_path):
    convs = to_conversations(write_rows(tmp_path / "a.json", alpaca_rows()))
    assert convs[0] == [{"role": "user", "content": "Say the code word 0.\n\nBe brief."},
                        {"role": "assistant", "content": "The code is w0."}]
    assert convs[1][0] == {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in convs[2]] == ["user", "assistant", "user", "assistant"]
    assert convs[2][1]["content"] == "One is 1."


def test_cot_unescapes_newlines_and_alpaca_notes_them(tmp_path):
    path = write_rows(tmp_path / "cot.json", cot_rows())
    cot = to_conversations(path, "cot")
    assert cot[0][0]["content"] == "Question 0?\nOptions:\n(A) yes\n(B) no"
    assert cot[0][1]["content"] == "Step one.\nStep two. So the answer is (A) 0."
    notes: Counter = Counter()
    plain = [c for _, c in iter_conversations(path, notes=notes)]  # detected as alpaca: kept verbatim
    assert "\\n" in plain[0][0]["content"]
    assert any("cot" in note for note in notes)


def test_sharegpt_tool_calls_observations_tools_and_system(tmp_path):
    convs = to_conversations(write_rows(tmp_path / "s.json", sharegpt_rows()))
    first = convs[0]
    assert first[0] == {"role": "system", "content": "Use the tools.", "tools": TOOLS}
    assert [m["role"] for m in first[1:]] == ["user", "function_call", "observation", "assistant", "user",
                                              "assistant"]
    assert convs[1][0] == {"role": "system", "content": "", "tools": TOOLS}


def test_openai_messages_with_tool_calls(tmp_path):
    convs = to_conversations(write_rows(tmp_path / "m.jsonl", messages_rows()))
    roles = [m["role"] for m in convs[0]]
    assert roles == ["system", "user", "assistant", "user", "function_call", "observation", "assistant"]
    assert json.loads(convs[0][4]["content"]) == {"name": "add", "arguments": {"a": 1, "b": 2}}


def test_openai_content_parts_are_joined(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello."}]}
    assert to_conversations(write_rows(tmp_path / "m.json", [row]))[0][0]["content"] == "Hi there"


def test_leading_assistant_turn_is_dropped_and_counted(tmp_path):
    row = {"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}]}
    notes: Counter = Counter()
    convs = [c for _, c in iter_conversations(write_rows(tmp_path / "s.json", [row]), notes=notes)]
    assert [m["role"] for m in convs[0]] == ["user", "assistant"]
    assert notes["leading assistant turns dropped"] == 1


def test_plain_text_from_txt_and_jsonl(tmp_path):
    txt = write_rows(tmp_path / "pt.txt", text_lines(3))
    assert to_conversations(txt) == [[{"role": "text", "content": line}] for line in text_lines(3)]
    jsonl = write_rows(tmp_path / "pt.jsonl", [{"text": t} for t in text_lines(2)])
    assert to_conversations(jsonl)[1] == [{"role": "text", "content": text_lines(2)[1]}]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_type_reads_the_same(tmp_path, suffix):
    rows = [{k: v for k, v in r.items() if k in ("instruction", "input", "output")} for r in alpaca_rows()]
    expected = to_conversations(write_rows(tmp_path / "ref.jsonl", rows))
    assert to_conversations(write_rows(tmp_path / f"data{suffix}", rows)) == expected


def test_folder_of_mixed_files_in_name_order(tmp_path):
    folder = tmp_path / "mix"
    write_rows(folder / "b.jsonl", messages_rows(2))
    write_rows(folder / "a.json", alpaca_rows(3))
    write_rows(folder / "c" / "d.csv", [{"instruction": "x", "input": "", "output": "y"}])
    (folder / ".hidden.json").write_text("not json")
    found: Counter = Counter()
    convs = [c for _, c in iter_conversations(folder, formats=found)]
    assert len(convs) == 3 + 2 + 1
    assert found == {"alpaca": 2, "messages": 1}


def test_column_mapping_and_tags(tmp_path):
    rows = [{"question": "2+2?", "answer": "4", "sys": "Be exact."}]
    convs = to_conversations(write_rows(tmp_path / "q.csv", rows), "alpaca",
                             {"prompt": "question", "response": "answer", "system": "sys"})
    assert convs[0] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]
    chat = [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}]
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    convs = to_conversations(write_rows(tmp_path / "c.json", chat), "sharegpt", {"messages": "dialog"}, tags)
    assert convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_json_is_read_incrementally_with_small_buffers(tmp_path, monkeypatch):
    rows = [{"instruction": 'tricky "[{,}]" \\ text ' + "é" * i, "input": "", "output": f"ok {i}"} for i in range(30)]
    path = write_rows(tmp_path / "big.json", rows)
    monkeypatch.setattr(readers, "CHUNK", 7)  # items span many buffer refills
    assert [r for _, r in readers.iter_records(path)] == rows


def test_a_single_json_object_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(alpaca_rows(1)[0]))
    assert len(to_conversations(path)) == 1


# ---- registry ----------------------------------------------------------------------------------------


def test_llamafactory_dataset_info_is_read_unchanged(tmp_path):
    """An excerpt in LLaMA-Factory's own layout: alpaca by default, sharegpt with columns, OpenAI-style
    messages as sharegpt + role/content tags, pre-training as a lone `prompt` column."""
    write_rows(tmp_path / "alpaca_demo.json", alpaca_rows(2))
    write_rows(tmp_path / "tool_demo.json", sharegpt_rows(2))
    write_rows(tmp_path / "chat_demo.json", messages_rows(2))
    write_rows(tmp_path / "c4_demo.jsonl", [{"text": t} for t in text_lines(2)])
    info = {
        "alpaca_demo": {"file_name": "alpaca_demo.json"},
        "tool_demo": {"file_name": "tool_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "tools": "tools"}},
        "chat_demo": {"file_name": "chat_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
        "alpaca_en": {"hf_hub_url": "someone/alpaca_en"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    roles = {}
    for name in ("alpaca_demo", "tool_demo", "chat_demo", "c4_demo"):
        entry = resolve_dataset(name, tmp_path)
        convs = to_conversations(entry.path, entry.formatting, entry.columns, entry.tags)
        roles[name] = {m["role"] for c in convs for m in c}
    assert roles["tool_demo"] >= {"function_call", "observation"}
    assert roles["chat_demo"] >= {"function_call", "observation", "system"}
    assert roles["c4_demo"] == {"text"}
    assert resolve_dataset("arith", tmp_path).path.name == "train.jsonl"  # bundled names stay reachable


def test_bundled_datasets_load():
    for name in ("arith", "arith_test", "multiturn", "multiturn_test", "zh", "zh_test"):
        entry = resolve_dataset(name)
        convs = to_conversations(entry.path, entry.formatting, entry.columns, entry.tags)
        assert len(convs) >= 100 and convs[-1][-1]["role"] == "assistant"
