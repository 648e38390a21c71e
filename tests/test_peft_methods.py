"""Method-specific behaviour beyond the matrix: AdaLoRA's budget really moves, QLoRA survives an evaluation
between training steps on CPU (the AVX512-BF16 trap), 8-bit bases, flags checked against the method,
--help grouped by method, and the support table in `unift list` and the README."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from unift.cli import main
from unift.inference.generator import Generator
from unift.models import get_model_spec, load_model
from unift.models.dtypes import torch_dtype
from unift.models.runcard import RunCard
from unift.peft import METHODS, get_method, merge_refusal, method_names
from unift.peft.support import readme_block, support_table
from unift.train.args import TrainArgs
from unift.train.run import train

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(10)


def args_for(folder, data_file, out, **values) -> TrainArgs:
    base = dict(model_name_or_path=str(folder), data=[str(data_file)], output_dir=str(out),
                per_gpu_train_batch_size=8, cutoff_len=64, warmup_ratio=0.0, lr_scheduler_type="constant",
                logging_steps=1, save_steps=1000, report_to="none", learning_rate=1e-2, max_steps=4)
    return TrainArgs(**{**base, **values})


def logits(model, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        return model(input_ids=IDS).logits.float()


# ---- AdaLoRA ---------------------------------------------------------------------------------------------

def test_adalora_reallocates_the_rank_budget(tiny_model, data_file, tmp_path):
    """With init_r 6 and target rank 2 the budget shrinks during training and ends unevenly spread."""
    result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="adalora",
                            adalora_init_r=6, lora_r=2, max_steps=10, learning_rate=3e-2))
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (config["init_r"], config["target_r"], config["total_step"]) == (6, 2, 10)
    pattern = config["rank_pattern"]
    assert pattern, "no budget allocation ran: update_and_allocate was not called during training"
    ranks = {name: sum(kept) for name, kept in pattern.items()}
    assert sum(ranks.values()) == 2 * len(ranks)  # the final budget: target rank x adapted layers
    assert len(set(ranks.values())) > 1, ranks  # reallocated across layers, not cut evenly
    # The trained model masks the pruned singular values (lora_E) and the reloaded one drops them.
    trained_E = {n: p for n, p in result.model.named_parameters() if "lora_E" in n}
    assert sum(int((p == 0).sum()) for p in trained_E.values()) == 6 * len(ranks) - sum(ranks.values())
    generator = Generator.load(str(tmp_path / "run"))
    reloaded_E = [p for n, p in generator.model.named_parameters() if "lora_E" in n]
    assert sorted(p.shape[0] for p in reloaded_E) == sorted(ranks.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_adalora_reload_keeps_the_pruned_ranks_on_every_family(family, tiny_model, data_file, tmp_path):
    """The saved and reloaded adapter has the shapes its rank pattern says and the trained model's logits,
    and reloading it raises no warning about its rank pattern (unift.compat.peft_adapters)."""
    import warnings

    result = train(args_for(tiny_model(family), data_file, tmp_path / "run", peft_type="adalora",
                            adalora_init_r=6, lora_r=2, max_steps=10, learning_rate=3e-2, compute_dtype="fp32"))
    pattern = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern, "no budget allocation ran"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = Generator.load(str(tmp_path / "run"), device="cpu", dtype="fp32")
    assert not [w for w in caught if "rank_pattern" in str(w.message)], [str(w.message) for w in caught]
    shapes = {n: (p.shape[0],) for n, p in generator.model.named_parameters() if "lora_E" in n}
    wanted = {f"base_model.model.{key}.default": (sum(kept),) for key, kept in pattern.items()}
    assert shapes == wanted
    assert sum(kept for kept, *_ in shapes.values()) < 6 * len(shapes)  # something was pruned
    trained = result.model.eval()
    assert torch.allclose(logits(generator.model.eval()), logits(trained), atol=1e-4, rtol=1e-4)


def test_adalora_schedule_must_fit_the_run(tiny_model, data_file, tmp_path, capsys):
    code = main(["train", "--model_name_or_path", str(tiny_model("llama")), "--data", str(data_file),
                 "--peft_type", "adalora", "--max_steps", "5", "--adalora_tinit", "3", "--adalora_tfinal", "3",
                 "--output_dir", str(tmp_path / "run")])
    assert code == 2
    assert "leave no budget-allocation steps in a run of 5 optimizer steps" in capsys.readouterr().err


# ---- QLoRA on CPU ----------------------------------------------------------------------------------------

def test_qlora_trains_evaluates_and_trains_again(tiny_model, data_file, tmp_path):
    """The AVX512-BF16 trap (docs/performance.md, "Platform notes"): an evaluation (a no-grad forward) repacks bitsandbytes' 4-bit
    weights, after which training gets wrong gradients and the saved state is corrupted. Evaluating every
    3 steps, the loss must keep falling after each evaluation and the saved adapter must reload to the
    outputs of the trained model. Runs with the compute dtype users get (bf16 where the CPU has it)."""
    import bitsandbytes as bnb
    from peft import PeftModel, prepare_model_for_kbit_training

    folder = tiny_model("bloom")
    result = train(args_for(folder, data_file, tmp_path / "run", model_type="bloom", peft_type="qlora",
                            max_steps=9, save_steps=3, val_set_size=2, learning_rate=2e-2))
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    evals = [point["loss"] for point in result.metrics["eval_loss"]]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    assert losses[3] > losses[5] > losses[8], losses  # steps 4, 6, 9: after the first and second evaluations

    card = RunCard.load(tmp_path / "run")
    assert (card.peft_type, card.quantization_bit) == ("qlora", 4)
    dtype = torch_dtype(card.compute_dtype)
    autocast = dtype if dtype != torch.float32 else None
    # Reload the way training loaded: the same 4-bit base and compute dtype, then the saved adapter.
    base = prepare_model_for_kbit_training(
        load_model(str(folder), get_model_spec("bloom"), quantization_bit=4, compute_dtype=dtype))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    trained = result.model.eval()  # accelerate keeps its autocast wrapper on forward for bf16 runs
    assert torch.allclose(logits(reloaded, autocast), logits(trained), atol=1e-4, rtol=1e-4)


def test_qlora_uses_paged_adamw_only_where_it_pages():
    expected = "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"
    assert get_method("qlora").optimizer_name().startswith(expected)
    assert not get_method("lora").optimizer_name().startswith("paged")


# ---- 8-bit and 4-bit bases for the LoRA family -----------------------------------------------------------

@pytest.mark.parametrize(("peft_type", "flags"), [
    ("lora", {"load_in_8bit": True}), ("adalora", {"load_in_8bit": True}), ("ia3", {"load_in_8bit": True}),
    ("dora", {"quantization_bit": 4}),
])
def test_quantized_base(tiny_model, data_file, tmp_path, peft_type, flags):
    # fp32 compute: the generator reloads quantized bases with fp32 compute, so outputs can match exactly.
    result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type=peft_type,
                            compute_dtype="fp32", learning_rate=3e-2, **flags))
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    assert losses[-1] < losses[0], losses
    bits = 8 if flags.get("load_in_8bit") else flags["quantization_bit"]
    assert RunCard.load(tmp_path / "run").quantization_bit == bits
    assert getattr(result.model, f"is_loaded_in_{bits}bit")
    generator = Generator.load(str(tmp_path / "run"))
    assert torch.allclose(logits(generator.model), logits(result.model.eval()), atol=1e-5, rtol=1e-5)


# ---- flags checked against the method, at parse time --------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["--peft_type", "prefix", "--lora_r", "16"],
     "--lora_r is not used by --peft_type prefix (it reads --num_virtual_tokens)"),
    (["--peft_type", "lora", "--bottleneck_size", "64", "--adapter_type", "parallel"],
     "--adapter_type, --bottleneck_size are not used by --peft_type lora"),
    (["--peft_type", "p-tuning", "--target_modules", "q_proj"], "--lora_target_modules is not used"),
    (["--peft_type", "qlora", "--load_in_8bit"], "--peft_type qlora loads the base in 4-bit"),
    (["--peft_type", "prompt", "--load_in_8bit"],
     "--peft_type prompt does not train over a 8-bit base; 8-bit loading works with --peft_type lora, dora, "
     "adalora, ia3"),
    (["--peft_type", "lora", "--load_in_8bit", "--quantization_bit", "4"], "--load_in_8bit contradicts"),
    (["--peft_type", "adapters", "--adapter_scaling", "big"], "must be a number or 'learned'"),
    (["--peft_type", "adapters", "--adapter_type", "sideways"], "invalid choice"),
])
def test_flags_for_another_method_are_refused(capsys, tmp_path, argv, expected):
    try:
        code = main(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2 and expected in capsys.readouterr().err


def test_dora_over_8bit_is_refused_on_cpu_only():
    if torch.cuda.is_available():
        assert TrainArgs(peft_type="dora", load_in_8bit=True).quantization_bit == 8
    else:
        with pytest.raises(Exception, match="dora over an 8-bit base fails on CPU"):
            TrainArgs(peft_type="dora", load_in_8bit=True)


def test_load_in_8bit_is_quantization_bit_8_and_qlora_is_4():
    assert TrainArgs(peft_type="lora", load_in_8bit=True).quantization_bit == 8
    assert TrainArgs(peft_type="qlora").quantization_bit == 4
    assert TrainArgs(peft_type="ptuning").peft_type == "p-tuning"  # aliases resolve to the canonical name


def test_every_method_flag_is_a_train_argument_and_read_by_some_method():
    from unift.train.args import RunArgs
    from unift.train.stages import stage_flag_fields

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    read = {option for name in method_names() for option in METHODS[name].options}
    assert read <= fields, read - fields
    general = {f.name for f in dataclasses.fields(RunArgs)} | {f.name for f in stage_flag_fields()}
    method_only = fields - general
    assert method_only and method_only <= read, method_only - read


def test_help_groups_method_flags_by_method(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for group, flag in (("adalora", "--adalora_init_r"), ("adapters", "--bottleneck_size"),
                        ("p-tuning", "--prompt_encoder_hidden_size"), ("oft", "--oft_block_size"),
                        ("vera", "--vera_r"), ("prefix, p-tuning, prompt", "--num_virtual_tokens")):
        section = out.split(f"{group} options:", 1)[1].split("options:", 1)[0]
        assert flag in section, group


def test_prompt_learning_cannot_be_merged_and_says_why():
    from peft import PrefixTuningConfig

    reason = merge_refusal(get_method("prefix"), PrefixTuningConfig(num_virtual_tokens=4))
    assert "virtual tokens" in reason


# ---- the support table ----------------------------------------------------------------------------------

def test_unift_list_prints_the_matrix(capsys):
    assert main(["list"]) in (0, None)
    out = capsys.readouterr().out
    assert out.strip().startswith(support_table().strip())  # then the stage table (tests/test_stages.py)
    header = out.splitlines()[0]
    assert all(f" {name} " in header for name in method_names())


def test_readme_matrix_is_the_generated_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_block(readme) == support_table(), "run: python -m unift.peft.support --update-readme"
