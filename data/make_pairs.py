"""Generate the bundled preference pairs (TRL's paired layout): the request asks for capital letters, the
chosen answer follows it, the rejected one is the same sentence in ordinary case.

The base model prefers the ordinary sentence (it is far more likely text), so the pairs show a preference
stage teaching the model something it did not do: `unift eval --pairs caps_pairs_test --compare_base`
reports how often the tuned model finds the instruction-following answer more likely. Deterministic for
a given seed:
    python data/make_pairs.py    # writes data/pairs/train.jsonl and data/pairs/test.jsonl
"""

from __future__ import annotations

import random
from pathlib import Path

from gen_splits import write_jsonl

THINGS = ["apple", "river", "mountain", "teacher", "window", "garden", "bicycle", "ocean", "candle", "forest",
          "pencil", "castle", "rabbit", "violin", "planet", "bridge", "coffee", "desert", "ladder", "lantern",
          "meadow", "harbor", "glacier", "compass", "library", "orchard", "falcon", "kettle", "marble", "feather",
          "island", "tiger", "rocket", "blanket", "mirror", "village", "saddle", "button", "volcano", "umbrella"]
ASKS = ["In capital letters, describe a {t} in one short sentence.",
        "Reply in capital letters: what is a {t}?",
        "Using only capital letters, tell me one thing about a {t}."]
SENTENCES = ["A {t} is something many people know well.", "Most people have seen a {t} at least once.",
             "A {t} can be found in many places around the world."]


def pair(rng: random.Random, thing: str) -> dict:
    answer = rng.choice(SENTENCES).format(t=thing)
    return {"prompt": rng.choice(ASKS).format(t=thing), "chosen": answer.upper(), "rejected": answer}


def main(seed: int = 7, held_out: int = 12, per_thing: int = 2) -> None:
    rng = random.Random(seed)
    things = rng.sample(THINGS, len(THINGS))  # held-out pairs name things never seen in training
    train = [pair(rng, t) for t in things[held_out:] for _ in range(per_thing)]
    test = [pair(rng, t) for t in things[:held_out]]
    out = Path(__file__).parent / "pairs"
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test pairs to {out}")


if __name__ == "__main__":
    main()
