"""bench/step_profile.py profiles a real Trainer run in its own process and bench/budget.py splits the
steps' time into buckets that add up to the wall time, each op counted once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from budget import AUTOGRAD, COPIES, DATA, ELEMENTWISE, MATMUL, NORM, OPTIMIZER, SOFTMAX, bucket_of, summarize  # noqa: E402

# A tiny random Llama trained by a plain transformers Trainer: what either tool's run looks like to the profiler
TRAIN = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    rows = [{"input_ids": torch.randint(0, 64, (16,)).tolist()} for _ in range(40)]
    rows = [{**r, "labels": r["input_ids"]} for r in rows]
    args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=2, max_steps=20, use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=100, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    json.dump({"global_step": trainer.state.global_step}, open(sys.argv[2], "w"))
""")


@pytest.mark.parametrize(("name", "bucket"), [
    ("aten::mm", MATMUL), ("aten::addmm", MATMUL), ("aten::_scaled_dot_product_flash_attention_for_cpu", MATMUL),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", MATMUL), ("aten::silu_backward", ELEMENTWISE),
    ("aten::mul", ELEMENTWISE), ("aten::rms_norm", NORM), ("aten::native_layer_norm_backward", NORM),
    ("aten::_log_softmax", SOFTMAX), ("aten::nll_loss_forward", SOFTMAX), ("aten::copy_", COPIES),
    ("aten::_to_copy", COPIES), ("autograd::engine::evaluate_function: MmBackward0", AUTOGRAD),
    ("MmBackward0", AUTOGRAD), ("aten::addmm_", MATMUL), ("_Lora", AUTOGRAD), ("aten::index_fill_", ELEMENTWISE),
])
def test_ops_fall_in_their_buckets(name, bucket):
    assert bucket_of(name) == bucket


def test_profiled_steps_add_up_and_stop_the_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out, state = tmp_path / "budget.json", tmp_path / "state.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step_profile.py"), "--out", str(out), "--warmup", "1",
                           "--steps", "2", str(script), str(tmp_path / "run"), str(state)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())
    result = summarize(raw)
    # warm-up, two plain steps, two profiled ones: then the callback stops the 20-step run
    assert json.loads(state.read_text())["global_step"] == 5
    assert len(raw["plain_step_seconds"]) == 2 and raw["steps"] == 2
    buckets = result["buckets"]
    assert sum(buckets.values()) == pytest.approx(result["step_seconds"], rel=0.02)
    for bucket in (MATMUL, ELEMENTWISE, OPTIMIZER, DATA, AUTOGRAD):
        assert buckets[bucket] > 0, bucket
    ops = result["ops"]
    assert ops["aten::mm"]["bucket"] == MATMUL
    # the optimizer's own ops are its bucket's, not elementwise work of the step
    assert ops["aten::addcdiv_"]["bucket"] == OPTIMIZER
