"""The bottleneck-adapter PEFT plugin (unift/peft/bottleneck.py): math, PEFT folder format, reload through
plain peft, merge where the math allows, and unload back to the exact base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES
from torch import nn

from unift.models import get_model_spec
from unift.peft import get_method, merge_refusal
from unift.peft.bottleneck import BottleneckConfig, Linear, default_targets

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 250, 8]])


def options(**overrides) -> SimpleNamespace:
    values = {"adapter_type": "houlsby", "bottleneck_size": 16, "non_linearity": "tanh", "adapter_dropout": 0.0,
              "adapter_scaling": "1.0", "adapter_init": "bert", "lora_target_modules": None}
    return SimpleNamespace(**{**values, **overrides})


def wrapped(folder: Path, model_type: str, **overrides):
    """A fresh tiny base wrapped with adapters whose weights are perturbed (so the adapter is not a no-op)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder)
    config = get_method("adapters").build(options(**overrides), get_model_spec(model_type))
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_math_of_each_variant():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    for kind in ("houlsby", "pfeiffer", "parallel"):
        layer = Linear(base, "default", BottleneckConfig(adapter_type=kind, bottleneck_size=5, scaling=0.5,
                                                         init_weights="bert"))
        down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]

        def branch(h, down=down, up=up):
            return 0.5 * up(torch.tanh(down(h)))

        expected = {"houlsby": lambda: base(x + branch(x)), "pfeiffer": lambda: base(x) + branch(base(x)),
                    "parallel": lambda: base(x) + branch(x)}[kind]()
        assert torch.allclose(layer(x), expected, atol=1e-6), kind


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer", "parallel"])
def test_default_init_starts_as_the_identity_and_bert_does_not(tiny_model, kind):
    """mam_adapter (the default) zeroes the up projection: before training the model is the base model.
    bert draws both projections from N(0, 0.02): the model changes before the first step."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from unift.train.args import TrainArgs

    folder = tiny_model("llama")
    base_logits = logits(AutoModelForCausalLM.from_pretrained(folder).eval())
    assert TrainArgs().adapter_init == "mam_adapter"
    for init, identity in (("mam_adapter", True), ("bert", False)):
        config = get_method("adapters").build(options(adapter_type=kind, adapter_init=init), get_model_spec("llama"))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config).eval()
        assert torch.equal(logits(model), base_logits) is identity, init


def test_branch_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = Linear(base, "default", BottleneckConfig(adapter_type="parallel", bottleneck_size=16))
    with torch.no_grad():  # weights of a trained size, so bf16 rounding would show in the result
        for weights in (layer.bottleneck_down["default"].weight, layer.bottleneck_up["default"].weight):
            weights.normal_(0, 0.5)
    x = torch.randn(4, 64)
    reference = layer.branch("default", x)  # no autocast: fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        branch = layer.branch("default", x)
        # What the same layers give when autocast is left on: far from the fp32 reference.
        down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
        autocast = up(layer.bottleneck_act["default"](down(x))).float() * layer.scale("default")
    assert (autocast - reference).abs().max() > 1e-3
    torch.testing.assert_close(branch, reference, atol=1e-6, rtol=1e-6)
    assert layer.bottleneck_down["default"].weight.dtype == torch.float32


@pytest.mark.parametrize("model_type", FAMILIES)
def test_default_targets_follow_the_original_placement(tiny_model, model_type):
    spec = get_model_spec(model_type)
    for kind, expected in (("houlsby", set(spec.mlp_targets)), ("pfeiffer", {spec.mlp_output})):
        assert set(default_targets(spec, kind)) == expected
    parallel = set(default_targets(spec, "parallel"))
    assert parallel and parallel <= set(spec.attention_targets)
    assert not parallel & {"o_proj", "dense", "out_proj"}  # beside the attention inputs, not its output
    model = wrapped(tiny_model(model_type), model_type, adapter_type="pfeiffer")
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear)}
    assert adapted == {spec.mlp_output}


@pytest.mark.parametrize("scaling", ["1.0", "learned"])
@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer", "parallel"])
def test_saved_in_peft_format_and_reloaded_by_plain_peft(tiny_model, tmp_path, adapter_type, scaling):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    model = wrapped(folder, "llama", adapter_type=adapter_type, adapter_scaling=scaling)
    before = logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["adapter_type"] == adapter_type
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("bottleneck_down" in k for k in keys) and any("bottleneck_up" in k for k in keys)
    assert any("bottleneck_scale" in k for k in keys) == (scaling == "learned")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path).eval()
    assert torch.equal(logits(reloaded), before)


def test_plain_peft_in_a_new_process_after_importing_unift_peft(tiny_model, tmp_path):
    folder = tiny_model("bloom")
    model = wrapped(folder, "bloom", adapter_type="parallel")
    model.save_pretrained(tmp_path / "adapter")
    torch.save(logits(model), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "import unift.peft  # registers the BOTTLENECK method with peft\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    out = model(input_ids=ids).logits\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), 'logits differ'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer", "parallel"])
def test_linear_adapters_merge_exactly(tiny_model, adapter_type):
    model = wrapped(tiny_model("internlm"), "internlm", adapter_type=adapter_type, non_linearity="linear",
                    adapter_scaling="learned")  # internlm: attention projections with biases
    assert merge_refusal(get_method("adapters"), model.peft_config["default"]) == ""
    before = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Linear) for m in merged.modules())
    assert torch.allclose(logits(merged), before, atol=1e-4, rtol=1e-4)


def test_merge_with_a_non_linearity_is_refused_with_the_reason(tiny_model):
    model = wrapped(tiny_model("llama"), "llama", non_linearity="tanh")
    reason = merge_refusal(get_method("adapters"), model.peft_config["default"])
    assert "cannot be merged" in reason and "tanh" in reason
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("merge_first", [False, True])
def test_unload_restores_the_base_exactly(tiny_model, merge_first):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("bloom")
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected_state = {k: v.clone() for k, v in reference.state_dict().items()}
    model = wrapped(folder, "bloom", adapter_type="pfeiffer", non_linearity="linear")
    if merge_first:
        model.merge_adapter()  # folded into the weights; unload must still give the originals back
    base = model.unload()
    state = base.state_dict()
    assert set(state) == set(expected_state)
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert not any(isinstance(m, Linear) for m in base.modules())
    assert torch.equal(logits(base), logits(reference))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="adapter_type"):
        BottleneckConfig(adapter_type="sideways")
    with pytest.raises(ValueError, match="scaling"):
        BottleneckConfig(scaling="big")
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)
