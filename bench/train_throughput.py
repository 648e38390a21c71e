"""Training throughput on the standard workload: `unift train` with its defaults beside a hand-written
transformers Trainer + PEFT baseline (fp32, and with bf16=True), all in one run.

The standard workload: the embedded SmolLM2-135M-Instruct, LoRA r=8 (alpha 16, dropout 0.05) on all seven
linear projections, the first 64 records of an alpaca-format file, cutoff 128 tokens, batch 4, one epoch,
learning rate 1e-4, no evaluation, no checkpoint in between. Every contender runs in its own process
(peak RSS is its own), in interleaved rounds; figures are medians over the rounds. The bf16 matmul peak
of the machine is measured between the runs, and each run's token rate is shown as a share of it
(LoRA training costs about 4 x parameters FLOP per token: forward, and backward to the activations).

    python bench/train_throughput.py --data FILE.json [--examples 64] [--rounds 3] [--levers] [--json OUT]

--levers adds unift with `--optimizations` none, then each speed-up added in turn (the table in
docs/performance.md). Without --data the bundled arithmetic problems are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --levers: each speed-up added to the ones before it (the order of docs/performance.md's table)
LEVERS = ["none", "base_dtype", "base_dtype,fast_dropout", "base_dtype,fast_dropout,label_loss",
          "base_dtype,fast_dropout,label_loss,cpu_attention",
          "base_dtype,fast_dropout,label_loss,cpu_attention,padding_free",
          "base_dtype,fast_dropout,label_loss,cpu_attention,padding_free,lean_layers", "all"]


def unift_contender(data: Path, out: Path, optimizations: str | None) -> dict:
    args = standard_train_args(data, out)
    if optimizations:
        args += ["--optimizations", optimizations]
    _, peak = measured_run(sys.executable, str(REPO / "uniform_finetune.py"), args)
    m = json.loads((out / "metrics.json").read_text())
    return {"samples_per_second": m["samples_per_second"], "tokens_per_second": m["tokens_per_second"],
            "trained_tokens_per_second": m["tokens_trained"] / m["wall_seconds"], "peak_rss_mib": peak,
            "train_loss": m["train_loss"], "dtype": m["compute_dtype"],
            "base_parameters": m["total_parameters"] - m["trainable_parameters"]}


def baseline(data: str, out: str, bf16: bool) -> None:
    """What a user writes by hand: the tokenizer's chat template, prompt masking, Trainer + get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from unift.models import embedded_model_dir

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for rec in json.loads(Path(data).read_text(encoding="utf-8")):
        user = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": user},
                                        {"role": "assistant", "content": rec["output"]}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:128]
        rows.append({"input_ids": ids, "labels": ([-100] * len(p_ids) + ids[len(p_ids):])[:len(ids)]})
    seen = [0, 0]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        seen[0] += int(mask.sum())
        seen[1] += int((labels[:, 1:] != -100).sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LINEAR,
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=1,
                              learning_rate=1e-4, lr_scheduler_type="cosine", logging_steps=4,
                              save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                              bf16=bf16, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "samples_per_second": result.metrics["train_samples_per_second"], "tokens_per_second": seen[0] / wall,
        "trained_tokens_per_second": seen[1] / wall, "train_loss": result.training_loss,
        "dtype": "bf16" if bf16 else "fp32", "base_parameters": sum(p.numel() for p in model.parameters()
                                                                     if not p.requires_grad)}))


def baseline_contender(data: Path, out: Path, bf16: bool) -> dict:
    text, peak = measured_run(sys.executable, __file__, ["--_baseline", str(data), str(out), str(int(bf16))])
    line = next(x for x in text.splitlines()[::-1] if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "arith" / "train.jsonl",
                        help="alpaca-format JSON/JSONL file (default: the bundled arithmetic problems)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levers", action="store_true", help="also unift with each speed-up added in turn")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_baseline", nargs=3, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns._baseline:
        baseline(ns._baseline[0], ns._baseline[1], bool(int(ns._baseline[2])))
        return
    from unift.models import embedded_model_dir

    embedded_model_dir()  # converted once, outside the timings
    contenders = {
        "Trainer + PEFT, fp32 (transformers' defaults)": lambda d, o: baseline_contender(d, o, bf16=False),
        "Trainer + PEFT, bf16=True": lambda d, o: baseline_contender(d, o, bf16=True),
    }
    for lever in (LEVERS if ns.levers else []):
        contenders[f"unift --optimizations {lever}"] = lambda d, o, lv=lever: unift_contender(d, o, lv)
    contenders["unift train (defaults)"] = lambda d, o: unift_contender(d, o, None)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_workload(ns.data, ns.examples, folder)
        for round_ in range(ns.rounds):
            peaks.append(matmul_peak_gflops())
            names = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
            for i, name in enumerate(names):
                print(f"round {round_ + 1}/{ns.rounds}: {name}", file=sys.stderr, flush=True)
                runs[name].append(contenders[name](data, folder / f"run{round_}-{i}"))
        peaks.append(matmul_peak_gflops())
    peak = median(peaks)
    base = median([r["samples_per_second"] for r in runs[next(iter(runs))]])
    print(f"\nworkload: embedded SmolLM2-135M-Instruct, LoRA r=8 on 7 projections, first {ns.examples} records of "
          f"{ns.data.name}, cutoff 128, batch 4, 1 epoch; {machine()}; {date.today()}")
    print(f"medians of {ns.rounds} interleaved rounds; bf16 matmul peak measured in this run: {peak:.0f} GFLOP/s "
          f"(min {min(peaks):.0f}, max {max(peaks):.0f})\n")
    header = (f"{'run':<62} {'dtype':>5} {'samples/s':>9} {'ratio':>6} {'tokens/s':>8} {'of peak':>7} "
              f"{'peak RSS MiB':>12} {'train loss':>10}")
    print(header)
    table = {}
    for name, results in runs.items():
        row = {key: median([r[key] for r in results]) for key in
               ("samples_per_second", "tokens_per_second", "trained_tokens_per_second", "peak_rss_mib", "train_loss")}
        params = results[0]["base_parameters"]
        row["share_of_peak"] = row["tokens_per_second"] * 4 * params / (peak * 1e9)
        row["dtype"] = results[0]["dtype"]
        table[name] = row
        print(f"{name:<62} {row['dtype']:>5} {row['samples_per_second']:>9.2f} "
              f"{row['samples_per_second'] / base:>5.2f}x {row['tokens_per_second']:>8.0f} "
              f"{100 * row['share_of_peak']:>6.1f}% {row['peak_rss_mib']:>12.0f} {row['train_loss']:>10.4f}")
    if ns.json:
        ns.json.write_text(json.dumps({"peak_gflops": peaks, "runs": runs, "table": table}, indent=2))


if __name__ == "__main__":
    main()
