"""What makes the side-by-side with LLaMA-Factory fair (used by vs_llamafactory.py):

- one checkpoint for both tools, stored in bf16 as published checkpoints are (the embedded model converts
  to fp32; a random SmolLM2-360M-shaped decoder for the scale workload), written once to the bench cache;
- where the CPU has no native bf16 (AVX512-BF16 or AMX), both tools compute in fp32 from that same bf16
  file: an fp32 view of it (the same weights file, config dtype float32), since LLaMA-Factory loads with
  torch_dtype=auto and would otherwise train over a bf16 base in emulation (13+ minutes for the standard
  workload on such a CPU);
- the tokens each side trains, counted: LLaMA-Factory's from its own data pipeline, unift's from its run;
- the library versions of both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

BENCH_DIR = Path(os.environ.get("UNIFT_BENCH_DIR", Path.home() / ".cache" / "unift" / "bench"))
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "llamafactory")

# SmolLM2-360M's shape (its published config); the weights are random, which does not change the speed
SCALE_CONFIG = {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                "intermediate_size": 2560, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def native_bf16() -> bool:
    from unift.models.dtypes import cpu_has_bf16

    return cpu_has_bf16()


def _save(model, tokenizer, target: Path) -> Path:
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # a folder that exists is complete
    return target


def bf16_checkpoint(source: Path) -> Path:
    """`source` (any dtype) stored in bf16 under the bench cache, once."""
    target = BENCH_DIR / f"{source.name}-bf16"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    return _save(model, AutoTokenizer.from_pretrained(source), target)


def scale_checkpoint(tokenizer_source: Path) -> Path:
    """A randomly initialised decoder of SmolLM2-360M's shape with `tokenizer_source`'s tokenizer, in bf16."""
    target = BENCH_DIR / "random-smollm2-360m-bf16"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SCALE_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    return _save(model, tokenizer, target)


def fp32_view(bf16_dir: Path) -> Path:
    """The same bf16 weights file, declared float32: loaded with torch_dtype=auto it trains in fp32 (the
    values are the bf16 ones, exactly)."""
    target = bf16_dir.with_name(bf16_dir.name + "-as-fp32")
    target.mkdir(exist_ok=True)
    for item in bf16_dir.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    config = json.loads((bf16_dir / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def write_long_records(source: list[dict], n: int, min_chars: int, folder: Path) -> Path:
    """n alpaca records longer than the cutoff: record i's instruction, and as its answer the answers of
    records i, i+1, ... joined until it has min_chars characters (the scale workload's 512-token rows)."""
    rows = []
    for i in range(n):
        parts, j = [], i
        while sum(len(p) for p in parts) < min_chars:
            parts.append(source[j % len(source)]["output"])
            j += 1
        rows.append({"instruction": source[i]["instruction"], "input": source[i].get("input", ""),
                     "output": "\n\n".join(parts)})
    path = folder / "workload.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


_VERSIONS = ("import importlib.metadata as m, json, sys\n"
             "out = {}\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n"
             "        out[name] = m.version(name)\n"
             "    except m.PackageNotFoundError:\n"
             "        pass\n"
             "print(json.dumps(out))\n")


def versions(python: str) -> str:
    out = subprocess.run([python, "-c", _VERSIONS, *LIBRARIES], capture_output=True, text=True, check=True).stdout
    return ", ".join(f"{k} {v}" for k, v in json.loads(out).items())


# Runs in LLaMA-Factory's environment: its own data pipeline on the run's config, then the counts of what
# it trains (all input tokens; those with a label). The data come out as its Trainer gets them.
_LF_COUNT = (
    "import json, sys\n"
    "from llamafactory.data import get_dataset, get_template_and_fix_tokenizer\n"
    "from llamafactory.hparams import get_train_args\n"
    "from llamafactory.model import load_tokenizer\n"
    "config = json.load(open(sys.argv[1]))\n"
    "model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)\n"
    "tokenizer_module = load_tokenizer(model_args)\n"
    "template = get_template_and_fix_tokenizer(tokenizer_module['tokenizer'], data_args)\n"
    "data = get_dataset(template, model_args, data_args, training_args, stage='sft', **tokenizer_module)\n"
    "rows = data['train_dataset']\n"
    "print('COUNTS', json.dumps({'examples': len(rows), 'tokens': sum(len(r['input_ids']) for r in rows),\n"
    "      'labelled': sum(sum(t != -100 for t in r['labels']) for r in rows)}))\n"
)


def llamafactory_counts(venv: Path, config: dict, folder: Path) -> dict:
    path = folder / "count_config.json"
    path.write_text(json.dumps({**config, "output_dir": str(folder / "count-out")}))
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", _LF_COUNT, str(path)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COUNTS ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"counting LLaMA-Factory's tokens failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])
