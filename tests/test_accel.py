"""The speed-ups of unift.accel change how training computes, never what it computes.

- a padding-free (packed) batch gives every example the loss and the gradients it gets alone, for every
  family (each family keeps packed examples apart in its own way: position ids, or Bloom's ALiBi hooks);
- the label-only loss equals transformers' own loss and gradients, with and without num_items_in_batch;
- the fused LoRA layer equals PEFT's layer (same dropout mask), the lean RMSNorm/MLP equal the originals;
- the fast dropout is a Bernoulli(p) mask, reproducible from torch's seed, with a matching backward;
- the training attention equals an fp32 reference on packed rows.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_lora_model

from unift.accel import OPTIMIZATIONS, parse_optimizations
from unift.accel.attention import _PackedCausalAttention, register
from unift.accel.dropout import FastDropout, dropped_positions
from unift.accel.forward import TrainingForward
from unift.accel.layers import lean_layers
from unift.accel.lora import fuse_lora_layers
from unift.accel.loss import linear_cross_entropy
from unift.data.collate import PackingCollator, PaddingCollator
from unift.errors import UniftError
from unift.peft import METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 96


def examples(seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((9, 4), (14, 6), (5, 0), (11, 11 - 3)):  # (5, 0): trained whole, like text
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_close_grads(got: dict, want: dict, tol: float = 2e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=tol, rtol=1e-4), (name, (got[name] - want[name]).abs().max())


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("multiple_of", [1, 32])
def test_packed_examples_get_the_loss_and_gradients_they_get_alone(model_type, multiple_of):
    model, spec = tiny_lora_model(model_type)
    inner = model.get_base_model()
    if spec.packing == "position_ids" and type(inner)._can_set_attn_implementation():
        inner.set_attn_implementation(register())  # unift's training attention, split per example
    rows = examples()
    alone = [loss_and_grads(model, PaddingCollator(0)([row])) for row in rows]
    forward = TrainingForward(inner, spec.packing)
    forward.install()
    try:
        for i, (want_loss, want_grads) in enumerate(alone):
            # the packed row holds every example; only example i keeps its labels
            masked = [row if j == i else {**row, "labels": [-100] * len(row["labels"])} for j, row in enumerate(rows)]
            got_loss, got_grads = loss_and_grads(model, PackingCollator(0, multiple_of)(masked))
            assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6), (i, got_loss, want_loss)
            assert_close_grads(got_grads, want_grads)
    finally:
        forward.uninstall()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_label_only_loss_equals_transformers_loss(model_type):
    model, spec = tiny_lora_model(model_type)
    batch = PaddingCollator(0)(examples())
    want = loss_and_grads(model, batch)
    want_sum = loss_and_grads(model, {**batch, "num_items_in_batch": torch.tensor(17)})
    forward = TrainingForward(model.get_base_model(), None)
    forward.install()
    try:
        got = loss_and_grads(model, batch)
        got_sum = loss_and_grads(model, {**batch, "num_items_in_batch": torch.tensor(17)})
    finally:
        forward.uninstall()
    for (g_loss, g_grads), (w_loss, w_grads) in ((got, want), (got_sum, want_sum)):
        assert g_loss == pytest.approx(w_loss, rel=1e-5)
        assert_close_grads(g_grads, w_grads)
    # uninstalled: the model's own forward (with logits) is back
    assert model(**batch).logits is not None


@pytest.mark.parametrize("trained", ["hidden", "all"])  # one online pass (LoRA), or two (a trained head)
def test_linear_cross_entropy_matches_cross_entropy_in_blocks(trained):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(45, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=trained == "all")
    bias = torch.randn(50, generator=generator, requires_grad=trained == "all")
    targets = torch.randint(0, 50, (45,), generator=generator)
    inputs = (hidden, weight, bias) if trained == "all" else (hidden,)
    # blocks of 16, 16, 16 and 2 vocabulary rows; 45 rows filled to 64
    got = linear_cross_entropy(hidden, weight, bias, targets, 1 / 45, block=16)
    got_grads = torch.autograd.grad(got, inputs)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets)
    want_grads = torch.autograd.grad(want, inputs)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        assert linear_cross_entropy(hidden, weight, bias, targets, 1 / 45).item() == pytest.approx(want.item(), rel=1e-6)


def test_fast_dropout_is_bernoulli_reproducible_and_backward_matches():
    p, n = 0.05, 2_000_000
    positions = dropped_positions(n, p, seed=3)
    assert torch.all(positions[1:] > positions[:-1]) and positions[-1] < n
    rate = len(positions) / n
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5  # within five standard errors
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    both = (dropped[:-1] & dropped[1:]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5  # neighbours are independent
    assert torch.equal(dropped_positions(n, p, seed=3), positions)

    layer = FastDropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), y)  # torch.manual_seed fixes the mask
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("base_inside", [True, False])
def test_fused_lora_matches_peft(dropout, half, base_inside):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dtype = torch.bfloat16 if half else torch.float32
    base = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"], init_lora_weights=False)
    reference = get_peft_model(base.to(dtype), config).train()
    for module in reference.modules():
        if hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False  # as unift trains a half-precision base
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused)[0] == 2
    base_calls = []
    if not base_inside:  # a base the fused function cannot compute itself (a hook, as on a quantized base)
        for module in fused.modules():
            if hasattr(module, "base_layer"):
                module.base_layer.register_forward_hook(lambda *_: base_calls.append(1))
    if dropout:
        # PEFT's layer given the very masks the fused layer draws (same seeds, same order)
        for module in reference.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = SeededMask(dropout)
    x = torch.randn(3, 5, 24, dtype=dtype)
    outs, grads = [], []
    for model in (reference, fused):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            y = model(xi)
        y.float().pow(2).sum().backward()
        outs.append(y.float())
        grads.append([xi.grad.float()] + [p.grad.float() for n, p in model.named_parameters() if p.requires_grad])
    assert len(base_calls) == (0 if base_inside else 2)  # which path ran
    for got, want in zip([outs[1], *grads[1]], [outs[0], *grads[0]]):
        if half:  # bf16 rounds in a different order: compare as a whole, to 1% of the norm
            assert (got - want).norm() <= 1e-2 * want.norm(), (got - want).norm() / want.norm()
        else:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


class SeededMask(torch.nn.Module):
    """Dropout drawing its positions exactly as unift.accel.lora does (one seed from torch per call)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        seed = int(torch.randint(0, 2**62, (1,)).item())
        out = x.clone()
        out.reshape(-1)[dropped_positions(x.numel(), self.p, seed)] = 0
        return out / (1 - self.p)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "chatglm"])
def test_lean_layers_match_the_originals(model_type):
    model, _ = tiny_lora_model(model_type)
    reference = copy.deepcopy(model)
    assert lean_layers(model.get_base_model(), torch.float32)[0] > 0
    batch = PaddingCollator(0)(examples())
    want = loss_and_grads(reference, batch)
    got = loss_and_grads(model, batch)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_close_grads(got[1], want[1], tol=1e-6)


def test_an_offered_tensor_is_recomputed_for_the_backward_pass_instead_of_kept():
    import weakref

    from unift.accel.layers import _offer, _Recompute

    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    with _Recompute():
        h = x * 3.0  # kept by nothing but the product below
        _offer(h, lambda: x.detach() * 3.0)
        y = (h * w).sum()
        gone = weakref.ref(h)
    del h
    assert gone() is None  # nothing holds it between the passes
    y.backward()
    assert torch.equal(w.grad, x.detach() * 3.0) and torch.equal(x.grad, w.detach() * 3.0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_lean_layers_recompute_the_inputs_their_projections_would_keep(model_type, monkeypatch):
    from unift.accel import layers

    model, _ = tiny_lora_model(model_type)
    lean_layers(model.get_base_model(), torch.float32)
    fuse_lora_layers(model)
    keeping = copy.deepcopy(model)
    decoder_layers = [m for m in keeping.modules() if "forward" in m.__dict__ and hasattr(m, "mlp")]
    assert len(decoder_layers) == model.config.num_hidden_layers
    for layer in decoder_layers:  # the same lean layers, each projection keeping its own input
        layer.__dict__.pop("forward")
    recipes = []
    pack = layers._Recompute._pack
    monkeypatch.setattr(layers._Recompute, "_pack",
                        lambda self, t: (lambda out: (recipes.append(type(out) is tuple), out)[1])(pack(self, t)))
    batch = PaddingCollator(0)(examples())
    want = loss_and_grads(keeping, batch)
    got = loss_and_grads(model, batch)
    # per layer: q, k, v read the first norm's output, gate and up the second's, down act(gate) * up;
    # but the first layer's first norm: its input (the frozen embeddings') needs no gradient, so the norm
    # keeps nothing to recompute from, and q, k, v keep its output
    assert sum(recipes) == 6 * model.config.num_hidden_layers - 3
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


@pytest.mark.parametrize("reentrant", [False, True])
def test_lean_layers_under_activation_checkpointing_give_the_same_gradients(reentrant, monkeypatch):
    from unift.accel import layers

    model, _ = tiny_lora_model("llama")
    lean_layers(model.get_base_model(), torch.float32)
    fuse_lora_layers(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.enable_input_require_grads()
    batch = PaddingCollator(0)(examples())
    want = loss_and_grads(model, batch)
    scopes = []
    monkeypatch.setattr(layers._Recompute, "__init__",
                        lambda self: (scopes.append(1), layers.torch.autograd.graph.saved_tensors_hooks.__init__(
                            self, self._pack, self._unpack), setattr(self, "offered", {}))[1])
    got = loss_and_grads(checkpointed, batch)
    assert not scopes  # the checkpoint's own hooks see everything the layers keep
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_close_grads(got[1], want[1], tol=1e-6)


@pytest.mark.parametrize("token_major", [True, False], ids=["as-models-give-it", "heads-first-memory"])
def test_packed_attention_in_half_precision_matches_fp32(token_major):
    torch.manual_seed(0)
    heads, kv_heads, dim, edges = 6, 2, 16, [0, 7, 19, 24]

    def tensor(h):  # models hand over transposed views of [1, tokens, heads, dim]
        if token_major:
            return torch.randn(1, 24, h, dim, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        return torch.randn(1, h, 24, dim, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    out = _PackedCausalAttention.apply(q, k, v, edges, None)
    grad = torch.randn_like(out)
    out.backward(grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q32[:, :, s:e], k32[:, :, s:e], v32[:, :, s:e], is_causal=True, enable_gqa=True)
        for s, e in zip(edges[:-1], edges[1:])], dim=2)
    want.backward(grad.float())
    assert torch.allclose(out.float(), want, atol=2e-2)
    for got, ref in ((q, q32), (k, k32), (v, v32)):
        assert torch.allclose(got.grad.float(), ref.grad, atol=5e-2, rtol=2e-2)


def test_optimization_names_are_checked():
    assert parse_optimizations("all") == OPTIMIZATIONS
    assert parse_optimizations("none") == ()
    assert parse_optimizations("label_loss,base_dtype") == ("base_dtype", "label_loss")
    with pytest.raises(UniftError, match="unknown warp_drive"):
        parse_optimizations("label_loss,warp_drive")


def test_bitsandbytes_is_kept_out_of_train_processes_that_do_not_quantize():
    """`unift train` without quantization never imports bitsandbytes (~125 MB, ~1 s); PEFT and transformers
    then see it as absent. With a quantizing method or flag it is left alone."""
    quantizing = {m.name for m in METHODS.values() if m.quantization_bit} | {
        alias for m in METHODS.values() if m.quantization_bit for alias in m.aliases}
    from unift.compat.keep_out import QUANTIZING_WORDS

    assert quantizing <= set(QUANTIZING_WORDS)
    probe = ("import importlib.util, sys; from unift.compat.keep_out import keep_bitsandbytes_out; "
             "print(keep_bitsandbytes_out(sys.argv[1:])); import peft, transformers.utils as u; "
             "print(importlib.util.find_spec('bitsandbytes') is None, u.is_bitsandbytes_available())")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.fail("bitsandbytes must be installed for this test")
    for argv, kept_out in ((["train", "--data", "x"], True), (["train", "--peft_type", "qlora"], False),
                           (["train", "--quantization_bit", "8"], False)):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [str(kept_out), str(kept_out), str(not kept_out)], out.stdout + out.stderr


def test_deepspeed_is_kept_out_of_train_processes_that_do_not_use_it(tmp_path):
    """transformers imports an installed deepspeed at start-up; `unift train` without --deepspeed (on the
    command line or in its --config file) or an accelerate DeepSpeed launch keeps it out."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed (a dev dependency) must be installed for this test")
    probe = ("import sys; from unift.compat.keep_out import keep_deepspeed_out; print(keep_deepspeed_out(sys.argv[1:])); "
             "import transformers.integrations.deepspeed as t, accelerate.utils as a; "
             "print(bool(t.is_deepspeed_available()), bool(a.is_deepspeed_available()))")
    config = tmp_path / "ds.yaml"
    config.write_text("deepspeed: configs/deepspeed/zero2.json\n")
    cases = ((["train", "--data", "x"], {}, True), (["train", "--deepspeed", "zero2.json"], {}, False),
             (["train", "--config", str(config)], {}, False),
             (["train", "--data", "x"], {"ACCELERATE_USE_DEEPSPEED": "true"}, False))
    for argv, env, kept_out in cases:
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        assert out.stdout.split() == [str(kept_out), str(not kept_out), str(not kept_out)], (
            argv, out.stdout + out.stderr)
