"""Generate the bundled arithmetic word-problem dataset (train and held-out test splits).

The task is verifiable (the last line is "Answer: N") and the embedded SmolLM2-135M-Instruct gets it
mostly wrong before tuning, but learns it in minutes on two CPU cores. Each answer shows its working the
way one does it in one's head: the tens first, then the ones digit on its own, so that a carry or a borrow
is written down before the result ("58 + 27: 58 + 20 = 78, 78 + 7: 8 + 7 = 15, so 85."). Digits are
single tokens, so a model writing "85" straight after "78 + 7 =" must settle the carry before its first
digit; every mistake of that form was in its last step (about 90% exact match), against about 95% with
the ones written out. The sum in one step got about 80%. Deterministic for a given seed:
    python data/make_arith.py            # writes data/arith/train.jsonl and data/arith/test.jsonl
"""

from __future__ import annotations

import random
from pathlib import Path

from gen_splits import run

NAMES = ["Tom", "Anna", "Li Wei", "Maria", "Omar", "Sara", "Ken", "Lena", "Ravi", "Mia", "Jonas", "Aiko"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "pencils", "stickers", "shells", "cards", "eggs"]
ADD = [
    "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    "{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} in total?",
    "A box holds {a} {item}. {name} puts in another {b}. How many {item} are in the box?",
]
SUB = [
    "{name} has {a} {item} and gives away {b}. How many {item} are left?",
    "There were {a} {item} on the shelf. {name} took {b}. How many {item} remain on the shelf?",
    "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?",
]


def working(a: int, op: str, b: int) -> str:
    """a +/- b in two steps: the tens of b, then its ones, digit by digit (borrowing ten when needed)."""
    tens, ones = b // 10 * 10, b % 10
    step = a + tens if op == "+" else a - tens
    result = step + ones if op == "+" else step - ones
    digit = step % 10
    if op == "-" and digit < ones:
        digit += 10
    digits = f"{digit} {op} {ones} = {digit + ones if op == '+' else digit - ones}"
    return f"{a} {op} {tens} = {step}, {step} {op} {ones}: {digits}, so {result}"


def make_problem(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        question, op, result = rng.choice(ADD), "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        question, op, result = rng.choice(SUB), "-", a - b
    return {
        "instruction": question.format(name=name, item=item, a=a, b=b),
        "input": "",
        "output": f"{a} {op} {b}: {working(a, op, b)}.\nAnswer: {result}",
    }


def main() -> None:
    run(__doc__.splitlines()[0], make_problem, key=lambda row: row["instruction"],
        out=Path(__file__).parent / "arith", suffix=".jsonl", train=1000, test=100, seed=1234)


if __name__ == "__main__":
    main()
