"""Generate the bundled Chinese dataset (OpenAI-style messages, JSONL), verifiable like the others.

Three kinds of problems, each answer ending in a line "答案：X" that a script can check:
  应用题   two-digit addition/subtraction word problems      "23 + 15 = 38\n答案：38"
  读数     writing a number (1-99999) in Chinese characters   "答案：三千零五十二"
  星期     which weekday it is n days after a given one        "星期一往后数 3 天是星期四。\n答案：星期四"
Deterministic for a given seed:
    python data/make_zh.py    # writes data/zh/train.jsonl and data/zh/test.jsonl
"""

from __future__ import annotations

import random
from pathlib import Path

from gen_splits import run

NAMES = ["小明", "小红", "李华", "王芳", "张伟", "刘洋", "陈静", "小刚"]
ITEMS = [("苹果", "个"), ("铅笔", "支"), ("书", "本"), ("邮票", "张"), ("气球", "个"), ("鸡蛋", "个"), ("贴纸", "张")]
ADD = ["{name}有{a}{unit}{item}，又买了{b}{unit}。现在一共有多少{unit}{item}？",
       "{name}星期一收集了{a}{unit}{item}，星期二又收集了{b}{unit}。一共收集了多少{unit}{item}？"]
SUB = ["{name}有{a}{unit}{item}，送给同学{b}{unit}。还剩多少{unit}{item}？",
       "盒子里有{a}{unit}{item}，{name}拿走了{b}{unit}。盒子里还剩多少{unit}{item}？"]
DIGITS = "零一二三四五六七八九"
UNITS = ["", "十", "百", "千", "万"]
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
SYSTEM = "你是一个认真细致的中文助手。"


def chinese_number(n: int) -> str:
    """1 <= n <= 99999 in Chinese numerals: 3052 -> 三千零五十二, 15 -> 十五, 10010 -> 一万零一十."""
    if not 0 < n < 100000:
        raise ValueError(n)
    text, out, gap = str(n), [], False
    for i, char in enumerate(text):
        digit, place = int(char), len(text) - 1 - i
        if digit == 0:
            gap = True
            continue
        if gap and out:
            out.append("零")  # one 零 stands for any run of zeros inside the number
        gap = False
        out.append(DIGITS[digit] + UNITS[place])
    result = "".join(out)
    return result[1:] if result.startswith("一十") else result  # 十五, not 一十五


def word_problem(rng: random.Random) -> tuple[str, str]:
    name, (item, unit) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return rng.choice(ADD).format(name=name, item=item, unit=unit, a=a, b=b), f"{a} + {b} = {a + b}\n答案：{a + b}"
    a, b = max(a, b), min(a, b)
    return rng.choice(SUB).format(name=name, item=item, unit=unit, a=a, b=b), f"{a} - {b} = {a - b}\n答案：{a - b}"


def number_reading(rng: random.Random) -> tuple[str, str]:
    n = rng.choice([rng.randint(1, 99), rng.randint(100, 9999), rng.randint(10000, 99999)])
    return f"请用汉字写出数字 {n}。", f"答案：{chinese_number(n)}"


def weekday(rng: random.Random) -> tuple[str, str]:
    start, days = rng.randrange(7), rng.randint(1, 30)
    end = WEEKDAYS[(start + days) % 7]
    question = f"今天是{WEEKDAYS[start]}，{days}天后是星期几？"
    return question, f"{WEEKDAYS[start]}往后数 {days} 天是{end}。\n答案：{end}"


def make_problem(rng: random.Random) -> dict:
    question, answer = rng.choice([word_problem, number_reading, weekday])(rng)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main() -> None:
    run(__doc__.splitlines()[0], make_problem, key=lambda row: row["messages"][-2]["content"],
        out=Path(__file__).parent / "zh", suffix=".jsonl", train=800, test=100, seed=4321)


if __name__ == "__main__":
    main()
