"""Helpers shared by the after-training tests (predict, merge, chat, serve, web UI): run folders made by
`unift train`, or written directly with adapter weights moved away from their identity initialisation
(so a merge or an A/B comparison is not vacuous), and a free loopback port."""

from __future__ import annotations

import functools
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def env() -> dict[str, str]:
    """Environment for subprocesses: offline, quiet, and few threads (CI has 2 cores)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


@functools.cache
def trained_run(base_dir: Path) -> Path:
    """A run folder produced by `unift train` (2 LoRA steps on a tiny model), made once per session."""
    import json

    from unift.cli import main

    work = Path(tempfile.mkdtemp(prefix="unift-trained-"))
    data = work / "train.jsonl"
    rows = [{"instruction": f"What is {a} plus {a}?", "input": "", "output": f"{a} + {a} = {2 * a}.\nAnswer: {2 * a}"}
            for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = work / "run"
    code = main(["train", "--model_name_or_path", str(base_dir), "--data", str(data), "--max_steps", "2",
                 "--learning_rate", "5e-3", "--output_dir", str(out), "--per_gpu_train_batch_size", "2",
                 "--cutoff_len", "64", "--compute_dtype", "fp32",
                 "--gradient_accumulation_steps", "1", "--report_to", "none"])
    assert code == 0 and (out / "unift_run.json").exists()
    return out


def run_folder(base_dir: Path, out: Path, peft_type: str, *, perturb: float = 0.05, template: str | None = None,
               quantization_bit: int | None = None, compute_dtype: str = "fp32", model_type: str = "llama",
               **options) -> Path:
    """A run folder as `unift train` leaves it (adapter, tokenizer, unift_run.json), built through the PEFT
    registry with `options` as TrainArgs fields, its trainable weights shifted by N(0, perturb)."""
    import torch
    from transformers import AutoModelForCausalLM

    from unift.models import get_model_spec, load_tokenizer
    from unift.models.runcard import RunCard
    from unift.peft import get_method, wrap_model
    from unift.train.args import TrainArgs

    spec = get_model_spec(model_type)
    method = get_method(peft_type)
    args = TrainArgs(model_type=spec.name, model_name_or_path=str(base_dir), peft_type=method.name, **options)
    args.total_steps = 100  # what train() passes to builders (AdaLoRA schedules its rank budget with it)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = wrap_model(model, method, args, spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * perturb)
    peft_model.save_pretrained(out)
    load_tokenizer(str(base_dir)).save_pretrained(out)
    RunCard(model_type=spec.name, peft_type=method.name, template=template or spec.template,
            base_model=str(base_dir), quantization_bit=quantization_bit, compute_dtype=compute_dtype).save(out)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_result(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `unift ARGV` in this process: (exit code, stdout, stderr)."""
    from unift.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
