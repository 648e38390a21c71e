"""GPU check (`make gpu-check`, bench/gpu_check.sh): on a CUDA machine, LoRA and QLoRA each go
train -> generate -> merge -> predict on the embedded model through unift's own commands, printing the
peak GPU memory and tokens/s of each step and the device the model sat on. Refuses on a machine without a
CUDA GPU (exit status 2).

    python bench/gpu_check.py [--steps 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFUSAL = "gpu-check: no CUDA GPU is visible on this machine (torch {torch}, CUDA build {cuda}); run it on one"
PROMPTS = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in ((12, 30), (7, 45), (23, 19), (51, 8))]


def gpu_or_refuse() -> str:
    import torch

    if not torch.cuda.is_available():
        print(REFUSAL.format(torch=torch.__version__, cuda=torch.version.cuda or "none"), file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def peak_reset() -> None:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def check(method: str, work: Path, steps: int) -> dict:
    from unift.cli import main
    from unift.inference.generator import Generator
    from unift.inference.settings import GenerationSettings

    run = work / f"{method}-run"
    peak_reset()
    started = time.perf_counter()
    assert main(["train", "--peft_type", method, "--data", "arith", "--max_steps", str(steps), "--output_dir",
                 str(run), "--per_gpu_train_batch_size", "8", "--cutoff_len", "128", "--report_to", "none",
                 "--device", "cuda", "--save_steps", "0"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"method": method, "train_s": round(time.perf_counter() - started, 1),
           "train_tokens_per_s": round(metrics["tokens_per_second"]), "train_peak_gpu_mib": round(peak_mib()),
           "final_loss": round(metrics["loss_curve"][-1]["loss"], 3)}

    peak_reset()
    generator = Generator.load(str(run), device="cuda")
    row["model_on"] = str(generator.model.device)
    row["weights"] = str(generator.model.dtype).removeprefix("torch.")
    settings = GenerationSettings(max_new_tokens=48)
    started = time.perf_counter()
    answers = generator.generate(PROMPTS, settings, batch_size=len(PROMPTS))
    seconds = time.perf_counter() - started
    row["generate_tokens_per_s"] = round(sum(a.completion_tokens for a in answers) / seconds)
    row["generate_peak_gpu_mib"] = round(peak_mib())
    row["answer"] = answers[0].text[:60]
    on_gpu = all(p.device.type == "cuda" for p in generator.model.parameters())
    del generator

    merged = work / f"{method}-merged"
    peak_reset()
    assert main(["merge", "--adapter_dir", str(run), "--merged_dir", str(merged), "--device", "cuda",
                 "--overwrite"]) == 0
    row["merge_peak_gpu_mib"] = round(peak_mib())

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": p}) + "\n" for p in PROMPTS * 8))
    peak_reset()
    started = time.perf_counter()
    assert main(["predict", "--model_name_or_path", str(merged), "--input", str(prompts), "--result_dir",
                 str(work / f"{method}-predict"), "--device", "cuda", "--max_new_tokens", "48", "--overwrite"]) == 0
    lines = (work / f"{method}-predict" / "predictions.jsonl").read_text().splitlines()
    row["predict_s"] = round(time.perf_counter() - started, 1)
    row["predict_rows"] = len(lines)
    row["predict_peak_gpu_mib"] = round(peak_mib())
    row["all_weights_on_gpu"] = on_gpu
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per method")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    name = gpu_or_refuse()
    work = Path(args.work or tempfile.mkdtemp(prefix="unift-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {name}; runs in {work}", flush=True)
    rows = [check(method, work, args.steps) for method in ("lora", "qlora")]
    for row in rows:
        print(json.dumps(row))
    failed = [r["method"] for r in rows if not (r["all_weights_on_gpu"] and r["model_on"].startswith("cuda"))]
    if failed:
        print(f"gpu-check: the model did not sit on the GPU for {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu-check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
