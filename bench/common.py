"""Shared by the benchmarks: the standard workload's data, child processes with their own peak RSS,
the machine's matmul peak, and medians over interleaved rounds (shared 2-core machines are noisy: the
same matmul has measured anywhere from 620 to 1,700 GFLOP/s within minutes, so every figure is a median
of rounds in which all contenders take turns)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def write_workload(source: Path, n: int, folder: Path) -> Path:
    """The first n alpaca records of `source` as folder/workload.json."""
    rows = read_records(source)[:n]
    keep = [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows]
    path = folder / "workload.json"
    path.write_text(json.dumps(keep, ensure_ascii=False), encoding="utf-8")
    return path


def standard_train_args(data: Path, out: Path, epochs: int = 1) -> list[str]:
    """`unift train` flags for the standard workload (LoRA r=8 on the embedded model, cutoff 128, batch 4,
    lr 1e-4, no checkpoint in between). `--truncation keep`: the same examples as the other contenders, which
    cut long answers at the cutoff rather than leave them out (unift's default drops answers that alone
    exceed --cutoff_len)."""
    return ["--data", str(data), "--output_dir", str(out), "--epochs", str(epochs), "--per_gpu_train_batch_size",
            "4", "--lora_r", "8", "--lora_alpha", "16", "--cutoff_len", "128", "--learning_rate", "1e-4",
            "--logging_steps", "4", "--save_steps", "100000", "--save_total_limit", "1", "--truncation", "keep"]


# Runs a Python script (a console script works too) and prints its own peak RSS when it exits, however
# it exits: each contender's figure is its own process's, with nothing of the benchmark's.
_REPORT_PEAK = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
)


def measured_run(python: str, script: str, args: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run `python script args`; (its output, its peak RSS in MiB). Fails loudly with the output's tail."""
    proc = subprocess.run([python, "-c", _REPORT_PEAK, script, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(out[-6000:])
        raise SystemExit(f"failed ({proc.returncode}): {script} {' '.join(args)}")
    peaks = [float(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_MIB ")]
    return out, peaks[-1] if peaks else float("nan")


def child_result(script: str, args: list[str], label: str) -> dict:
    """Run `script args` in a child Python that prints `RESULT <json>`; that JSON. PYTHONPATH: this checkout's
    unift, not the one an editable install in the environment may point at (another worktree). Fails loudly
    with the output's tail, naming `label`."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"{label}: failed ({proc.returncode})")
    return json.loads(found[-1][len("RESULT "):])


def matmul_peak_gflops(dtype: str = "bf16", seconds: float = 2.0) -> float:
    """This machine's matmul throughput now: 512x2048 by 2048x2048, all threads, best of short bursts."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(512, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 512 * 2048 * 2048 / (time.perf_counter() - start) / 1e9)
    return best


def run_round(jobs: dict, runs: dict, round_: int, rounds: int, folder: Path, after=None) -> None:
    """One round of every contender, forward on even rounds and backward on odd ones, so that a machine's
    drift falls on every side alike; each run is printed as it ends (a run cut short still leaves what it
    measured). `after(name)` runs after each contender's run."""
    names = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
    for i, name in enumerate(names):
        print(f"round {round_ + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
        runs[name].append(jobs[name](folder / f"run{round_}-{i}"))
        print(f"  {name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in runs[name][-1].items()}), file=sys.stderr, flush=True)
        if after is not None:
            after(name)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"
