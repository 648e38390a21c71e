"""Seeing a run: the configuration once at start, a progress line per log with tokens/s and ETA, TensorBoard
event files and an offline wandb run with the losses, and a loss plot in the run folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import memorisation_rows

from unift.errors import UniftError

REPO = Path(__file__).resolve().parents[1]


def test_a_run_reports_to_tensorboard_and_wandb_and_plots_its_loss(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl(memorisation_rows(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(REPO)}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "uniform_finetune.py"), "--model_type", "qwen2",
         "--model_name_or_path", str(tiny_model("qwen2")), "--data", str(data), "--output_dir", str(out),
         "--max_steps", "4", "--per_gpu_train_batch_size", "2", "--logging_steps", "1", "--compute_dtype", "fp32",
         "--report_to", "tensorboard,wandb"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    # The resolved configuration, once.
    config = [line for line in log.splitlines() if "trainable of" in line]
    assert len(config) == 1
    assert "(qwen2) + lora" in config[0] and "8 train / 0 val examples" in config[0]
    assert "batch 2 per device x 1 accumulation x 1 process = 2 examples per step (single)" in config[0]
    # One progress line per logged step, with the speed and the time left.
    steps = re.findall(r"step (\d)/4  loss [\d.]+  lr [\d.e-]+  \d+ tokens/s  ETA \d+:\d\d:\d\d", log)
    assert steps == ["1", "2", "3", "4"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in board.Scalars("train/tokens_per_second"))

    runs = list(out.glob("wandb/offline-run-*"))  # inside the run folder, not the working directory
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert not (tmp_path / "wandb").exists()

    import matplotlib.image

    plot = matplotlib.image.imread(out / "loss.png")
    assert plot.shape[0] > 100 and plot.shape[1] > 100


def test_unknown_tracker_is_refused():
    from unift.train.progress import report_targets

    with pytest.raises(UniftError, match="--report_to: unknown mlflow; choose none or from tensorboard, wandb"):
        report_targets("tensorboard,mlflow", "out")
    assert report_targets("none", "out") == []
