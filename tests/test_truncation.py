"""--cutoff_len cuts the prompt and earlier turns before the answer, so a trained answer keeps its end
token; an answer longer than the cutoff on its own is dropped, or kept cut only with --truncation keep;
`unift data check` and the run card count both."""

from __future__ import annotations

import json

import pytest
from test_data_cli import run

from unift.cli import main
from unift.data import IGNORE_INDEX, encode_conversation, get_template
from unift.models import load_tokenizer

TURNS = [
    {"role": "user", "content": "Remember the number 47. " + "Some filler words here. " * 20},
    {"role": "assistant", "content": "Noted: 47."},
    {"role": "user", "content": "Add 5 to it."},
    {"role": "assistant", "content": "47 + 5 = 52.\nAnswer: 52"},
]
LONG_ANSWER = [{"role": "user", "content": "Talk."}, {"role": "assistant", "content": "word " * 200}]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return load_tokenizer(str(embedded_dir))


def test_the_front_is_cut_and_the_last_answer_keeps_its_end(tokenizer):
    template = get_template("chatml")
    full = encode_conversation(TURNS, template, tokenizer, cutoff_len=4096)
    cut = encode_conversation(TURNS, template, tokenizer, cutoff_len=40)
    assert cut.truncated and not cut.long_answer and len(full.input_ids) > 40 == len(cut.input_ids)
    assert cut.input_ids == full.input_ids[-40:] and cut.labels == full.labels[-40:]
    answer = tokenizer.decode([t for t in cut.labels if t != IGNORE_INDEX])
    assert answer.endswith("47 + 5 = 52.\nAnswer: 52<|im_end|>\n")
    assert "Add 5 to it." in tokenizer.decode(cut.input_ids)  # the question of the answer is still there


def test_an_answer_longer_than_the_cutoff_is_dropped_or_kept_by_choice(tokenizer):
    template = get_template("chatml")
    dropped = encode_conversation(LONG_ANSWER, template, tokenizer, cutoff_len=64)
    assert dropped.long_answer and all(t == IGNORE_INDEX for t in dropped.labels)
    kept = encode_conversation(LONG_ANSWER, template, tokenizer, cutoff_len=64, truncation="keep")
    assert kept.long_answer and len(kept.input_ids) == 64
    assert 0 < sum(t != IGNORE_INDEX for t in kept.labels) < 64


@pytest.mark.parametrize(("source", "target", "budget", "kept"), [
    (100, 10, 64, (54, 10)),  # a short answer is kept whole, the prompt cut
    (10, 100, 64, (10, 54)),  # a short prompt is kept whole, the answer cut
    (80, 40, 64, (43, 21)),  # both long: shared in proportion, int(64 * 40 / 120) = 21 for the answer
    (5, 5, 64, (5, 5)),
])
def test_split_shares_the_cut_as_llamafactory_does(source, target, budget, kept):
    from unift.data.tokenize import _split_lengths

    assert _split_lengths(source, target, budget) == kept


def test_split_truncation_keeps_the_start_of_prompt_and_answer(tokenizer):
    template = get_template("chatml")
    question = [{"role": "user", "content": "Which number? " + "filler " * 100},
                {"role": "assistant", "content": "It is 47."}]
    full = encode_conversation(question, template, tokenizer, cutoff_len=4096)
    cut = encode_conversation(question, template, tokenizer, cutoff_len=48, truncation="split")
    answer = [t for t in full.labels if t != IGNORE_INDEX]
    assert len(cut.input_ids) == 48 and cut.truncated and not cut.long_answer
    assert cut.input_ids == full.input_ids[:48 - len(answer)] + answer  # the prompt's start, the whole answer
    assert [t for t in cut.labels if t != IGNORE_INDEX] == answer
    assert "Which number?" in tokenizer.decode(cut.input_ids)  # the question stays (the front cut loses it)
    assert "Which number?" not in tokenizer.decode(encode_conversation(question, template, tokenizer, 48).input_ids)

    long = encode_conversation(LONG_ANSWER, template, tokenizer, cutoff_len=64, truncation="split")
    whole = encode_conversation(LONG_ANSWER, template, tokenizer, cutoff_len=4096)
    prompt = sum(t == IGNORE_INDEX for t in whole.labels)
    assert long.long_answer and long.input_ids == whole.input_ids[:64]  # short prompt whole, answer cut
    assert sum(t != IGNORE_INDEX for t in long.labels) == 64 - prompt


def test_split_truncation_spends_the_cutoff_turn_by_turn(tokenizer):
    template = get_template("chatml")
    full = encode_conversation(TURNS, template, tokenizer, cutoff_len=4096)
    cut = encode_conversation(TURNS, template, tokenizer, cutoff_len=40, truncation="split")
    assert len(cut.input_ids) == 40 and cut.input_ids[:30] == full.input_ids[:30]  # the first turn's start
    answer = tokenizer.decode([t for t in cut.labels if t != IGNORE_INDEX])
    assert answer == "Noted: 47.<|im_end|>\n"  # the first answer fits whole; the second turn has no room left


def rows() -> list[dict]:
    normal = [{"instruction": f"Say the code word {i}.", "input": "", "output": f"The code is w{i}."} for i in range(4)]
    return [*normal, {"instruction": "long " * 120, "input": "", "output": "Short."},
            {"instruction": "Talk.", "input": "", "output": "word " * 120}]


def test_data_check_and_the_run_card_count_them(tmp_path, capsys, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    tiny = tiny_model("llama")
    for mode, fate in (("drop", "dropped"), ("keep", "kept cut at the end")):
        code, out, err = run(["data", "check", "--data", str(data), "--model_name_or_path", str(tiny),
                              "--cutoff_len", "64", "--truncation", mode, "--no_example"], capsys)
        assert code == 0, err
        assert f"truncated by --cutoff_len 64: 1 of {5 if mode == 'drop' else 6}" in out
        assert f"answers longer than the cutoff on their own: 1 ({fate}" in out
    out_dir = tmp_path / "run"
    code = main(["train", "--data", str(data), "--model_name_or_path", str(tiny), "--output_dir", str(out_dir),
                 "--max_steps", "1", "--per_gpu_train_batch_size", "2", "--cutoff_len", "64", "--compute_dtype",
                 "fp32", "--lora_r", "2", "--report_to", "none"])
    assert code == 0
    card = json.loads((out_dir / "unift_run.json").read_text())
    counts = {k: card["data"][k] for k in ("examples", "truncated", "long_answers", "dropped", "truncation")}
    assert counts == {"examples": 5, "truncated": 1, "long_answers": 1, "dropped": 1, "truncation": "drop"}


def test_training_says_what_the_cutoff_drops_and_warns_over_a_tenth(tmp_path, capsys, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    tiny = tiny_model("llama")
    common = ["train", "--data", str(data), "--model_name_or_path", str(tiny), "--max_steps", "1",
              "--per_gpu_train_batch_size", "2", "--compute_dtype", "fp32", "--lora_r", "2", "--report_to", "none"]
    capsys.readouterr()
    assert main([*common, "--output_dir", str(tmp_path / "cut"), "--cutoff_len", "64"]) == 0
    err = capsys.readouterr().err
    assert ("--cutoff_len 64: 1 of 6 records dropped (17%: no answer token within the cutoff; --truncation keep "
            "keeps an over-long answer cut), 1 cut at the front (prompt or earlier turns lost); raise --cutoff_len"
            in err)
    assert "warning: --cutoff_len 64 drops more than a tenth of the records" in err
    card = json.loads((tmp_path / "cut" / "unift_run.json").read_text())
    assert (card["data"]["dropped"], card["data"]["examples"], card["data"]["truncated"]) == (1, 5, 1)
    assert main([*common, "--output_dir", str(tmp_path / "whole"), "--cutoff_len", "512"]) == 0
    err = capsys.readouterr().err
    assert "--cutoff_len 512: 0 of 6 records dropped" in err and "more than a tenth" not in err
