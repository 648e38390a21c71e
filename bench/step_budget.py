"""A training step's time budget: unift (its defaults) beside LLaMA-Factory's fastest configuration, on
the standard and the scale workloads (bench/vs_llamafactory.py describes both), with the same checkpoint,
tokens and dtype plan as that benchmark.

Each tool trains in its own process and environment under bench/step_profile.py: after `--warmup` steps
it times `--steps` plain steps, then profiles as many with torch.profiler (CPU activities) and stops. The
table gives seconds per step in the matmuls (with the fused attention kernels) and in everything else,
split into buckets (bench/budget.py says how each op is counted, once), and the ops outside the matmuls
that cost unift the most. On CPUs with AVX512-BF16 or AMX the matmuls shrink under bf16 and the rest
dominates: that rest is what this measures.

    bench/step_budget.sh --data alpaca_en_demo.json [--workloads standard scale] [--tools unift llamafactory]
        [--warmup 2] [--steps 3] [--json OUT]

The dtype plan is the one unift picks (bf16 where the CPU has AVX512-BF16 or AMX, else fp32; both tools
get it); UNIFT_CPU_BF16=1 forces the bf16 plan on any CPU, 0 the fp32 one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import BUCKETS, MATMUL, OPTIMIZER, PYTHON, summarize  # noqa: E402
from common import REPO, machine, read_records, write_workload  # noqa: E402
from fair import BENCH_DIR, bf16_checkpoint, fp32_view, native_bf16, scale_checkpoint, write_long_records  # noqa: E402
from vs_llamafactory import WORKLOADS, llamafactory_config, unift_args  # noqa: E402

TOOLS = {"unift": "unift (defaults)", "llamafactory": "LLaMA-Factory fastest"}
PROFILER = str(REPO / "bench" / "step_profile.py")


def _run(python: str, out: Path, warmup: int, steps: int, target: list[str], env: dict) -> dict:
    import subprocess

    proc = subprocess.run([python, PROFILER, "--out", str(out), "--warmup", str(warmup), "--steps", str(steps),
                           *target], capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
        raise SystemExit(f"step_budget: profiling {target[0]} failed (exit {proc.returncode}; no {out.name})")
    raw = json.loads(out.read_text())
    return {**summarize(raw), "plain_step_seconds": raw["plain_step_seconds"], "raw": raw}


def profile_workload(name: str, ns, folder: Path, bf16: bool) -> dict:
    from unift.models import embedded_model_dir

    w = dict(WORKLOADS[name])
    w["examples"] = w["batch"] * (ns.warmup + 2 * ns.steps + 1)  # one batch spare: the run stops itself
    stored = scale_checkpoint(embedded_model_dir()) if name == "scale" else bf16_checkpoint(embedded_model_dir())
    model = stored if bf16 else fp32_view(stored)
    work = folder / name
    work.mkdir()
    if name == "scale":
        data = write_long_records(read_records(ns.data), w["examples"], 4 * w["cutoff"] * 4, work)
    else:
        data = write_workload(ns.data, w["examples"], work)
    (work / "dataset_info.json").write_text(json.dumps({"workload": {"file_name": data.name}}))
    results = {"model": stored.name, **w}
    if "unift" in ns.tools:
        print(f"{name}: profiling unift", file=sys.stderr, flush=True)
        args = unift_args(model, data, work / "unift", w, "bf16" if bf16 else "fp32")
        results["unift"] = _run(sys.executable, work / "unift.json", ns.warmup, ns.steps,
                                [str(REPO / "uniform_finetune.py"), *args], {})
    if "llamafactory" in ns.tools:
        print(f"{name}: profiling LLaMA-Factory", file=sys.stderr, flush=True)
        config = llamafactory_config(model, work, work / "lf", w, bf16, lean=False)
        path = work / "lf.yaml"
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
        venv = ns.llamafactory
        results["llamafactory"] = _run(str(venv / "bin" / "python"), work / "lf.json", ns.warmup, ns.steps,
                                       [str(venv / "bin" / "llamafactory-cli"), "train", str(path)],
                                       {"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    return results


def print_table(workloads: dict, tools: list[str]) -> None:
    columns = [(w, t) for w in workloads for t in tools]
    heads = [f"{w}: {TOOLS[t]}" for w, t in columns]
    width = max(24, *(len(h) for h in heads))
    print(f"{'seconds per step':<40}" + "".join(f"{h:>{width + 2}}" for h in heads))

    def row(label: str, values: list[float], total: list[float] | None = None) -> None:
        cells = [f"{v:.3f}" + (f" ({100 * v / s:4.1f}%)" if total else "") for v, s in zip(values, total or values)]
        print(f"{label:<40}" + "".join(f"{c:>{width + 2}}" for c in cells))

    results = [workloads[w][t] for w, t in columns]
    walls = [r["step_seconds"] for r in results]
    row("step, profiled (wall)", walls)
    row("step, unprofiled (median of plain steps)", [statistics.median(r["plain_step_seconds"]) for r in results])
    for bucket in BUCKETS:
        row(("  " if bucket != MATMUL else "") + bucket, [r["buckets"][bucket] for r in results], walls)
    rest = [r["step_seconds"] - r["buckets"][MATMUL] for r in results]
    row("everything but matmuls", rest, walls)
    for head, r in zip(heads, results):
        plain = statistics.median(r["plain_step_seconds"])
        if not 0.8 < r["step_seconds"] / plain < 1.25:
            # the profiler adds a few per cent; more means the cores were shared during the run, and a
            # shared core stalls every 2-thread op at its barrier, so small ops' times swell most
            print(f"WARNING: {head}: profiled steps took {r['step_seconds']:.2f} s against {plain:.2f} s unprofiled: "
                  "something else used the cores, and the split above overstates the small ops")
    for w in workloads:
        if len(tools) == 2:
            u, lf = workloads[w]["unift"], workloads[w]["llamafactory"]
            ratio = (u["step_seconds"] - u["buckets"][MATMUL]) / (lf["step_seconds"] - lf["buckets"][MATMUL])
            print(f"{w}: unift's time outside the matmuls is {ratio:.2f}x LLaMA-Factory's; whole step "
                  f"{u['step_seconds'] / lf['step_seconds']:.2f}x")


def print_top_ops(workloads: dict, count: int) -> None:
    for w, result in workloads.items():
        if "unift" not in result:
            continue
        ops = [(n, o) for n, o in result["unift"]["ops"].items() if o["bucket"] != MATMUL][:count]
        print(f"\nunift, {w}: the {count} costliest ops outside the matmuls (self time per step)")
        print(f"{'op':<58} {'ms/step':>8} {'calls/step':>10}   bucket")
        for name, o in ops:
            print(f"{name[:58]:<58} {1000 * o['self_seconds']:>8.1f} {o['calls']:>10.0f}   {o['bucket']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="alpaca-format JSON/JSONL file")
    parser.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--tools", nargs="+", choices=tuple(TOOLS), default=list(TOOLS))
    parser.add_argument("--warmup", type=int, default=2, help="steps before any is timed")
    parser.add_argument("--steps", type=int, default=3, help="steps timed plainly, then as many profiled")
    parser.add_argument("--llamafactory", type=Path, default=BENCH_DIR / "llamafactory-0.9.5",
                        help="LLaMA-Factory's virtual environment (bench/llamafactory_env.sh builds it)")
    parser.add_argument("--top", type=int, default=10, help="how many of unift's costliest non-matmul ops to list")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    if not ns.data.is_file():
        parser.error(f"--data {ns.data}: no such file")
    if ns.warmup < 1 or ns.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if "llamafactory" in ns.tools and not (ns.llamafactory / "bin" / "llamafactory-cli").is_file():
        parser.error(f"--llamafactory {ns.llamafactory}: no LLaMA-Factory there (bench/step_budget.sh builds it, "
                     "or pass --tools unift)")
    from unift.models.dtypes import cpu_bf16_flags

    bf16 = native_bf16()
    flags = ", ".join(cpu_bf16_flags()) or "neither avx512_bf16 nor amx_bf16"
    forced = os.environ.get("UNIFT_CPU_BF16", "auto")
    print(f"step-time budget; {machine()}; CPU flags: {flags}; {date.today()}")
    print(f"dtype plan: {'bf16' if bf16 else 'fp32'} compute on both sides (UNIFT_CPU_BF16={forced}); "
          f"{ns.warmup} warm-up steps, then {ns.steps} plain and {ns.steps} profiled steps per run\n")
    with tempfile.TemporaryDirectory() as tmp:
        workloads = {w: profile_workload(w, ns, Path(tmp), bf16) for w in ns.workloads}
    for w, r in workloads.items():
        print(f"{w}: {r['model']}, LoRA r=8 on every projection, cutoff {r['cutoff']}, batch {r['batch']}")
    print()
    print_table(workloads, ns.tools)
    print(f"\n'{PYTHON}': wall time no profiled event covers; '{OPTIMIZER}' and data: the whole time of their "
          "ranges; the profiler itself adds to 'profiled' over 'unprofiled'")
    print_top_ops(workloads, ns.top)
    if ns.json:
        ns.json.write_text(json.dumps({"machine": machine(), "cpu_flags": flags, "dtype": "bf16" if bf16 else "fp32",
                                       "date": str(date.today()), "workloads": workloads}, indent=1))


if __name__ == "__main__":
    main()
