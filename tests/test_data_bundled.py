"""The bundled datasets are what their generators make, and every answer checks out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from unift.data import load_conversations

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))

from make_zh import WEEKDAYS, chinese_number  # noqa: E402


@pytest.mark.parametrize(("script", "folder", "files"), [
    ("make_arith.py", "arith", ("train.jsonl", "test.jsonl")),
    ("make_multiturn.py", "multiturn", ("train.json", "test.json")),
    ("make_zh.py", "zh", ("train.jsonl", "test.jsonl")),
    ("make_arith_pairs.py", "arith_pairs", ("train.jsonl", "test.jsonl")),
])
def test_generators_reproduce_the_committed_files(tmp_path, script, folder, files):
    subprocess.run([sys.executable, str(DATA / script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in files:
        assert (tmp_path / name).read_bytes() == (DATA / folder / name).read_bytes(), name


def test_multiturn_answers_need_the_first_turn():
    for split in ("multiturn", "multiturn_test"):
        for conversation in load_conversations([split]):
            turns = [m for m in conversation if m["role"] != "system"]
            remembered = int(re.search(r"\d+", turns[0]["content"]).group())
            change = int(re.search(r"\d+", turns[-2]["content"]).group())
            a, op, b, result = re.match(r"(\d+) ([+-]) (\d+) = (\d+)\.\nAnswer: \4$", turns[-1]["content"]).groups()
            assert (int(a), int(b)) == (remembered, change)
            assert int(result) == (remembered + change if op == "+" else remembered - change)
            assert len(turns) in (4, 6)


def test_chinese_answers_are_right():
    assert [chinese_number(n) for n in (15, 101, 3052, 10010, 20305)] == ["十五", "一百零一", "三千零五十二",
                                                                          "一万零一十", "二万零三百零五"]
    kinds = set()
    for conversation in load_conversations(["zh", "zh_test"]):
        question, answer = conversation[-2]["content"], conversation[-1]["content"]
        final = answer.rsplit("答案：", 1)[1]
        if m := re.match(r"请用汉字写出数字 (\d+)。", question):
            kinds.add("读数")
            assert final == chinese_number(int(m.group(1)))
        elif m := re.match(r"今天是(星期.)，(\d+)天后是星期几？", question):
            kinds.add("星期")
            assert final == WEEKDAYS[(WEEKDAYS.index(m.group(1)) + int(m.group(2))) % 7]
        else:
            kinds.add("应用题")
            a, op, b = re.match(r"(\d+) ([+-]) (\d+) = ", answer).groups()
            assert int(final) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert a in question and b in question
    assert kinds == {"读数", "星期", "应用题"}


def test_arith_pairs_reject_a_slip():
    for conversation in load_conversations(["arith_pairs", "arith_pairs_test"], kind="pairs"):
        answer = conversation[-1]
        a, op, b = re.match(r"(\d+) ([+-]) (\d+):", answer["content"]).groups()
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert answer["content"].endswith(f"Answer: {right}")
        assert not answer["rejected"].endswith(f"Answer: {right}")
        assert answer["rejected"].startswith(f"{a} {op} {b}: ")  # the same working, up to the slip
