"""What the bundled-data generators share: seeded, de-duplicated train/test splits written atomically.

Each `make_*.py` supplies a record maker and a key (records with equal keys are the same problem, so a
held-out problem never appears in training); `run` does the rest.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_list(path: Path, rows: list[dict]) -> None:
    # A JSON list with one record per line: valid JSON, and still readable in a diff.
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    _write(path, f"[\n{body}\n]\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def run(description: str, make: Callable[[random.Random], dict], key: Callable[[dict], str], *,
        out: Path, suffix: str, train: int, test: int, seed: int, noun: str = "problems") -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--test", type=int, default=test)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < args.train + args.test:
        row = make(rng)
        if key(row) not in seen:
            seen.add(key(row))
            rows.append(row)
    write = write_jsonl if suffix == ".jsonl" else write_json_list
    write(args.out / f"train{suffix}", rows[: args.train])
    write(args.out / f"test{suffix}", rows[args.train:])
    print(f"wrote {args.train} train and {args.test} test {noun} to {args.out}")
