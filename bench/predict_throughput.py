"""Batch predict throughput: the embedded SmolLM2-135M-Instruct answering the same prompts one by one
(--batch_size 1) and in batches (--batch_size 16), in the same process, through `unift.predict.predict`.

Prints rows/s and generated tokens/s for both and their ratio, and checks that batching (left padding)
did not change the greedy answers.

    .venv/bin/python bench/predict_throughput.py [--prompts 64] [--batch_size 16] [--max_new_tokens 48]
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
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--adapter_dir", help="a run folder (default: the embedded model alone)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, = cores); 1 is far "
                        "faster for one-by-one decoding on a machine other processes are also using")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from unift.inference import Engine, GenerationSettings
    from unift.models.loading import parse_dtype
    from unift.predict import predict

    source = REPO / "data" / "arith" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="unift-bench-predict-"))
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n"
                            for r in rows))
    started = time.perf_counter()
    engine = Engine.load(args.adapter_dir, dtype=parse_dtype(args.dtype))
    load_seconds = time.perf_counter() - started
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    # Warm-up (first-call kernel setup), so neither contender pays for it.
    engine.generate([[{"role": "user", "content": "Hi"}]] * 2, GenerationSettings(max_new_tokens=4), batch_size=2)

    results = {}
    for label, batch in (("one by one", 1), (f"batch {args.batch_size}", args.batch_size)):
        summary = predict(engine, data, work / f"b{batch}", settings, batch_size=batch, progress=False)
        answers = [json.loads(line)["prediction"] for line in summary.path.read_text().splitlines()]
        results[label] = {"batch_size": batch, "rows": summary.predicted, "seconds": round(summary.seconds, 2),
                          "rows_per_second": round(summary.rows_per_second, 3),
                          "generated_tokens": summary.completion_tokens,
                          "generated_tokens_per_second": round(summary.tokens_per_second, 1), "answers": answers}
    one, many = results.values()
    same = sum(a == b for a, b in zip(one["answers"], many["answers"]))
    report = {
        "model": engine.name, "dtype": args.dtype, "prompts": len(rows), "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_seconds": round(load_seconds, 1),
        "load_average": os.getloadavg(),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()},
        "rows_per_second_ratio": round(many["rows_per_second"] / one["rows_per_second"], 2),
        "tokens_per_second_ratio": round(many["generated_tokens_per_second"] / one["generated_tokens_per_second"],
                                         2),
        "identical_answers": f"{same}/{len(rows)}",
    }
    print(f"\n{'':<12}{'rows/s':>10}{'gen tok/s':>12}{'seconds':>10}{'tokens':>9}")
    for label, r in results.items():
        print(f"{label:<12}{r['rows_per_second']:>10.3f}{r['generated_tokens_per_second']:>12.1f}"
              f"{r['seconds']:>10.1f}{r['generated_tokens']:>9}")
    print(f"\nbatched / one by one: {report['rows_per_second_ratio']}x rows/s, "
          f"{report['tokens_per_second_ratio']}x generated tokens/s; identical greedy answers: "
          f"{report['identical_answers']} ({args.dtype}, {report['threads']} threads, load average "
          f"{report['load_average'][0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
