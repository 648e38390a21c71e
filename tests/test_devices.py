"""One --device choice for every command: the choice logic (tested for machines this one is not), where
the weights go, and a clear refusal of a device the machine lacks."""

from __future__ import annotations

import subprocess

import pytest
import torch
from after_training_helpers import PYTHON, REPO, env

from unift.errors import UniftError
from unift.inference.generator import Generator
from unift.models.devices import choose_device, placement, training_device
from unift.models.dtypes import weights_dtype

GiB = 2**30


@pytest.mark.parametrize(("requested", "cuda", "mps", "expected"), [
    (None, 0, False, "cpu"), ("auto", 0, False, "cpu"), ("auto", 2, False, "cuda:0"), ("auto", 0, True, "mps"),
    ("auto", 1, True, "cuda:0"), ("cpu", 4, True, "cpu"), ("cuda", 2, False, "cuda:0"), ("cuda:1", 2, False, "cuda:1"),
    (" CUDA:0 ", 1, False, "cuda:0"), ("mps", 0, True, "mps"),
])
def test_device_choice(requested, cuda, mps, expected):
    assert choose_device(requested, cuda_count=cuda, mps=mps) == expected


@pytest.mark.parametrize(("requested", "cuda", "mps", "message"), [
    ("cuda", 0, False, "no CUDA GPU is visible"), ("cuda:2", 2, False, r"only 2 CUDA GPU\(s\)"),
    ("mps", 1, False, "MPS backend is not available"), ("gpu", 1, False, "choose auto"),
    ("cpu:1", 0, False, "choose auto"), ("cuda:x", 1, False, "choose auto"),
])
def test_device_choice_refusals(requested, cuda, mps, message):
    with pytest.raises(UniftError, match=message):
        choose_device(requested, cuda_count=cuda, mps=mps)


def test_placement_spreads_only_what_does_not_fit():
    assert placement("cpu", 100 * GiB, 0) is None
    assert placement("cuda:1", 10 * GiB, 79 * GiB) == {"": "cuda:1"}
    assert placement("cuda:0", 70 * GiB, 79 * GiB) == "auto"  # the KV cache and activations need room too
    assert placement("mps", 1 * GiB, 0) == {"": "mps"}
    assert weights_dtype("cpu") == "fp32"


def test_generator_sits_on_the_chosen_device(tiny_model):
    on_cpu = Generator.load(None, base_model=str(tiny_model("llama")), device="cpu")
    assert on_cpu.model.device.type == "cpu" and on_cpu.model.dtype == torch.float32
    if torch.cuda.is_available():
        on_gpu = Generator.load(None, base_model=str(tiny_model("llama")), device="auto")
        assert on_gpu.model.device.type == "cuda" and on_gpu.model.dtype in (torch.bfloat16, torch.float16)
        assert on_gpu.generate([[{"role": "user", "content": "Hi"}]])[0].completion_tokens > 0
    else:
        with pytest.raises(UniftError, match="--device cuda: no CUDA GPU"):
            Generator.load(None, base_model=str(tiny_model("llama")), device="cuda")


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi"], ["train", "--max_steps", "1"]])
def test_commands_refuse_a_missing_device_in_one_line(tiny_model, command):
    # A device this machine lacks: any CUDA GPU on a CPU machine, a 100th GPU on a GPU machine.
    missing, reason = ("cuda:99", "only") if torch.cuda.is_available() else ("cuda", "no CUDA GPU is visible")
    result = subprocess.run([PYTHON, "-m", "unift.cli", *command, "--model_name_or_path", str(tiny_model("llama")),
                             "--device", missing], capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    lines = result.stderr.splitlines()  # all of stderr: no log line, no other library's line before it
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"unift: error: --device {missing}: {reason}")


def test_training_picks_a_gpu_through_cuda_visible_devices(monkeypatch):
    import unift.models.devices as devices

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(devices, "resolve_device", lambda requested: "cuda:1")
    with pytest.raises(UniftError, match="CUDA_VISIBLE_DEVICES=1"):
        training_device("cuda:1")
