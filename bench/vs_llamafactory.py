"""unift against LLaMA-Factory 0.9.5 on the standard workload, in one run (started by vs_llamafactory.sh,
which builds LLaMA-Factory's own virtual environment).

Contenders, each in its own process, in interleaved rounds (figures are medians over the rounds):
- LLaMA-Factory fastest: bf16 + use_cpu + disable_gradient_checkpointing
- LLaMA-Factory leanest: the same with gradient checkpointing (its default)
- unift train with its defaults
- unift train with --lora_dropout 0, LLaMA-Factory's default (unift keeps the original toolkit's 0.05):
  the same training set-up on both sides, for reference; the targets are about unift's defaults
Workload: the embedded SmolLM2-135M-Instruct (the same converted folder for both), LoRA r=8 on all linear
projections, the first 64 records of an alpaca-format file, cutoff 128, batch 4, one epoch, lr 1e-4,
no evaluation, no checkpoint in between. samples/s is the Trainer's train_samples_per_second for both.

    bench/vs_llamafactory.sh --data FILE.json [--rounds 3] [--examples 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    machine,
    matmul_peak_gflops,
    measured_run,
    median,
    standard_train_args,
    write_workload,
)

LF_COMMON = {
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
    "lora_target": "all", "dataset": "workload", "template": "smollm2", "cutoff_len": 128,
    "overwrite_cache": True, "preprocessing_num_workers": 1, "logging_steps": 4, "save_strategy": "no",
    "overwrite_output_dir": True, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-4, "num_train_epochs": 1.0, "lr_scheduler_type": "cosine", "bf16": True,
    "use_cpu": True, "report_to": "none",
}


def llamafactory(venv: Path, model: Path, data_dir: Path, out: Path, examples: int, lean: bool) -> dict:
    config = {**LF_COMMON, "model_name_or_path": str(model), "dataset_dir": str(data_dir), "max_samples": examples,
              "output_dir": str(out), "disable_gradient_checkpointing": not lean}
    path = out.with_suffix(".yaml")
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    _, peak = measured_run(str(venv / "bin" / "python"), str(venv / "bin" / "llamafactory-cli"), ["train", str(path)],
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    metrics = json.loads((out / "train_results.json").read_text())
    return {"samples_per_second": metrics["train_samples_per_second"], "peak_rss_mib": peak,
            "train_loss": metrics["train_loss"]}


def unift(data: Path, out: Path, *extra: str) -> dict:
    args = [*extra, *standard_train_args(data, out)]
    _, peak = measured_run(sys.executable, str(REPO / "uniform_finetune.py"), args)
    m = json.loads((out / "metrics.json").read_text())
    return {"samples_per_second": m["samples_per_second"], "peak_rss_mib": peak, "train_loss": m["train_loss"],
            "tokens_per_second": m["tokens_per_second"],
            "base_parameters": m["total_parameters"] - m["trainable_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamafactory", type=Path, required=True, help="LLaMA-Factory's virtual environment")
    parser.add_argument("--data", type=Path, required=True, help="alpaca-format JSON/JSONL file")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    from unift.models import embedded_model_dir

    model = embedded_model_dir()
    runs: dict[str, list[dict]] = {"LLaMA-Factory fastest (bf16, no checkpointing)": [],
                                   "LLaMA-Factory leanest (bf16, checkpointing)": [], "unift train (defaults)": [],
                                   "unift train --lora_dropout 0 (as LLaMA-Factory)": []}
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_workload(ns.data, ns.examples, folder)
        (folder / "dataset_info.json").write_text(json.dumps({"workload": {"file_name": data.name}}))
        jobs = {
            "LLaMA-Factory fastest (bf16, no checkpointing)":
                lambda out: llamafactory(ns.llamafactory, model, folder, out, ns.examples, lean=False),
            "LLaMA-Factory leanest (bf16, checkpointing)":
                lambda out: llamafactory(ns.llamafactory, model, folder, out, ns.examples, lean=True),
            "unift train (defaults)": lambda out: unift(data, out),
            "unift train --lora_dropout 0 (as LLaMA-Factory)": lambda out: unift(data, out, "--lora_dropout", "0"),
        }
        for round_ in range(ns.rounds):
            peaks.append(matmul_peak_gflops())
            names = list(jobs) if round_ % 2 == 0 else list(jobs)[::-1]
            for i, name in enumerate(names):
                print(f"round {round_ + 1}/{ns.rounds}: {name}", file=sys.stderr, flush=True)
                runs[name].append(jobs[name](folder / f"run{round_}-{i}"))
        peaks.append(matmul_peak_gflops())
    table = {name: {k: median([r[k] for r in rs]) for k in ("samples_per_second", "peak_rss_mib", "train_loss")}
             for name, rs in runs.items()}
    fast, lean, ours, alike = (table[n] for n in runs)
    peak = median(peaks)
    print(f"\nstandard workload: SmolLM2-135M-Instruct, LoRA r=8 on 7 projections, first {ns.examples} records of "
          f"{ns.data.name}, cutoff 128, batch 4, 1 epoch; {machine()}; {date.today()}")
    print(f"medians of {ns.rounds} interleaved rounds; bf16 matmul peak in this run {peak:.0f} GFLOP/s "
          f"(min {min(peaks):.0f}, max {max(peaks):.0f})\n")
    print(f"{'run':<50} {'samples/s':>9} {'peak RSS MiB':>12} {'train loss':>10}   per round (samples/s)")
    for name, row in table.items():
        rounds = ", ".join(f"{r['samples_per_second']:.2f}" for r in runs[name])
        print(f"{name:<50} {row['samples_per_second']:>9.2f} {row['peak_rss_mib']:>12.0f} {row['train_loss']:>10.4f}"
              f"   {rounds}")
    tokens = median([r["tokens_per_second"] for r in runs["unift train (defaults)"]])
    share = tokens * 4 * runs["unift train (defaults)"][0]["base_parameters"] / (peak * 1e9)
    # Rounds run minutes apart on a machine whose speed drifts: the ratio within each round pairs runs made
    # close together, so its median is a second, steadier reading of the same figure.
    paired = [u["samples_per_second"] / f["samples_per_second"]
              for u, f in zip(runs["unift train (defaults)"], runs["LLaMA-Factory fastest (bf16, no checkpointing)"])]
    print(f"\nunift speed: {ours['samples_per_second'] / fast['samples_per_second']:.2f}x LLaMA-Factory's fastest "
          f"(target >= 1.5x); within each round {', '.join(f'{r:.2f}' for r in paired)}x, "
          f"median {median(paired):.2f}x")
    print(f"unift with LLaMA-Factory's LoRA dropout (0): {alike['samples_per_second'] / fast['samples_per_second']:.2f}x "
          f"its fastest, at {alike['peak_rss_mib'] / lean['peak_rss_mib']:.2f}x its leanest's peak RSS")
    print(f"unift peak RSS: {ours['peak_rss_mib'] / lean['peak_rss_mib']:.2f}x LLaMA-Factory's leanest "
          f"(target <= 1.0x)")
    print(f"unift efficiency: {tokens:.0f} non-pad tokens/s x 4 x {runs['unift train (defaults)'][0]['base_parameters']:,}"
          f" parameters = {100 * share:.0f}% of the bf16 matmul peak")
    if ns.json:
        ns.json.write_text(json.dumps({"peak_gflops": peaks, "runs": runs, "table": table,
                                       "speed_ratio_per_round": paired}, indent=2))


if __name__ == "__main__":
    main()
