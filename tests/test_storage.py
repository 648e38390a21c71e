"""unift.accel.storage: bf16_storage (frozen projections that hold bf16 values, kept in bf16 under fp32
compute) gives exactly what the fp32 copies give; --release_memory hands freed activations back."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, tiny_lora_model

from unift.accel.lora import fuse_lora_layers
from unift.accel.storage import store_frozen_linears_in_bf16

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 96


def lora_model(model_type: str, bf16_values: bool):
    return tiny_lora_model(model_type, vocab=VOCAB, bf16_values=bf16_values)[0]


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def frozen_linear_bytes(model) -> int:
    return sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_lora", "peft_forward"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_storage_gives_the_fp32_losses_and_gradients_bit_for_bit(model_type, fused):
    plain = lora_model(model_type, bf16_values=True)
    narrow = copy.deepcopy(plain)
    before = {n: p.detach().clone() for n, p in narrow.named_parameters()}
    full_bytes = frozen_linear_bytes(narrow)
    count, undo = store_frozen_linears_in_bf16(narrow)
    assert count > 0
    assert frozen_linear_bytes(narrow) < 0.6 * full_bytes  # the projections' half; the output layer stays
    if fused:
        fuse_lora_layers(plain)
        fuse_lora_layers(narrow)
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    want_loss, want_grads = loss_and_grads(plain, batch)
    got_loss, got_grads = loss_and_grads(narrow, batch)
    assert torch.equal(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys() and got_grads
    assert all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
    # the paths that bypass the adapter (evaluation, a reference model with the adapter off) widen too
    with torch.no_grad(), plain.disable_adapter(), narrow.disable_adapter():
        assert torch.equal(narrow(input_ids=ids).logits, plain(input_ids=ids).logits)
    undo()
    after = dict(narrow.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in before)


def test_bf16_storage_leaves_weights_that_are_not_bf16_values():
    model = lora_model("llama", bf16_values=False)  # fp32 random weights, as an fp32-trained checkpoint's
    count, _ = store_frozen_linears_in_bf16(model)
    assert count == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_release_memory_hands_freed_activations_back_to_the_system():
    """A step's tensors are freed while a later, smaller one still lives above them in the heap (as a
    backward pass leaves them); what stays resident afterwards, with and without the setting."""
    script = textwrap.dedent("""
        import os, sys, torch
        from unift.accel.storage import release_freed_memory
        if sys.argv[1] == "on":
            assert release_freed_memory()
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        first = torch.ones(2**22)
        del first                      # a freed 16 MiB block: glibc raises its map threshold past it
        before = rss()
        activations = [torch.ones(2**18) for _ in range(200)]   # 200 x 1 MiB
        later = torch.ones(50_000)     # 200 KiB, alive, above them
        activations.clear()
        print(rss() - before)
    """)
    kept = {}
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        kept[mode] = float(done.stdout.split()[-1])
    assert kept["off"] > 150, kept  # glibc keeps the freed blocks: the waste the setting is for
    assert kept["on"] < 20, kept
