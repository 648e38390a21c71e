"""Run folders written before the package was reorganised (tests/fixtures/legacy_*, made by `unift train` on
main da58a69) still work with every command, and give the answers they gave then.

The fixtures hold what `unift train` wrote, less the tokenizer files (3.5 MB, identical to the base's) and
the checkpoints' optimizer state; their base is the session's tiny llama (conftest.tiny_model: seed 0), so
every command gets `--model_name_or_path`, as it would for a run folder moved to another machine.
tests/fixtures/legacy_expected.json holds the outputs recorded with that main (`python
tests/test_legacy_run.py BASE_DIR` rewrites it: only ever on the old code)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from after_training_helpers import PYTHON, REPO, cli_result, env, free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = FIXTURES / "legacy_expected.json"
PROMPTS = ["What is 3 plus 3?", "What is 5 plus 5?", "Tell me a word."]
HELD_OUT = [{"instruction": f"What is {a} plus {a}?", "input": "", "output": f"{a} + {a} = {2 * a}.\nAnswer: {2 * a}"}
            for a in (9, 11, 12)]
GREEDY = ["--max_new_tokens", "10", "--preset", "greedy"]


def _answers(folder: Path, base: Path, capsys) -> dict[str, str]:
    out = {}
    for prompt in PROMPTS:
        code, stdout, stderr = cli_result(["generate", "--adapter_dir", str(folder), "--model_name_or_path",
                                           str(base), "--prompt", prompt, *GREEDY], capsys)
        assert code == 0, stderr
        out[prompt] = stdout.strip().splitlines()[-1]  # the answer: libraries may print lines of their own first
    return out


def record(base: Path, capsys=None) -> dict:
    """Every command's output on the fixtures (also what the test compares against the recording)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="unift-legacy-"))
    found: dict = {}
    for name in ("legacy_run", "legacy_adapters"):
        folder = FIXTURES / name
        found[name] = {"generate": _answers(folder, base, capsys)}
    run = FIXTURES / "legacy_run"
    checkpoint = run / "checkpoint-3"
    found["checkpoint"] = _answers(checkpoint, base, capsys)
    # predict
    inputs = work / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    code, _, stderr = cli_result(["predict", "--lora_dir", str(run), "--model_name_or_path", str(base), "--data",
                                  str(inputs), "--result_dir", str(work / "preds"), *GREEDY], capsys)
    assert code == 0, stderr
    rows = [json.loads(line) for line in (work / "preds" / "predictions.jsonl").read_text().splitlines()]
    found["predict"] = [row["prediction"] for row in rows]
    # eval: perplexity of held-out answers, base vs tuned
    held = work / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT), encoding="utf-8")
    code, _, stderr = cli_result(["eval", "--adapter_dir", str(run), "--model_name_or_path", str(base), "--data",
                                  str(held), "--metrics", "ppl", "--compare_base", "--output",
                                  str(work / "eval.json"), "--max_new_tokens", "10"], capsys)
    assert code == 0, stderr
    document = json.loads((work / "eval.json").read_text())
    found["eval"] = {row["label"]: {key: round(row["tasks"][str(held)][key], 4)
                                    for key in ("perplexity", "answer_loss")}
                     for row in document["setups"]}
    # merge: the merged model answers as the adapter did
    for name in ("legacy_run", "legacy_adapters"):
        merged = work / f"merged-{name}"
        code, _, stderr = cli_result(["merge", "--lora_dir", str(FIXTURES / name), "--model_name_or_path",
                                      str(base), "--merged_dir", str(merged)], capsys)
        assert code == 0, stderr
        code, stdout, stderr = cli_result(["generate", "--model_name_or_path", str(merged), "--prompt", PROMPTS[0],
                                           *GREEDY], capsys)
        assert code == 0, stderr
        found[f"merged-{name}"] = stdout.strip().splitlines()[-1]
    return found


def test_every_command_reads_a_run_folder_from_before_the_reorganisation(tiny_model, capsys):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    found = record(tiny_model("llama"), capsys)
    scores, expected_scores = found.pop("eval"), expected.pop("eval")
    assert found == expected
    assert scores.keys() == expected_scores.keys()
    for label, values in scores.items():  # reduction order may differ in the last digits, nothing more
        assert values == pytest.approx(expected_scores[label], rel=1e-4), label
    # the tuned answers differ from the base's somewhere, or the comparison above would prove little
    assert scores["base 0-shot"]["answer_loss"] > scores["tuned"]["answer_loss"] + 0.1


def test_serve_answers_from_a_run_folder_from_before_the_reorganisation(tiny_model):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    port = free_port()
    process = subprocess.Popen(
        [PYTHON, str(REPO / "web.py"), "--lora_dir", str(FIXTURES / "legacy_run"), "--model_name_or_path",
         str(tiny_model("llama")), "--port", str(port), "--no_ui"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"model": "legacy_run", "temperature": 0, "max_tokens": 10,
                           "messages": [{"role": "user", "content": PROMPTS[0]}]}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert answer["choices"][0]["message"]["content"].strip() == expected["legacy_run"]["generate"][PROMPTS[0]]
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    # Re-record (on the old code only): python tests/test_legacy_run.py BASE_DIR
    import io
    from types import SimpleNamespace

    class _Capture:  # what cli_result needs of pytest's capsys
        def __init__(self) -> None:
            sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

        def readouterr(self):
            out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
            sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
            return SimpleNamespace(out=out, err=err)

    try:
        result = record(Path(sys.argv[1]), _Capture())
    finally:
        captured_err = sys.stderr.getvalue()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        print(captured_err[-3000:], file=sys.stderr)
    EXPECTED.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, ensure_ascii=False))
