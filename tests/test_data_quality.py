"""Real-world files: records with nothing to train on are skipped, counted and reported (refused with
--strict_data, refused when they are most of the file); text must be UTF-8, with or without a BOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from after_training_helpers import cli_result

from unift.data import DataOptions, load_sources

OK = {"instruction": "Say hi.", "input": "", "output": "Hi."}
TURNS_OK = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]


def jsonl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)




# (file name, one untrainable record, the reason reported for it)
UNTRAINABLE = [
    ("empty_answer.jsonl", {**OK, "output": "  "}, "field 'output' is empty"),
    ("empty_prompt.jsonl", {**OK, "instruction": ""}, "field 'instruction' is empty"),
    ("ends_on_user.jsonl", {"conversations": [*TURNS_OK, {"from": "human", "value": "And?"}]},
     "field 'conversations': the conversation ends on a user turn, with no answer to train on"),
    ("empty_gpt.jsonl", {"conversations": [TURNS_OK[0], {"from": "gpt", "value": ""}]},
     "field 'conversations' turn 2: the assistant text is empty"),
    ("empty_text.jsonl", {"text": ""}, "field 'text' is empty"),
]
GOOD = {"empty_answer.jsonl": OK, "empty_prompt.jsonl": OK, "ends_on_user.jsonl": {"conversations": TURNS_OK},
        "empty_gpt.jsonl": {"conversations": TURNS_OK}, "empty_text.jsonl": {"text": "Some words."}}


@pytest.mark.parametrize(("name", "bad", "reason"), UNTRAINABLE, ids=[c[0] for c in UNTRAINABLE])
def test_untrainable_records_are_skipped_counted_and_named(tmp_path, name, bad, reason):
    good = GOOD[name]
    path = tmp_path / name
    path.write_text(jsonl(good, good, bad, good, good, bad, good), encoding="utf-8")
    (source,) = load_sources(DataOptions(data=[str(path)]))
    assert source.records == 5
    assert source.skipped == {"count": 2, "first": [f"{path}: record 3", f"{path}: record 6"],
                              "reasons": {reason: 2}}


@pytest.mark.parametrize(("name", "bad", "reason"), UNTRAINABLE, ids=[c[0] for c in UNTRAINABLE])
def test_strict_data_refuses_them(tmp_path, capsys, name, bad, reason):
    path = tmp_path / name
    path.write_text(jsonl(GOOD[name], GOOD[name], bad), encoding="utf-8")
    code, _, err = cli_result(["train", "--data", str(path), "--strict_data", "--model_name_or_path",
                        str(tmp_path / "no_model_here")], capsys)
    assert code == 2
    assert err == f"unift: error: {path}: record 3: {reason} (--strict_data refuses records that cannot be trained)\n"


def test_a_file_of_mostly_unusable_records_is_a_mapping_mistake(tmp_path, capsys):
    path = tmp_path / "mapped_wrong.jsonl"
    path.write_text(jsonl(OK, {**OK, "output": ""}, {**OK, "output": ""}), encoding="utf-8")
    code, _, err = cli_result(["train", "--data", str(path), "--model_name_or_path", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert err == (f"unift: error: {path}: 2 of 3 records cannot be trained (e.g. {path}: record 2: field "
                   "'output' is empty); check the format and column mapping\n")


def test_data_check_reports_skipped_records(tiny_model, tmp_path, capsys):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([OK, {**OK, "output": ""}, OK, OK]), encoding="utf-8")
    code, out, _ = cli_result(["data", "check", "--data", str(path), "--model_name_or_path", str(tiny_model("llama")),
                        "--no_example"], capsys)
    assert code == 0
    assert "alpaca: 1 record skipped, nothing to train on: alpaca.json: record 2 [field 'output' is empty (1)]" in out


def test_stanford_alpaca_style_file_trains_with_the_empty_record_reported(tiny_model, tmp_path, capsys):
    """The Stanford Alpaca file has records whose output is an empty string (in its first 300, record 285:
    an instruction and an input, output ""). Built here in the same shape: 12 records, the 10th empty."""
    rows = [{"instruction": f"Standardize date number {i} to the ISO 8601 format.", "input": f"July {i + 1}th, 2021",
             "output": f"2021-07-{i + 1:02d}"} for i in range(12)]
    rows[9]["output"] = ""
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    out_dir = tmp_path / "run"
    code, _, err = cli_result(["train", "--data", str(path), "--model_name_or_path", str(tiny_model("llama")),
                        "--max_steps", "1", "--output_dir", str(out_dir), "--cutoff_len", "64",
                        "--compute_dtype", "fp32", "--report_to", "none"], capsys)
    assert code == 0, err
    assert ("alpaca_data: 1 record skipped, nothing to train on: alpaca_data.json: record 10 "
            "[field 'output' is empty (1)]") in err
    card = json.loads((out_dir / "unift_run.json").read_text())
    assert card["data"]["skipped"] == 1
    (source,) = card["data"]["sources"]
    assert source["records"] == 11 and source["skipped"]["first"] == [f"{path}: record 10"]


# ---- encodings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_utf8_with_a_byte_order_mark_reads(tmp_path, suffix):
    rows = [{"instruction": "Sag hallo.", "input": "", "output": "Grüß dich."}] * 2
    text = {".json": json.dumps(rows, ensure_ascii=False), ".jsonl": jsonl(*rows),
            ".csv": "instruction,input,output\nSag hallo.,,Grüß dich.\nSag hallo.,,Grüß dich.\n",
            ".txt": "Grüß dich.\nNoch einmal.\n"}[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (source,) = load_sources(DataOptions(data=[str(path)]))
    assert source.records == 2
    first = source.conversations[0]
    assert not first[0]["content"].startswith("\ufeff")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_other_encodings_are_one_line_naming_the_byte_offset(tmp_path, capsys, suffix):
    good = jsonl(OK, OK).encode("utf-8") if suffix != ".csv" else b"instruction,input,output\nSay hi.,,Hi.\n"
    if suffix == ".json":
        good = json.dumps([OK, OK]).encode("utf-8")[:-1] + b","
    if suffix == ".txt":
        good = b"Some words.\n"
    chinese = "你好，世界" if suffix != ".json" else json.dumps({**OK, "output": "你好"}, ensure_ascii=False)
    tail = {".json": "]", ".jsonl": "\n", ".csv": ",,x\n", ".txt": "\n"}[suffix]
    data = good + chinese.encode("gbk") + tail.encode()
    offset = len(good) + (chinese.index("你") if suffix != ".json" else chinese.encode("gbk").index("你".encode("gbk")))
    path = tmp_path / f"gbk{suffix}"
    path.write_bytes(data)
    code, _, err = cli_result(["train", "--data", str(path), "--model_name_or_path", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert err == (f"unift: error: {path}: not UTF-8 text: invalid byte 0x{data[offset]:02x} at byte offset "
                   f"{offset} (convert the file to UTF-8, e.g. iconv -f GBK -t UTF-8)\n")


def test_utf16_is_named(tmp_path, capsys):
    path = tmp_path / "utf16.json"
    path.write_text(json.dumps([OK]), encoding="utf-16")
    code, _, err = cli_result(["train", "--data", str(path), "--model_name_or_path", str(tmp_path / "nowhere")], capsys)
    assert (code, err) == (2, f"unift: error: {path}: the file is UTF-16 (byte order mark at byte 0); save it as "
                              "UTF-8\n")


def test_offset_is_exact_across_read_chunks(tmp_path):
    """A bad byte far into a large file, after multi-byte characters cut at chunk boundaries."""
    from unift.data.quality import not_utf8

    prefix = ("ü" * 70000).encode("utf-8")  # 140000 bytes: 64 KiB chunks end inside characters
    path = tmp_path / "big.txt"
    path.write_bytes(prefix + b"\xff rest")
    assert f"invalid byte 0xff at byte offset {len(prefix)} " in str(not_utf8(Path(path)))


def test_convert_leaves_them_out_and_says_so(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(OK, {**OK, "output": ""}, OK), encoding="utf-8")
    code, out, err = cli_result(["data", "convert", "--data", str(path), "--to", "sharegpt", "--output",
                          str(tmp_path / "out.jsonl")], capsys)
    assert code == 0 and "wrote 2 sharegpt records" in out
    assert "not converted: in: 1 record skipped, nothing to train on: in.jsonl: record 2" in err
