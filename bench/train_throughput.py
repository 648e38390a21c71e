"""Training throughput: `unift train` against a plain transformers Trainer + PEFT baseline, same run.

The standard workload: the embedded SmolLM2-135M-Instruct, LoRA r=8 on all linear layers, 64 examples of
at most 128 tokens, batch 4, one epoch. Each contender runs in its own process so peak RSS is its own.

    .venv/bin/python bench/train_throughput.py [--examples 64] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_data(folder: Path, n: int) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/arith/train.jsonl").read_text().splitlines()[:n]]
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_unift(data: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "uniform_finetune.py"), "--data", str(data), "--output_dir", str(out),
           "--epochs", "1", "--per_gpu_train_batch_size", "4", "--lora_r", "8", "--lora_alpha", "16",
           "--cutoff_len", "128", "--logging_steps", "4", "--save_steps", "100000"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tokens_per_second": metrics["tokens_per_second"], "peak_rss_mib": metrics["peak_rss_mib"],
            "wall_seconds": metrics["wall_seconds"], "final_loss": metrics["loss_curve"][-1]["loss"],
            "dtype": metrics["compute_dtype"]}


def baseline(data: str, out: str, bf16: bool) -> None:
    """What a user writes by hand: tokenizer chat template, prompt masking, Trainer + get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from unift.models import embedded_model_dir

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for line in Path(data).read_text().splitlines():
        rec = json.loads(line)
        prompt = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]}], tokenize=False,
                                         add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]},
                                        {"role": "assistant", "content": rec["output"]}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:128]
        rows.append({"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids):]})
    seen = [0]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        seen[0] += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LINEAR,
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=3e-4, logging_steps=4, save_strategy="no", report_to="none",
                             use_cpu=not torch.cuda.is_available(), bf16=bf16, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"tokens_per_second": seen[0] / wall, "wall_seconds": wall,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "final_loss": losses[-1], "dtype": "bf16" if bf16 else "fp32"}))


def run_baseline(data: Path, out: Path, bf16: bool) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_baseline", str(data), str(out), str(int(bf16))],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--_baseline", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._baseline:
        baseline(args._baseline[0], args._baseline[1], bool(int(args._baseline[2])))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unift.models import embedded_model_dir

    embedded_model_dir()  # convert once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_data(folder, args.examples)
        results = {
            "transformers Trainer + PEFT (defaults, fp32)": run_baseline(data, folder / "b32", bf16=False),
            "transformers Trainer + PEFT (bf16=True)": run_baseline(data, folder / "b16", bf16=True),
            "unift train (defaults)": run_unift(data, folder / "unift"),
        }
    base = results["transformers Trainer + PEFT (defaults, fp32)"]
    print(f"\nworkload: embedded SmolLM2-135M-Instruct, LoRA r=8 all-linear, {args.examples} examples <=128 "
          f"tokens, batch 4, 1 epoch, {os.cpu_count()} CPU threads\n")
    print(f"{'run':<46} {'dtype':>5} {'tokens/s':>9} {'ratio':>6} {'peak RSS MiB':>13} {'final loss':>10}")
    for name, r in results.items():
        print(f"{name:<46} {r['dtype']:>5} {r['tokens_per_second']:>9.1f} "
              f"{r['tokens_per_second'] / base['tokens_per_second']:>5.2f}x {r['peak_rss_mib']:>13.0f} "
              f"{r['final_loss']:>10.3f}")


if __name__ == "__main__":
    main()
