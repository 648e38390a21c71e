"""unift against LLaMA-Factory 0.9.5, fairly, in one run (started by vs_llamafactory.sh, which builds
LLaMA-Factory's own virtual environment).

Fair means (bench/fair.py): the same checkpoint stored in bf16 for both; the same tokens trained (each side's
input and labelled tokens are counted and printed, and the run fails if they differ by more than 1%: unift
runs with --truncation split, LLaMA-Factory's rule); no warm-up on either side; the same compute dtype (bf16
where the CPU runs it natively, else fp32 for both, said in the output); the library versions of both
sides printed; the result is the median of interleaved rounds (at least 3), every round shown.

Contenders, each in its own process:
- LLaMA-Factory fastest: use_cpu, disable_gradient_checkpointing (bf16 where native)
- LLaMA-Factory leanest: the same with gradient checkpointing (its default)
- unift train with its defaults
- with --reference (standard workload): unift with --lora_dropout 0, LLaMA-Factory's default (unift keeps
  the original toolkit's 0.05); the targets are about unift's defaults
Workloads (LoRA r=8 on every linear projection, one epoch, lr 1e-4 cosine, no evaluation or checkpoint):
- standard: the embedded SmolLM2-135M-Instruct, the first 64 records of an alpaca-format file, cutoff 128,
  batch 4
- scale: a random decoder of SmolLM2-360M's shape, records made longer than the cutoff from the same file
  (each row 512 tokens), cutoff 512, batch 2, 16 records by default
samples/s is records / training time (LLaMA-Factory: its Trainer's train_runtime; unift: the time around
trainer.train(), slightly longer); tokens/s is samples/s x that side's input tokens per record.

    bench/vs_llamafactory.sh --data FILE.json [--workload standard|scale] [--rounds 3] [--examples N] [--reference]
        [--json OUT]
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
    read_records,
    run_round,
    write_workload,
)
from fair import (  # noqa: E402
    bf16_checkpoint,
    fp32_view,
    llamafactory_counts,
    native_bf16,
    scale_checkpoint,
    versions,
    write_long_records,
)

WORKLOADS = {"standard": {"examples": 64, "cutoff": 128, "batch": 4},
             "scale": {"examples": 16, "cutoff": 512, "batch": 2}}
LF_FAST, LF_LEAN, UNIFT, UNIFT_ALIKE = ("LLaMA-Factory fastest (no checkpointing)",
                                       "LLaMA-Factory leanest (checkpointing)", "unift train (defaults)",
                                       "unift train --lora_dropout 0 (as LLaMA-Factory)")
TOLERANCE = 0.01  # the most the two sides' token counts may differ
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def llamafactory_config(model: Path, data_dir: Path, out: Path, w: dict, bf16: bool, lean: bool) -> dict:
    return {"stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
            "lora_target": "all", "dataset": "workload", "template": "smollm2", "cutoff_len": w["cutoff"],
            "overwrite_cache": True, "preprocessing_num_workers": 1, "logging_steps": 4, "save_strategy": "no",
            "overwrite_output_dir": True, "per_device_train_batch_size": w["batch"],
            "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "num_train_epochs": 1.0,
            "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "bf16": bf16, "use_cpu": True, "report_to": "none",
            "model_name_or_path": str(model), "dataset_dir": str(data_dir), "max_samples": w["examples"],
            "output_dir": str(out), "disable_gradient_checkpointing": not lean,
            # the checkpoint's own chat template's system prompt, which unift renders: LLaMA-Factory's smollm2
            # template ends it with a period, one token more in every record
            "default_system": SYSTEM}


def llamafactory(venv: Path, config: dict, preload: str | None = None) -> dict:
    out = Path(config["output_dir"])
    path = out.with_suffix(".yaml")
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    _, peak = measured_run(str(venv / "bin" / "python"), str(venv / "bin" / "llamafactory-cli"), ["train", str(path)],
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
                                **({"LD_PRELOAD": preload} if preload else {})})
    metrics = json.loads((out / "train_results.json").read_text())
    # the Trainer rounds samples/s to 3 decimals, too coarse for the scale workload on a CPU (0.009/s)
    return {"samples_per_second": config["max_samples"] / metrics["train_runtime"], "peak_rss_mib": peak,
            "train_loss": metrics["train_loss"]}


def unift_args(model: Path, data: Path, out: Path, w: dict, dtype: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out), "--epochs", "1",
            "--per_gpu_train_batch_size", str(w["batch"]), "--lora_r", "8", "--lora_alpha", "16",
            "--cutoff_len", str(w["cutoff"]), "--learning_rate", "1e-4", "--lr_scheduler_type", "cosine",
            "--warmup_ratio", "0", "--truncation", "split", "--compute_dtype", dtype, "--logging_steps", "4",
            "--save_steps", "100000", "--save_total_limit", "1"]


def unift(args: list[str]) -> dict:
    out = Path(args[args.index("--output_dir") + 1])
    _, peak = measured_run(sys.executable, str(REPO / "uniform_finetune.py"), args)
    m = json.loads((out / "metrics.json").read_text())
    # from the time around trainer.train() (a little more than the Trainer's own train_runtime, which
    # LLaMA-Factory's figure uses: the rounding favours LLaMA-Factory, if anything)
    return {"samples_per_second": m["train_examples"] / m["wall_seconds"], "peak_rss_mib": peak,
            "train_loss": m["train_loss"],
            "examples": m["train_examples"], "tokens": m["tokens_seen"], "labelled": m["tokens_trained"],
            "base_parameters": m["total_parameters"] - m["trainable_parameters"]}


def check_tokens(lf: dict, ours: dict) -> None:
    print(f"{'tokens trained (one epoch)':<28} {'records':>8} {'input tokens':>13} {'labelled tokens':>16}")
    for name, c in (("LLaMA-Factory", lf), ("unift", ours)):
        print(f"{name:<28} {c['examples']:>8} {c['tokens']:>13,} {c['labelled']:>16,}")
    for key in ("examples", "tokens", "labelled"):
        gap = abs(ours[key] - lf[key]) / max(lf[key], 1)
        if gap > TOLERANCE:
            raise SystemExit(f"unfair: {key} differ by {100 * gap:.1f}% (> {100 * TOLERANCE:.0f}%): "
                             f"LLaMA-Factory {lf[key]}, unift {ours[key]}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamafactory", type=Path, required=True, help="LLaMA-Factory's virtual environment")
    parser.add_argument("--data", type=Path, required=True, help="alpaca-format JSON/JSONL file")
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="standard")
    parser.add_argument("--examples", type=int, help="records trained (default: 64 standard, 16 scale)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true",
                        help="standard workload: also unift with --lora_dropout 0 (LLaMA-Factory's dropout)")
    parser.add_argument("--same_allocator", action="store_true",
                        help="give LLaMA-Factory the malloc library unift runs on (jemalloc, where found) too")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    from unift.models import embedded_model_dir

    w = dict(WORKLOADS[ns.workload])
    w["examples"] = ns.examples or w["examples"]
    bf16 = native_bf16()
    stored = scale_checkpoint(embedded_model_dir()) if ns.workload == "scale" else bf16_checkpoint(embedded_model_dir())
    model = stored if bf16 else fp32_view(stored)
    dtype = "bf16" if bf16 else "fp32"
    lf_python = str(ns.llamafactory / "bin" / "python")
    print(f"{ns.workload} workload: {stored.name}, LoRA r=8 on every projection, {w['examples']} records of "
          f"{ns.data.name}, cutoff {w['cutoff']}, batch {w['batch']}, 1 epoch, no warm-up; {machine()}; {date.today()}")
    print("compute: " + ("bf16 on both sides (this CPU runs bf16 natively)" if bf16 else
                         "fp32 on both sides, from the same bf16-stored weights: this CPU has no AVX512-BF16/AMX, "
                         "bf16 would be emulated (LLaMA-Factory's bf16 runs take 13+ minutes here)"))
    print(f"unift side:         {versions(sys.executable)}")
    print(f"LLaMA-Factory side: {versions(lf_python)}")
    from unift.allocator import wanted_library

    malloc = wanted_library()
    preload = malloc if ns.same_allocator else None
    print(f"memory allocator: unift {malloc or 'glibc (no jemalloc found)'}; LLaMA-Factory "
          f"{preload or 'glibc (its default)'}\n")
    if ns.rounds < 3:
        print(f"NOTE: {ns.rounds} round(s) only; the targets are read from medians of at least 3\n")

    runs: dict[str, list[dict]] = {LF_FAST: [], LF_LEAN: [], UNIFT: []}
    if ns.reference and ns.workload == "standard":
        runs[UNIFT_ALIKE] = []
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if ns.workload == "scale":
            data = write_long_records(read_records(ns.data), w["examples"], 4 * w["cutoff"] * 4, folder)
        else:
            data = write_workload(ns.data, w["examples"], folder)
        (folder / "dataset_info.json").write_text(json.dumps({"workload": {"file_name": data.name}}))
        lf_counts = llamafactory_counts(ns.llamafactory, llamafactory_config(model, folder, folder / "c", w, bf16,
                                                                             False), folder)
        jobs = {
            LF_FAST: lambda out: llamafactory(ns.llamafactory, llamafactory_config(model, folder, out, w, bf16, False),
                                              preload),
            LF_LEAN: lambda out: llamafactory(ns.llamafactory, llamafactory_config(model, folder, out, w, bf16, True),
                                              preload),
            UNIFT: lambda out: unift(unift_args(model, data, out, w, dtype)),
            UNIFT_ALIKE: lambda out: unift([*unift_args(model, data, out, w, dtype), "--lora_dropout", "0"]),
        }
        def check_once(name: str) -> None:  # fail before spending the other rounds on an unfair race
            if name == UNIFT and len(runs[UNIFT]) == 1:
                check_tokens(lf_counts, runs[UNIFT][0])

        for round_ in range(ns.rounds):
            peaks.append(matmul_peak_gflops(dtype))
            run_round(jobs, runs, round_, ns.rounds, folder, after=check_once)
        peaks.append(matmul_peak_gflops(dtype))
    per_record = {LF_FAST: lf_counts["tokens"] / lf_counts["examples"], LF_LEAN: lf_counts["tokens"] / lf_counts["examples"]}
    ours = runs[UNIFT][0]
    per_record.update({n: ours["tokens"] / ours["examples"] for n in runs if n.startswith("unift")})
    table = {name: {k: median([r[k] for r in rs]) for k in ("samples_per_second", "peak_rss_mib", "train_loss")}
             for name, rs in runs.items()}
    for name, row in table.items():
        row["tokens_per_second"] = row["samples_per_second"] * per_record[name]
    peak = median(peaks)
    print(f"medians of {ns.rounds} interleaved rounds; {dtype} matmul peak in this run {peak:.0f} GFLOP/s "
          f"(min {min(peaks):.0f}, max {max(peaks):.0f})\n")
    if max(peaks) > 1.2 * min(peaks):
        # measured 2026-12-02/03: a saturated machine read 2.13x where a quiet one read 0.98x
        print("WARNING: the machine's matmul peak moved by more than 20% during the run: something else is "
              "using the cores, and the speed ratios below are not the ones a quiet machine gives\n")
    print(f"{'run':<48} {'samples/s':>9} {'tokens/s':>9} {'peak RSS MiB':>12} {'train loss':>10}   "
          "per round (samples/s; peak RSS MiB)")
    for name, row in table.items():
        rounds = ", ".join(f"{r['samples_per_second']:.3g}" for r in runs[name])
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in runs[name])
        print(f"{name:<48} {row['samples_per_second']:>9.3g} {row['tokens_per_second']:>9.3g} "
              f"{row['peak_rss_mib']:>12.0f} {row['train_loss']:>10.4f}   {rounds}; {rss}")
    fast, lean, mine = table[LF_FAST], table[LF_LEAN], table[UNIFT]
    # Rounds run minutes apart on a machine whose speed drifts: the ratio within each round pairs runs made
    # close together, so its median is a second, steadier reading of the same figure.
    paired = [u["samples_per_second"] / f["samples_per_second"] for u, f in zip(runs[UNIFT], runs[LF_FAST])]
    print(f"\nunift speed: {mine['samples_per_second'] / fast['samples_per_second']:.2f}x LLaMA-Factory's fastest "
          f"(target >= 2.0x); within each round {', '.join(f'{r:.2f}' for r in paired)}x, "
          f"median {median(paired):.2f}x")
    print(f"unift peak RSS: {mine['peak_rss_mib'] / lean['peak_rss_mib']:.2f}x LLaMA-Factory's leanest "
          f"(target <= 0.8x); {mine['peak_rss_mib'] / fast['peak_rss_mib']:.2f}x its fastest")
    if UNIFT_ALIKE in table:
        alike = table[UNIFT_ALIKE]
        print(f"unift with LLaMA-Factory's LoRA dropout (0): {alike['samples_per_second'] / fast['samples_per_second']:.2f}x "
              f"its fastest, at {alike['peak_rss_mib'] / lean['peak_rss_mib']:.2f}x its leanest's peak RSS")
    share = mine["tokens_per_second"] * 4 * ours["base_parameters"] / (peak * 1e9)
    print(f"unift efficiency: {mine['tokens_per_second']:.0f} input tokens/s x 4 x {ours['base_parameters']:,} "
          f"parameters = {100 * share:.0f}% of the {dtype} matmul peak")
    if ns.json:
        ns.json.write_text(json.dumps({"workload": ns.workload, "dtype": dtype, "peak_gflops": peaks, "runs": runs,
                                       "table": table, "token_counts": {"llamafactory": lf_counts},
                                       "speed_ratio_per_round": paired}, indent=2))


if __name__ == "__main__":
    main()
