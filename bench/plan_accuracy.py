"""How near `unift train --plan` comes to the run it plans: for each configuration, the plan (its own
process), then the run itself (another process, a few more steps), and a markdown table of predicted
against measured peak RSS and time per step (the whole run's time over its steps, the first included, on
both sides: the plan predicts the first step as long as its probe's and the rest at its steady time).

    python bench/plan_accuracy.py [--steps 16] [--only NAME ...]

docs/plan.md keeps the table of the last run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> flags (the embedded SmolLM2-135M-Instruct on the bundled arithmetic task)
CONFIGS = {
    "lora-bf16": ["--config", "configs/arith_lora.yaml"],
    "lora-fp32": ["--config", "configs/arith_lora.yaml", "--compute_dtype", "fp32"],
    "full-fp32": ["--peft_type", "full", "--template", "chatml", "--per_gpu_train_batch_size", "4",
                  "--cutoff_len", "256", "--compute_dtype", "fp32", "--learning_rate", "1e-5"],
    "lora-checkpointing-b16": ["--config", "configs/arith_lora.yaml", "--per_gpu_train_batch_size", "16",
                               "--gradient_checkpointing"],
}


def unift(flags: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "unift", "train", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"unift train {' '.join(flags)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of each real run")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="these configurations only")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as folder:
        for name in options.only or CONFIGS:
            out = Path(folder) / name
            flags = [*CONFIGS[name], "--max_steps", str(options.steps), "--output_dir", str(out),
                     "--save_steps", "100000", "--logging_steps", "100"]
            unift([*flags, "--plan", "--plan_json", str(out) + ".plan.json"])
            plan = json.loads(Path(str(out) + ".plan.json").read_text())
            unift(flags)
            metrics = json.loads((out / "metrics.json").read_text())
            step = metrics["wall_seconds"] / metrics["global_steps"]
            peak = metrics["peak_rss_mib"]
            # the whole run (its first step, as long as the probe's, then the steady time per step) over its
            # steps, against the run's wall time over its steps: the same span on both sides
            row = (name, plan["estimate"]["peak_mib"], plan["predicted_peak_mib"], peak,
                   plan["train_seconds"] / metrics["global_steps"], step)
            rows.append(row)
            print(json.dumps({"config": name, "estimate_mib": row[1], "predicted_mib": row[2], "measured_mib": peak,
                              "predicted_s": row[4], "measured_s": step}), flush=True)
    print("\n| config | estimated peak RSS (no probe) | predicted peak RSS | measured | error | "
          "predicted s/step (the whole run's) | measured | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, estimate, predicted, peak, per_step, step in rows:
        print(f"| {name} | {estimate:,.0f} MiB ({estimate / peak - 1:+.0%}) | {predicted:,.0f} MiB | {peak:,.0f} MiB | "
              f"{predicted / peak - 1:+.1%} | {per_step:.2f} | {step:.2f} | {per_step / step - 1:+.1%} |")


if __name__ == "__main__":
    main()
