"""End to end on the real embedded SmolLM2-135M-Instruct: train, then evaluate base vs tuned on held-out
problems (the tuned model must answer more of them correctly) and generate, through the commands the README
runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_eval_generate_on_the_embedded_model(tmp_path):
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(REPO / "uniform_finetune.py"), "--data", "arith", "--max_samples", "128",
         "--max_steps", "24", "--per_gpu_train_batch_size", "4", "--learning_rate", "2e-3", "--lora_r", "8",
         "--logging_steps", "1", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [p["loss"] for p in metrics["loss_curve"]]
    assert min(curve[-3:]) < curve[0]  # a real model on real data: the loss comes down within 24 steps
    card = json.loads((out / "unift_run.json").read_text())
    assert card["base_model"] is None and card["template"] == "auto"  # the embedded model, found anywhere

    evaluation = subprocess.run(
        [sys.executable, "-m", "unift.cli", "eval", "--adapter_dir", str(out), "--compare_base",
         "--max_samples", "16", "--max_new_tokens", "56", "--show", "1"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "| base 0-shot |" in evaluation.stdout and "| tuned |" in evaluation.stdout
    results = json.loads((out / "eval_results.json").read_text())
    base, tuned = (row["tasks"]["arith_test"] for row in results["setups"])
    assert base["examples"] == tuned["examples"] == 16
    # the tuned model answers held-out problems the base model gets wrong (greedy, so deterministic)
    assert tuned["correct"] > base["correct"], (base["predictions"][:3], tuned["predictions"][:3])
    assert tuned["perplexity"] < base["perplexity"]  # and finds the reference answers far more likely

    answer = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--adapter_dir", str(out), "--prompt",
         "Anna has 12 apples and gets 30 more. How many apples does Anna have now?", "--max_new_tokens", "24"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip()
