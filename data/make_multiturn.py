"""Generate the bundled multi-turn dataset (sharegpt form): the last answer depends on an earlier turn.

The user states a number in the first turn ("My locker number is 47."), sometimes asks something
unrelated in between, then asks a question that needs that first number. The final answer ends with
"Answer: N", so `unift eval` scores it; a model that ignores the history cannot get it right.
Deterministic for a given seed:
    python data/make_multiturn.py    # writes data/multiturn/train.json and data/multiturn/test.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gen_splits import run

# (statement, acknowledgement, [(question, sign)]) with {a} the remembered number and {b} the new one.
FACTS = [
    ("My locker number is {a}.", "Got it: your locker number is {a}.",
     [("My friend's locker number is {b} higher than mine. What is my friend's locker number?", 1),
      ("My sister's locker number is {b} lower than mine. What is her locker number?", -1)]),
    ("I am {a} years old.", "Noted: you are {a} years old.",
     [("How old will I be in {b} years?", 1), ("How old was I {b} years ago?", -1)]),
    ("There are {a} students in my class.", "OK, {a} students in your class.",
     [("{b} students are absent today. How many are in class?", -1),
      ("{b} new students join my class. How many students are there now?", 1)]),
    ("My book has {a} pages.", "Understood: your book has {a} pages.",
     [("I have read {b} pages. How many pages are left?", -1),
      ("The second volume has {b} pages more than mine. How many pages does it have?", 1)]),
    ("I have {a} euros in my wallet.", "Noted: {a} euros in your wallet.",
     [("I spend {b} euros on lunch. How many euros are left?", -1),
      ("I find {b} more euros in my coat. How many euros do I have now?", 1)]),
    ("Our garden has {a} tulips.", "Lovely, {a} tulips in your garden.",
     [("We plant {b} more tulips. How many tulips are there now?", 1),
      ("Rabbits eat {b} tulips. How many tulips are left?", -1)]),
]
DISTRACTORS = [
    ("What is {x} plus {y}?", "{x} + {y} = {z}.", lambda x, y: x + y),
    ("What is {x} times {y}?", "{x} × {y} = {z}.", lambda x, y: x * y),
]
SYSTEMS = ["You are a helpful assistant with a good memory.", "Answer briefly and show the calculation."]


def make_dialogue(rng: random.Random) -> dict:
    statement, ack, questions = rng.choice(FACTS)
    question, sign = rng.choice(questions)
    a, b = rng.randint(20, 99), rng.randint(2, 19)
    result = a + sign * b
    turns = [{"from": "human", "value": statement.format(a=a)}, {"from": "gpt", "value": ack.format(a=a)}]
    if rng.random() < 0.5:  # an unrelated turn in between: the number must be carried over two turns
        ask, answer, op = rng.choice(DISTRACTORS)
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        turns += [{"from": "human", "value": ask.format(x=x, y=y)},
                  {"from": "gpt", "value": answer.format(x=x, y=y, z=op(x, y))}]
    symbol = "+" if sign > 0 else "-"
    turns += [{"from": "human", "value": question.format(b=b)},
              {"from": "gpt", "value": f"{a} {symbol} {b} = {result}.\nAnswer: {result}"}]
    record: dict = {"conversations": turns}
    if rng.random() < 0.3:
        record["conversations"] = [{"from": "system", "value": rng.choice(SYSTEMS)}, *turns]
    return record


def main() -> None:
    run(__doc__.splitlines()[0], make_dialogue, key=dialogue_key, out=Path(__file__).parent / "multiturn",
        suffix=".json", train=800, test=100, seed=2024, noun="dialogues")


def dialogue_key(row: dict) -> str:
    return json.dumps([t for t in row["conversations"] if t["from"] != "system"], ensure_ascii=False)


if __name__ == "__main__":
    main()
