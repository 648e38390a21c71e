"""Generate arithmetic preference pairs (TRL's paired layout) from the bundled arithmetic problems: the
chosen answer is the problem's own worked answer, the rejected one the same working with one slip of the
kind one makes in one's head (a carry or borrow forgotten, a ones digit off by one, a tens step off by ten)
carried through to a wrong final number.

The two answers share every token up to the slip, so a preference stage has to learn the arithmetic, not
a style: `unift eval --pairs arith_pairs_test --compare_base` reports how often the tuned model finds the
right answer more likely (bench/dpo_vs_trl.py). Deterministic for a given seed:
    python data/make_arith_pairs.py    # writes data/arith_pairs/train.jsonl and data/arith_pairs/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from gen_splits import write_jsonl

HERE = Path(__file__).resolve().parent
SLIPS = ("carry", "digit", "tens")


def worked(a: int, op: str, b: int, slip: str | None = None, sign: int = 1) -> str:
    """make_arith's working for a op b; with `slip`, one step goes wrong by `sign` (+1/-1) and the wrong
    value is carried on to the end."""
    tens, ones = b // 10 * 10, b % 10
    step = a + tens if op == "+" else a - tens
    if slip == "tens":
        step += 10 * sign
    digit = step % 10
    if op == "-" and digit < ones:
        digit += 10
    small = digit + ones if op == "+" else digit - ones
    result = step + ones if op == "+" else step - ones
    if slip == "digit":
        small += sign
        result += sign
    elif slip == "carry":  # the ten carried (or borrowed) is dropped, or one is made up where none was
        crossed = small >= 10 if op == "+" else digit >= 10
        result += (-10 if op == "+" else 10) if crossed else 10 * sign
    return f"{a} {op} {b}: {a} {op} {tens} = {step}, {step} {op} {ones}: {digit} {op} {ones} = {small}, " \
           f"so {result}.\nAnswer: {result}"


def pair(row: dict, rng: random.Random) -> dict:
    a, op, b = re.match(r"(\d+) ([+-]) (\d+):", row["output"]).groups()
    a, b = int(a), int(b)
    assert worked(a, op, b) == row["output"], row  # the same working as make_arith's
    while True:
        rejected = worked(a, op, b, rng.choice(SLIPS), rng.choice((1, -1)))
        final = int(rejected.rsplit(" ", 1)[1])
        if final >= 0 and rejected != row["output"]:
            return {"prompt": row["instruction"], "chosen": row["output"], "rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=HERE / "arith_pairs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, count in (("train", args.train), ("test", args.test)):
        rows = [json.loads(line) for line in (HERE / "arith" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        write_jsonl(args.out / f"{split}.jsonl", [pair(row, rng) for row in rows[:count]])
    print(f"wrote {args.train} train and {args.test} test pairs to {args.out}")


if __name__ == "__main__":
    main()
