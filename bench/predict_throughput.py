"""Batch predict throughput: the embedded SmolLM2-135M-Instruct (or a run) answering the same prompts at
several batch sizes, in the same process, through `unift.inference.predict.predict`.

With --adapter_dir, each batch size runs twice: with the adapter merged into the weights in memory (what
`Generator.load` does for additive adapters on fp32 bases) and with it kept apart. Prints rows/s and
generated tokens/s per configuration, the ratio to batch 1, and whether batching or merging changed any
greedy answer.

    .venv/bin/python bench/predict_throughput.py [--prompts 64] [--batch_sizes 1 4 16] [--max_new_tokens 48]
                                                 [--adapter_dir RUN] [--dtype fp32|bf16] [--threads N]
                                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--adapter_dir", help="a run folder (default: the embedded model alone)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from unift.inference.generator import Generator
    from unift.inference.predict import predict
    from unift.inference.settings import GenerationSettings
    from unift.models.dtypes import parse_dtype

    source = REPO / "data" / "arith" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="unift-bench-predict-"))
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n"
                            for r in rows))
    started = time.perf_counter()
    generator = Generator.load(args.adapter_dir, dtype=parse_dtype(args.dtype))
    load_seconds = time.perf_counter() - started
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    # Warm-up (first-call kernel setup), so no configuration pays for it.
    generator.generate([[{"role": "user", "content": "Hi"}]] * 2, GenerationSettings(max_new_tokens=4), batch_size=2)

    modes = ["merged", "adapter apart"] if generator.merged else ["as loaded"]
    results = {}
    for mode in modes:
        if mode == "adapter apart":
            generator.model.unmerge_adapter()
            generator.merged = False
        for batch in args.batch_sizes:
            label = f"{mode}, batch {batch}"
            summary = predict(generator, data, work / f"{mode}-{batch}".replace(" ", "-"), settings,
                              batch_size=batch, progress=False)
            answers = [json.loads(line)["prediction"] for line in summary.path.read_text().splitlines()]
            results[label] = {"mode": mode, "batch_size": batch, "rows": summary.predicted,
                              "seconds": round(summary.seconds, 2),
                              "rows_per_second": round(summary.rows_per_second, 3),
                              "generated_tokens": summary.completion_tokens,
                              "generated_tokens_per_second": round(summary.tokens_per_second, 1),
                              "answers": answers}
    first = next(iter(results.values()))
    for r in results.values():
        r["identical_answers"] = sum(a == b for a, b in zip(first["answers"], r["answers"]))
    report = {
        "model": generator.name, "dtype": args.dtype, "prompts": len(rows), "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_seconds": round(load_seconds, 1),
        "load_average": os.getloadavg(),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()},
    }
    width = max(len(k) for k in results) + 2
    print(f"\n{'':<{width}}{'rows/s':>9}{'gen tok/s':>11}{'vs first':>10}{'seconds':>9}{'same answers':>14}")
    for label, r in results.items():
        ratio = r["generated_tokens_per_second"] / first["generated_tokens_per_second"]
        print(f"{label:<{width}}{r['rows_per_second']:>9.3f}{r['generated_tokens_per_second']:>11.1f}"
              f"{ratio:>9.2f}x{r['seconds']:>9.1f}{r['identical_answers']:>9}/{len(rows)}")
    print(f"\n({args.dtype}, {report['threads']} threads, load average {report['load_average'][0]:.1f}; "
          f"'same answers' compares each configuration's greedy answers with the first row's)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
