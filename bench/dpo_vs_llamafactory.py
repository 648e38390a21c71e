"""unift's DPO against LLaMA-Factory 0.9.5's, on the same pairs, in one run (started by
dpo_vs_llamafactory.sh, which reuses the virtual environment vs_llamafactory.sh builds).

Both sides get the same bf16-stored copy of the embedded model (fp32 compute for both where this CPU has no
native bf16), the same pairs (the bundled caps_pairs, written once in LLaMA-Factory's alpaca ranking layout,
which unift reads unchanged), LoRA r=8 on every projection, sigmoid DPO with beta 0.1, one epoch, lr 5e-6
cosine, no warm-up, batch 2, cutoff 128. The result is the median of interleaved rounds, every round shown.

Contenders, each in its own process:
- LLaMA-Factory fastest (no gradient checkpointing) and leanest (checkpointing, its default); its reference
  is the base with the adapter off, as unift's
- unift train --stage dpo with its defaults (reference: the base with the adapter off)
- unift with --ref_model BASE: a separate reference copy, for the memory the adapter-off reference saves

    bench/dpo_vs_llamafactory.sh [--pairs 16] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, measured_run, median, run_round  # noqa: E402
from fair import bf16_checkpoint, fp32_view, native_bf16, versions  # noqa: E402

LF_FAST, LF_LEAN = "LLaMA-Factory fastest (no checkpointing)", "LLaMA-Factory leanest (checkpointing)"
UNIFT, UNIFT_COPY = "unift --stage dpo (defaults)", "unift --stage dpo --ref_model BASE (a copy)"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
BATCH, CUTOFF = 2, 128


def llamafactory(venv: Path, model: Path, folder: Path, out: Path, pairs: int, bf16: bool, lean: bool) -> dict:
    config = {"stage": "dpo", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
              "lora_target": "all", "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "pairs",
              "template": "smollm2", "cutoff_len": CUTOFF, "overwrite_cache": True, "preprocessing_num_workers": 1,
              "logging_steps": 4, "save_strategy": "no", "overwrite_output_dir": True,
              "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": 5.0e-6,
              "num_train_epochs": 1.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "bf16": bf16,
              "use_cpu": True, "report_to": "none", "model_name_or_path": str(model), "dataset_dir": str(folder),
              "max_samples": pairs, "output_dir": str(out), "disable_gradient_checkpointing": not lean,
              "default_system": SYSTEM}
    path = out.with_suffix(".yaml")
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    _, peak = measured_run(str(venv / "bin" / "python"), str(venv / "bin" / "llamafactory-cli"), ["train", str(path)],
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    metrics = json.loads((out / "train_results.json").read_text())
    return {"samples_per_second": pairs / metrics["train_runtime"], "peak_rss_mib": peak,
            "train_loss": metrics["train_loss"]}


def unift(model: Path, data: Path, out: Path, dtype: str, extra: list[str]) -> dict:
    args = ["--stage", "dpo", "--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out),
            "--epochs", "1", "--per_gpu_train_batch_size", str(BATCH), "--lora_r", "8", "--lora_alpha", "16",
            "--cutoff_len", str(CUTOFF), "--learning_rate", "5e-6", "--lr_scheduler_type", "cosine",
            "--warmup_ratio", "0", "--truncation", "split", "--compute_dtype", dtype, "--pref_beta", "0.1",
            "--logging_steps", "4", "--save_steps", "100000", "--save_total_limit", "1", *extra]
    _, peak = measured_run(sys.executable, str(REPO / "uniform_finetune.py"), args)
    m = json.loads((out / "metrics.json").read_text())
    return {"samples_per_second": m["train_examples"] / m["wall_seconds"], "peak_rss_mib": peak,
            "train_loss": m["train_loss"], "pairs": m["train_examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamafactory", type=Path, required=True, help="LLaMA-Factory's virtual environment")
    parser.add_argument("--pairs", type=int, default=16, help="pairs trained (from the bundled caps_pairs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    from unift.models import embedded_model_dir

    bf16 = native_bf16()
    stored = bf16_checkpoint(embedded_model_dir())
    model = stored if bf16 else fp32_view(stored)
    dtype = "bf16" if bf16 else "fp32"
    print(f"DPO: {stored.name}, LoRA r=8 on every projection, {ns.pairs} pairs of caps_pairs, cutoff {CUTOFF}, "
          f"batch {BATCH}, beta 0.1 sigmoid, 1 epoch, no warm-up, {dtype} compute; {machine()}; {date.today()}")
    print(f"unift side:         {versions(sys.executable)}")
    print(f"LLaMA-Factory side: {versions(str(ns.llamafactory / 'bin' / 'python'))}\n")
    runs: dict[str, list[dict]] = {LF_FAST: [], LF_LEAN: [], UNIFT: [], UNIFT_COPY: []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [json.loads(line) for line in (REPO / "data" / "pairs" / "train.jsonl").read_text().splitlines()]
        ranking = [{"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]}
                   for r in rows[:ns.pairs]]
        data = folder / "pairs.json"
        data.write_text(json.dumps(ranking, ensure_ascii=False))
        (folder / "dataset_info.json").write_text(json.dumps({"pairs": {
            "file_name": data.name, "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
        jobs = {
            LF_FAST: lambda out: llamafactory(ns.llamafactory, model, folder, out, ns.pairs, bf16, False),
            LF_LEAN: lambda out: llamafactory(ns.llamafactory, model, folder, out, ns.pairs, bf16, True),
            UNIFT: lambda out: unift(model, data, out, dtype, []),
            UNIFT_COPY: lambda out: unift(model, data, out, dtype, ["--ref_model", str(model)]),
        }
        for round_ in range(ns.rounds):
            run_round(jobs, runs, round_, ns.rounds, folder)
    table = {name: {k: median([r[k] for r in rs]) for k in ("samples_per_second", "peak_rss_mib", "train_loss")}
             for name, rs in runs.items()}
    print(f"medians of {ns.rounds} interleaved rounds\n")
    print(f"{'run':<46} {'pairs/s':>8} {'peak RSS MiB':>12} {'train loss':>10}   per round (pairs/s; peak RSS MiB)")
    for name, row in table.items():
        print(f"{name:<46} {row['samples_per_second']:>8.3g} {row['peak_rss_mib']:>12.0f} {row['train_loss']:>10.4f}   "
              + ", ".join(f"{r['samples_per_second']:.3g}" for r in runs[name]) + "; "
              + ", ".join(f"{r['peak_rss_mib']:.0f}" for r in runs[name]))
    fast, lean, mine, copy = table[LF_FAST], table[LF_LEAN], table[UNIFT], table[UNIFT_COPY]
    paired = [u["samples_per_second"] / f["samples_per_second"] for u, f in zip(runs[UNIFT], runs[LF_FAST])]
    print(f"\nunift DPO speed: {mine['samples_per_second'] / fast['samples_per_second']:.2f}x LLaMA-Factory's "
          f"fastest (within each round {', '.join(f'{r:.2f}' for r in paired)}x)")
    print(f"unift DPO peak RSS: {mine['peak_rss_mib'] / lean['peak_rss_mib']:.2f}x LLaMA-Factory's leanest, "
          f"{mine['peak_rss_mib'] / fast['peak_rss_mib']:.2f}x its fastest")
    print(f"reference = base with the adapter off: {copy['peak_rss_mib'] - mine['peak_rss_mib']:.0f} MiB less peak "
          f"RSS than a separate reference copy ({mine['peak_rss_mib']:.0f} vs {copy['peak_rss_mib']:.0f} MiB)")
    if ns.json:
        ns.json.write_text(json.dumps({"dtype": dtype, "runs": runs, "table": table}, indent=2))


if __name__ == "__main__":
    main()
