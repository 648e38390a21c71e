"""`torchrun --nproc_per_node 2 uniform_finetune.py ...` trains on CPU (gloo) and writes one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import memorisation_rows

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_on_cpu(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl(memorisation_rows(16))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(REPO / "uniform_finetune.py"), "--model_name_or_path", str(tiny_model("qwen2")),
         "--model_type", "qwen2", "--data", str(data), "--output_dir", str(out), "--max_steps", "4",
         "--per_gpu_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
         "--compute_dtype", "fp32"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_steps"] == 4
    card = json.loads((out / "unift_run.json").read_text())
    assert card["model_type"] == "qwen2"
    assert (out / "adapter_model.safetensors").exists()
