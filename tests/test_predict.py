"""Batch predict: input formats, batched = one-by-one (left padding), and resuming after a crash with no row
lost or duplicated."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap

import pytest
from after_training_helpers import PYTHON, REPO, env, trained_run

from unift.errors import UniftError
from unift.inference.predict import read_rows

MIXED = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate", "input": "bonjour", "system": "Be brief.", "history": [["hi", "hello"]]},
    {"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}]},
    {"id": "m1", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Why?"}]},
    {"prompt": "Say yes.", "answer": "yes"},
    "A bare string prompt",
]


def arithmetic_rows(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)} for i in range(n)]


def read_predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_reads_alpaca_sharegpt_messages_and_plain_prompts(write_jsonl, tmp_path):
    rows = read_rows(write_jsonl(MIXED))
    assert [r.id for r in rows] == [0, 1, 2, "m1", 4, 5]
    assert rows[0].messages == [{"role": "user", "content": "Add 2 and 3."}] and rows[0].reference == "5"
    assert rows[1].messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Translate\n\nbonjour"}]
    assert rows[1].reference is None
    assert rows[2].messages == [{"role": "user", "content": "Name a fruit."}] and rows[2].reference == "Apple."
    assert rows[3].messages[0] == {"role": "system", "content": "S"} and rows[3].prompt == "Why?"
    assert (rows[4].prompt, rows[4].reference) == ("Say yes.", "yes")
    assert rows[5].prompt == "A bare string prompt"
    # The same records as one JSON array, and plain text with one prompt per line.
    as_json = tmp_path / "mixed.json"
    as_json.write_text(json.dumps(MIXED), encoding="utf-8")
    assert [r.prompt for r in read_rows(as_json)] == [r.prompt for r in rows]
    text = tmp_path / "prompts.txt"
    text.write_text("first\n\nsecond\n", encoding="utf-8")
    assert [r.prompt for r in read_rows(text)] == ["first", "second"]


@pytest.mark.parametrize("record, message", [
    ({"title": "x"}, "cannot find the prompt"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must end with a user turn"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role"),
    ({"instruction": 3}, "must be a string"),
])
def test_bad_records_name_the_record(write_jsonl, record, message):
    with pytest.raises(UniftError, match=rf"record 2: .*{message}"):
        read_rows(write_jsonl([{"prompt": "fine"}, record]))


def test_duplicate_ids_are_refused(write_jsonl):
    with pytest.raises(UniftError, match="appears twice"):
        read_rows(write_jsonl([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]))


@pytest.fixture(scope="module")
def run(tiny_model):
    return trained_run(tiny_model("llama"))


def test_predict_command_batched_equals_one_by_one(run, write_jsonl, tmp_path):
    from unift.cli import main

    data = write_jsonl(arithmetic_rows(6) + MIXED[2:])
    common = ["--lora_dir", str(run), "--data", str(data), "--max_new_tokens", "8"]
    assert main(["predict", *common, "--result_dir", str(tmp_path / "b4"), "--batch_size", "4"]) == 0
    assert main(["predict", *common, "--result_dir", str(tmp_path / "b1"), "--predict_batch_size", "1"]) == 0
    batched = read_predictions(tmp_path / "b4" / "predictions.jsonl")
    single = read_predictions(tmp_path / "b1" / "predictions.jsonl")
    assert [r["id"] for r in batched] == [0, 1, 2, 3, 4, 5, 6, "m1", 8, 9]
    # Left padding must not change greedy answers.
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert batched[0]["reference"] == "0" and "reference" not in batched[7]
    assert batched[0]["prompt"] == "What is 0 plus 0?" and batched[7]["messages"][0]["role"] == "system"
    assert all(r["completion_tokens"] <= 8 for r in batched)
    # Running it again finds every row done and changes nothing.
    before = (tmp_path / "b4" / "predictions.jsonl").read_bytes()
    assert main(["predict", *common, "--result_dir", str(tmp_path / "b4"), "--batch_size", "4"]) == 0
    assert (tmp_path / "b4" / "predictions.jsonl").read_bytes() == before


def test_resume_refuses_other_settings(run, write_jsonl, tmp_path, capsys):
    from unift.cli import main

    data = write_jsonl(arithmetic_rows(2))
    out = ["--lora_dir", str(run), "--data", str(data), "--result_dir", str(tmp_path / "r")]
    assert main(["predict", *out, "--max_new_tokens", "4"]) == 0
    assert main(["predict", *out, "--max_new_tokens", "5"]) == 2
    assert "different decoding" in capsys.readouterr().err
    assert main(["predict", *out, "--max_new_tokens", "5", "--overwrite"]) == 0


# A real process that dies hard (SIGKILL, no clean-up) when its third batch starts, after a torn write:
# the first two batches are on disk, the third is half a line.
CRASHING = textwrap.dedent("""
    import os, signal, sys
    from unift.inference.generator import Generator
    from unift.cli import main
    calls = {"n": 0}
    original = Generator._generate_batch
    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(os.path.join(sys.argv[1], "predictions.jsonl"), "a") as handle:
                handle.write('{"id": 4, "prompt": "What is 4 pl')
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    Generator._generate_batch = crashing
    sys.exit(main(["predict", *sys.argv[2:]]))
""")


def test_resume_after_a_crash_loses_and_duplicates_nothing(run, write_jsonl, tmp_path):
    from unift.cli import main

    data = write_jsonl(arithmetic_rows(8))
    args = ["--lora_dir", str(run), "--data", str(data), "--batch_size", "2", "--max_new_tokens", "6"]
    crashed = tmp_path / "crashed"
    proc = subprocess.run([PYTHON, "-c", CRASHING, str(crashed), *args, "--result_dir", str(crashed)],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    torn = (crashed / "predictions.jsonl").read_text(encoding="utf-8")
    assert torn.count("\n") == 4 and not torn.endswith("\n")  # 2 batches done, 1 row half-written

    assert main(["predict", *args, "--result_dir", str(crashed)]) == 0
    assert main(["predict", *args, "--result_dir", str(tmp_path / "clean")]) == 0
    resumed = read_predictions(crashed / "predictions.jsonl")
    clean = read_predictions(tmp_path / "clean" / "predictions.jsonl")
    assert [r["id"] for r in resumed] == list(range(8))  # each row once, in order
    assert resumed == clean


def test_input_may_name_a_registered_dataset():
    from unift.inference.predict import resolve_input

    rows = read_rows(resolve_input("arith_test"), max_samples=2)
    assert len(rows) == 2 and "Answer:" in rows[0].reference
