"""The dtype policy (unift.models.dtypes): every decision it makes, for machines this one is not (the
hardware facts are patched), as the code before it decided them in four places."""

from __future__ import annotations

import pytest
import torch

from unift.errors import UniftError
from unift.models import dtypes
from unift.models.dtypes import (
    DtypePlan,
    dtype_name,
    inference_plan,
    merge_plan,
    parse_dtype,
    saved_dtype,
    torch_dtype,
    training_plan,
)
from unift.models.runcard import RunCard


@pytest.fixture
def machine(monkeypatch):
    """machine(cpu_bf16=..., gpu_bf16=...): what the CPU and the GPU run fast."""
    def set_facts(cpu_bf16: bool = False, gpu_bf16: bool = True) -> None:
        monkeypatch.setattr(dtypes, "cpu_has_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(dtypes, "gpu_half", lambda: "bf16" if gpu_bf16 else "fp16")
    return set_facts


# (--compute_dtype, device, quantization bits, base_dtype lever, sharded 4-bit, CPU bf16, GPU bf16) ->
# (compute, storage, quant_storage)
TRAINING = [
    ("auto", "cpu", None, True, False, False, True, ("fp32", "fp32", None)),
    ("auto", "cpu", None, True, False, True, True, ("bf16", "bf16", None)),  # frozen base in bf16
    ("auto", "cpu", None, False, False, True, True, ("bf16", "fp32", None)),  # lever off: fp32 base, autocast
    ("bf16", "cpu", None, True, False, False, True, ("bf16", "bf16", None)),
    ("fp32", "cpu", None, True, False, True, True, ("fp32", "fp32", None)),
    ("auto", "mps", None, True, False, False, True, ("fp32", "fp32", None)),
    ("auto", "cuda:0", None, True, False, False, True, ("bf16", "bf16", None)),
    ("auto", "cuda:0", None, True, False, False, False, ("fp16", "fp16", None)),
    ("fp32", "cuda:0", None, True, False, False, True, ("fp32", "bf16", None)),  # GPUs store half precision
    ("fp16", "cuda:0", None, False, False, False, True, ("fp16", "bf16", None)),
    ("auto", "cpu", 4, True, False, True, True, ("bf16", "bf16", None)),  # quantized: unquantized in compute
    ("fp32", "cpu", 4, True, False, True, True, ("fp32", "fp32", None)),
    ("bf16", "cuda:0", 4, True, True, False, True, ("bf16", "bf16", "bf16")),  # FSDP/ZeRO-3 pack 4-bit in bf16
    ("bf16", "cuda:0", 8, True, True, False, True, ("bf16", "bf16", None)),
]


@pytest.mark.parametrize(("requested", "device", "bits", "lever", "sharded", "cpu_bf16", "gpu_bf16", "expected"),
                         TRAINING)
def test_training_plan(machine, requested, device, bits, lever, sharded, cpu_bf16, gpu_bf16, expected):
    machine(cpu_bf16=cpu_bf16, gpu_bf16=gpu_bf16)
    plan = training_plan(requested, device, quantization_bit=bits, half_base=lever, sharded=sharded)
    assert (plan.compute, plan.storage, plan.quant_storage) == expected
    assert plan.purpose == "train" and plan.quantization_bit == bits and not plan.upcast_unquantized
    assert plan.half_base == (not bits and plan.storage in ("bf16", "fp16"))


def test_fp16_compute_needs_a_gpu(machine):
    machine()
    with pytest.raises(UniftError, match="fp16 needs a GPU"):
        training_plan("fp16", "cpu")


LORA = RunCard(model_type="llama", peft_type="lora", template="alpaca", base_model=None, compute_dtype="bf16",
               base_dtype="bf16")
QLORA = RunCard(model_type="llama", peft_type="qlora", template="alpaca", base_model=None, quantization_bit=4,
                compute_dtype="bf16", base_dtype="bf16")

# (--dtype, device, card, GPU bf16) -> (compute, storage, quantization bits)
INFERENCE = [
    (None, "cpu", None, True, ("fp32", "fp32", None)),
    (None, "cpu", LORA, True, ("fp32", "fp32", None)),  # the run's bf16 base is not reused by default
    (None, "cuda:0", None, True, ("bf16", "bf16", None)),
    (None, "cuda:1", LORA, False, ("fp16", "fp16", None)),
    (None, "mps", None, True, ("fp16", "fp16", None)),
    ("auto", "cpu", None, True, ("fp32", "fp32", None)),
    ("bf16", "cpu", LORA, True, ("bf16", "bf16", None)),
    (torch.bfloat16, "cpu", None, True, ("bf16", "bf16", None)),
    (torch.float32, "cuda:0", None, True, ("fp32", "fp32", None)),
    (None, "cpu", QLORA, True, ("bf16", "bf16", 4)),  # rebuilt quantized from the run's compute dtype
    (torch.float16, "cuda:0", QLORA, True, ("bf16", "bf16", 4)),  # --dtype does not apply to it
]


@pytest.mark.parametrize(("requested", "device", "card", "gpu_bf16", "expected"), INFERENCE)
def test_inference_plan(machine, requested, device, card, gpu_bf16, expected):
    machine(gpu_bf16=gpu_bf16)
    plan = inference_plan(requested, device, card)
    assert (plan.compute, plan.storage, plan.quantization_bit) == expected
    assert plan.purpose == "infer" and plan.upcast_unquantized == bool(expected[2])


@pytest.mark.parametrize(("requested", "card", "stored", "expected"), [
    ("bf16", LORA, torch.float32, "bf16"),
    ("fp16", QLORA, None, "fp16"),
    ("auto", QLORA, torch.float32, "bf16"),  # QLoRA: the run's compute dtype
    (None, LORA, "bfloat16", "bf16"),  # else the checkpoint's own dtype
    (None, LORA, torch.float16, "fp16"),
    (None, LORA, None, "fp32"),
])
def test_merge_plan(requested, card, stored, expected):
    assert merge_plan() == DtypePlan("fp32", "fp32", "merge")
    assert saved_dtype(requested, card, stored) == expected


def test_names():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    assert dtype_name(torch.float32) == "fp32" and dtype_name("bfloat16") == "bf16"
    assert dtype_name(torch.float64) == "float64" and torch_dtype("float64") is torch.float64
    assert parse_dtype("auto") is None and parse_dtype(None) is None and parse_dtype("fp16") is torch.float16
    with pytest.raises(UniftError, match="unknown dtype"):
        parse_dtype("fp8")
    assert DtypePlan("bf16", "fp32").storage_dtype is torch.float32
