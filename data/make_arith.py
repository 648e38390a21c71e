"""Generate the bundled arithmetic word-problem dataset (train and held-out test splits).

The task is verifiable (the last line is "Answer: N") and the embedded SmolLM2-135M-Instruct gets it
mostly wrong before tuning, but learns it in minutes on two CPU cores. Deterministic for a given seed:
    python data/make_arith.py            # writes data/arith/train.jsonl and data/arith/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

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
        "output": f"{a} {op} {b} = {result}.\nAnswer: {result}",
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "arith")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < args.train + args.test:
        row = make_problem(rng)
        if row["instruction"] not in seen:  # held-out questions never appear in training
            seen.add(row["instruction"])
            rows.append(row)
    write_jsonl(args.out / "train.jsonl", rows[: args.train])
    write_jsonl(args.out / "test.jsonl", rows[args.train:])
    print(f"wrote {args.train} train and {args.test} test problems to {args.out}")


if __name__ == "__main__":
    main()
