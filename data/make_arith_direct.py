"""The bundled arithmetic problems without their working: the answer line only ("Answer: 89" instead of
"43 + 46 = 89.\nAnswer: 89"), for the data-mixture experiment (with vs without chain-of-thought data).
Deterministic: derived from data/arith/train.jsonl.
    python data/make_arith_direct.py     # writes data/arith_direct/train.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "arith" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    out = HERE / "arith_direct"
    out.mkdir(exist_ok=True)
    with (out / "train.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            answer = row["output"].splitlines()[-1]  # "Answer: N"
            handle.write(json.dumps({**row, "output": answer}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
