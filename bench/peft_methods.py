"""Every PEFT method on the same work, like the original toolkit's comparison table.

Each method fine-tunes the embedded SmolLM2-135M-Instruct on the bundled `arith` data for the same number
of optimizer steps (same batch, data order and seed) through the real `unift train` command, then is scored
by exact match on held-out `arith_test` problems (greedy). Each method runs in its own process so peak RSS
is its own. Prints one Markdown table: trainable parameters, training tokens/s (non-padding tokens), peak
RSS, first and final logged loss, held-out exact match, plus the untuned base model's exact match.

    .venv/bin/python bench/peft_methods.py [--steps 40] [--batch 8] [--eval_samples 50]
                                           [--methods lora,dora,...] [--update-readme] [--json out.json]

Learning rates differ by method (one rate does not suit prompt tuning and LoRA alike); the table shows
the settings each method ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

START, END = "<!-- peft-bench:start -->", "<!-- peft-bench:end -->"

# Per-method flags: the usual learning rate for each kind of method, otherwise unift's defaults.
SETTINGS: dict[str, list[str]] = {
    "lora": ["--learning_rate", "1e-3"],
    "dora": ["--learning_rate", "1e-3"],
    "qlora": ["--learning_rate", "1e-3"],
    "adalora": ["--learning_rate", "1e-3"],
    "prefix": ["--learning_rate", "1e-2"],
    "p-tuning": ["--learning_rate", "1e-2"],
    "prompt": ["--learning_rate", "3e-2"],
    "ia3": ["--learning_rate", "1e-2"],
    "loha": ["--learning_rate", "1e-3"],
    "lokr": ["--learning_rate", "1e-3"],
    "oft": ["--learning_rate", "1e-3"],
    "vera": ["--learning_rate", "1e-2"],
    "adapters": ["--learning_rate", "1e-3", "--bottleneck_size", "64"],
}


def child(method: str, ns: argparse.Namespace) -> dict:
    """Train and score one method in this process; return its figures."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from unift.cli import main

    out = Path(ns.work) / method
    argv = ["train", "--peft_type", method, "--data", "arith", "--max_steps", str(ns.steps),
            "--per_gpu_train_batch_size", str(ns.batch), "--cutoff_len", "128", "--logging_steps", "1",
            "--save_steps", str(10 * ns.steps), "--warmup_ratio", "0.05", "--seed", "42",
            "--output_dir", str(out), *SETTINGS.get(method, [])]
    started = time.perf_counter()
    code = main(argv)
    if code not in (0, None):
        return {"method": method, "error": f"train exited {code}"}
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [point["loss"] for point in metrics["loss_curve"]]
    tail = curve[-min(5, len(curve)):]  # one batch is noisy: the final loss is the mean of the last 5 steps
    held_out = held_out_figures(str(out), ns)
    return {
        "method": method, "settings": " ".join(SETTINGS.get(method, [])),
        "trainable": metrics["trainable_parameters"], "total": metrics["total_parameters"],
        "tokens_per_second": metrics["tokens_per_second"], "peak_rss_mib": metrics["peak_rss_mib"],
        "first_loss": curve[0], "final_loss": sum(tail) / len(tail),
        **held_out,
        "compute_dtype": metrics.get("compute_dtype"), "train_seconds": metrics["wall_seconds"],
        "seconds": time.perf_counter() - started,
    }


def held_out_figures(run: str | None, ns: argparse.Namespace) -> dict:
    """Exact match of greedy answers and perplexity of the reference answers on `arith_test`."""
    from unift.evals.evaluate import EvalOptions, evaluate

    # new tokens: unift eval's default, room for the longest reference answer
    options = EvalOptions(data=["arith_test"], metrics=("em", "ppl"), max_samples=ns.eval_samples, show=0)
    document = evaluate(run, options, output=str(Path(ns.work) / f"eval-{Path(run or 'base').name}.json"))
    figures = document["setups"][-1]["tasks"]["arith_test"]
    return {"exact_match": figures["exact_match"], "eval_total": figures["examples"],
            "perplexity": figures["perplexity"]}


def base_exact_match(ns: argparse.Namespace) -> dict:
    return {"method": "base", **held_out_figures(None, ns)}


def machine(threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    threads = threads or torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch thread(s) per run"


def table(rows: list[dict], ns: argparse.Namespace, command: str) -> str:
    base = next((r for r in rows if r["method"] == "base"), None)
    lines = [
        "| peft_type | settings | trainable params | tokens/s | peak RSS (MiB) | first loss | final loss* "
        "| held-out perplexity | exact match |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["method"] == "base":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | | | | | |")
            continue
        share = 100 * r["trainable"] / r["total"]
        lines.append(
            f"| {r['method']} | `{r['settings']}` | {r['trainable']:,} ({share:.2f}%) | {r['tokens_per_second']:.0f} "
            f"| {r['peak_rss_mib']:.0f} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | {r['perplexity']:.3f} "
            f"| {100 * r['exact_match']:.0f}% ({round(r['exact_match'] * r['eval_total'])}/{r['eval_total']}) |"
        )
    dtype = next((r.get("compute_dtype") for r in rows if r.get("compute_dtype")), "?")
    notes = [
        "",
        "*final loss: mean of the last 5 steps' losses (one batch of 8 is noisy).",
        f"Measured {date.today().isoformat()} on {machine(getattr(ns, 'threads', None))}; compute dtype {dtype}. Command: `{command}`.",
        f"Each method: {ns.steps} optimizer steps of {ns.batch} `arith` examples (<= 128 tokens, same order and "
        f"seed), unift's defaults otherwise (LoRA family r=8, alpha=16, every linear layer; 20 virtual tokens); "
        f"exact match = greedy answer on the first {ns.eval_samples} `arith_test` problems; held-out perplexity = "
        f"mean over those problems of exp(mean NLL of the reference answer's tokens) (`unift eval`)."
        + (f" The untuned base model scores {100 * base['exact_match']:.0f}%." if base else ""),
        "The machine's 2 cores were shared with other work while this ran, so tokens/s are indicative only; "
        "the losses and exact matches do not depend on it. QLoRA's 4-bit base saves little at 135M parameters "
        "on a CPU (see its peak RSS); it exists for large models on GPUs. A short run like this ranks how fast each method "
        "starts to learn, not where it ends.",
    ]
    if any(r["method"] == "adalora" for r in rows):
        notes.append("AdaLoRA's logged loss includes its orthogonality penalty (0.5 x mean ||AA^T - I||, PEFT's "
                     "default), hence its higher first loss; its singular values start at zero, so it moves slowly at "
                     "this learning rate.")
    return "\n".join(lines + notes)


def update_readme(text: str) -> None:
    from unift.peft.support import replace_between

    replace_between(REPO / "README.md", START, END, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval_samples", type=int, default=50)
    parser.add_argument("--methods", help="comma-separated (default: every registered method)")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's, = cores); 1 "
                        "avoids oversubscribing cores that other processes are using")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")

    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    if ns.child:
        figures = base_exact_match(ns) if ns.child == "base" else child(ns.child, ns)
        Path(ns.work, f"{ns.child}.json").write_text(json.dumps(figures))
        return 0

    from unift.peft import method_names

    methods = ns.methods.split(",") if ns.methods else method_names()
    work = tempfile.mkdtemp(prefix="unift-bench-peft-")
    rows = []
    for method in ["base", *methods]:
        argv = [sys.executable, __file__, "--child", method, "--work", work, "--steps", str(ns.steps),
                "--batch", str(ns.batch), "--eval_samples", str(ns.eval_samples)]
        if ns.threads:
            argv += ["--threads", str(ns.threads)]
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        result = Path(work, f"{method}.json")
        if done.returncode != 0 or not result.exists():
            rows.append({"method": method, "error": f"failed: {done.stderr.strip().splitlines()[-1:]}"})
        else:
            rows.append(json.loads(result.read_text()))
        print(f"[bench] {method}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    command = "python bench/peft_methods.py " + " ".join(a for a in sys.argv[1:] if a != "--update-readme")
    text = table(rows, ns, command.strip())
    print(text)
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))
    if ns.update_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
