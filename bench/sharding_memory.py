"""What sharding saves per process: `unift train` in one process, then under DDP, FSDP, ZeRO-2, ZeRO-3 and ZeRO-3 offload on 2,
over a randomly initialised decoder built from a config (no download), each process's resident memory
read from the run card (`scaling` in unift_run.json, gathered from every rank).

    python bench/sharding_memory.py [--layers 16] [--hidden 1024] [--steps 2] [--engines ddp,fsdp,zero2,zero3,zero3_offload] [--procs 2]

Two figures per process: the peak (every rank loads the whole model before the engine shards it, so the
peak cannot fall) and the resident memory after training (what the engine keeps: under FSDP and ZeRO-3
each process holds its share of the frozen base). fp32 throughout; LoRA r=8 on the attention projections;
one thread per process. The table goes to stdout as markdown (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def build_model(folder: Path, layers: int, hidden: int) -> int:
    """A random Llama-shaped decoder saved with the embedded model's tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO))
    from unift.models import embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(engine: str, procs: int, flags: list[str]) -> list[str]:
    script = str(REPO / "uniform_finetune.py")
    if engine == "single":
        return [PYTHON, script, *flags]
    if engine == "fsdp":
        return [PYTHON, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", str(procs),
                "--main_process_port", str(free_port()), script, *flags]
    launch = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
              str(free_port()), script, *flags]
    if engine.startswith("zero"):
        launch += ["--deepspeed", str(REPO / f"configs/deepspeed/{engine}.json")]
    return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--engines", default="ddp,fsdp,zero2,zero3,zero3_offload")
    parser.add_argument("--procs", type=int, default=2)
    opts = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="unift-shard-mem-") as tmp:
        folder = Path(tmp)
        params = build_model(folder / "model", opts.layers, opts.hidden)
        data = folder / "data.jsonl"
        data.write_text("".join(json.dumps({"instruction": f"Say the number {i}.", "input": "",
                                            "output": f"The number is {i}."}) + "\n" for i in range(16)))
        for engine, procs in [("single", 1)] + [(e, opts.procs) for e in opts.engines.split(",")]:
            out = folder / f"{engine}-{procs}"
            flags = ["--model_type", "llama", "--model_name_or_path", str(folder / "model"), "--data", str(data),
                     "--max_steps", str(opts.steps), "--per_gpu_train_batch_size", "2",
                     "--compute_dtype", "fp32", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "8",
                     "--save_steps", "100000", "--output_dir", str(out)]
            proc = subprocess.run(command(engine, procs, flags), env=env, cwd=folder, capture_output=True,
                                  text=True, timeout=1800)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            card = json.loads((out / "unift_run.json").read_text())["scaling"]
            rows.append((engine, procs, card))
            print(f"{engine} x{procs}: {card}", file=sys.stderr, flush=True)
    base_mib = params * 4 / 2**20
    print(f"\nmodel: {params / 1e6:.0f} M parameters, fp32 ({base_mib:,.0f} MiB of weights); per process, MiB\n")
    print("| engine | processes | peak RSS | RSS after training | frozen base's share (ideal) |")
    print("| --- | --- | --- | --- | --- |")
    for engine, procs, card in rows:
        sharded = engine == "fsdp" or engine.startswith("zero3")  # offload shards the same, in CPU memory
        peaks = " / ".join(f"{p:,.0f}" for p in card["peak_rss_mib"])
        after = " / ".join(f"{p:,.0f}" for p in card["rss_mib_after_training"])
        print(f"| {engine} | {procs} | {peaks} | {after} | {base_mib / (procs if sharded else 1):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
