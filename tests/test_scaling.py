"""The shipped engine configs as the libraries read them, what unift changes on a CPU (and only there), and
the refusals. Training under each engine: tests/test_engines.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from unift.cli import main
from unift.errors import UniftError
from unift.train.args import TrainArgs

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def accelerate_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives each process, by accelerate's code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))[0]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_builds_accelerates_fsdp2_plugin_with_one_unit_per_decoder_layer(monkeypatch, tiny_model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import unift.train.scaling
    from unift.train.engines import prepare_engine, prepare_process
    from unift.train.scaling import decide_scaling

    env = accelerate_env(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    # What a GPU run keeps (rank 0 loads, then broadcasts the weights) and a CPU run must switch off:
    # accelerate refuses sync_module_states on a CPU.
    assert env["FSDP_SYNC_MODULE_STATES"] == env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(unift.train.scaling, "has_accelerator", lambda: True)
    on_gpu = decide_scaling(TrainArgs())
    assert on_gpu.engine == "fsdp" and on_gpu.accelerator and on_gpu.sharded
    prepare_process(on_gpu)
    assert os.environ["FSDP_SYNC_MODULE_STATES"] == "true"  # a GPU run: the config as written
    monkeypatch.setattr(unift.train.scaling, "has_accelerator", lambda: False)
    scaling = decide_scaling(TrainArgs())
    prepare_process(scaling)
    assert os.environ["FSDP_SYNC_MODULE_STATES"] == os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model("qwen2")),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = SimpleNamespace(args=TrainArgs(), accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no FSDP state to set
    prepare_engine(trainer, model, scaling)
    assert callable(trainer.save_whole)  # FSDP checkpoints get the whole adapter
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    decoder = model.base_model.model.model.layers[0]
    embed = model.base_model.model.model.embed_tokens
    # FSDP2: the config's transformer-layer policy, as accelerate's FSDP2 path reads it (it drops any other
    # policy, PEFT's among them, which left the whole model one unit): each decoder layer, adapter inside
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None
    assert {"lora": policy(lora_a), "decoder": policy(decoder), "embed": policy(embed)} == \
        {"lora": False, "decoder": True, "embed": False}
    # FSDP1: PEFT's policy (flat parameters cannot mix frozen and trained weights): the adapter's layers too
    plugin1 = FullyShardedDataParallelPlugin(fsdp_version=1)
    prepare_engine(SimpleNamespace(args=trainer.args, accelerator=SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin1))), model, scaling)
    wraps = {name: plugin1.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)
             for name, m in (("lora", lora_a), ("decoder", decoder), ("embed", embed))}
    assert wraps == {"lora": True, "decoder": True, "embed": False}


def test_ddp_config_is_plain_multi_gpu_ddp():
    env = accelerate_env(REPO / "configs" / "accelerate" / "ddp.yaml")
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # unift's --compute_dtype decides


@pytest.mark.parametrize("config", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_config_is_accepted_by_training_arguments(config, tmp_path):
    pytest.importorskip("deepspeed", reason="needs deepspeed (requirements-dev.txt: pip install deepspeed)")
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(config), bf16=True, use_cpu=True,
                              per_device_train_batch_size=2, gradient_accumulation_steps=4)
    ds = targs.hf_deepspeed_config
    stage = json.loads(config.read_text())["zero_optimization"]["stage"]
    assert ds.get_value("zero_optimization.stage") == stage
    assert ds.is_zero3() == (stage == 3)
    assert ds.is_offload() == ("offload" in config.name)
    assert ds.get_value("train_micro_batch_size_per_gpu") == 2  # "auto" filled from unift's flags
    assert ds.get_value("gradient_accumulation_steps") == 4
    assert ds.get_value("bf16.enabled") is True


@pytest.mark.parametrize("config", DEEPSPEED, ids=lambda p: p.name)
def test_on_a_cpu_deepspeed_gets_torch_adamw_and_the_file_is_otherwise_unchanged(config, monkeypatch):
    import unift.train.scaling

    args = TrainArgs(deepspeed=str(config))
    monkeypatch.setattr(unift.train.scaling, "has_accelerator", lambda: True)
    assert unift.train.scaling.decide_scaling(args).trainer_deepspeed() == str(config)  # GPUs: the file as it is
    monkeypatch.setattr(unift.train.scaling, "has_accelerator", lambda: False)
    setting = unift.train.scaling.decide_scaling(args).trainer_deepspeed()
    assert setting == {**json.loads(config.read_text()), "zero_force_ds_cpu_optimizer": False}


def test_sharding_engines_drop_the_levers_that_touch_sharded_weights(monkeypatch, tmp_path):
    from unift.accel import OPTIMIZATIONS
    from unift.train.engines import engine_optimizations
    from unift.train.scaling import decide_scaling

    def levers(args: TrainArgs) -> tuple[str, ...]:
        return engine_optimizations(args, decide_scaling(args), OPTIMIZATIONS)

    assert levers(TrainArgs()) == OPTIMIZATIONS
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert levers(TrainArgs()) == tuple(
        o for o in OPTIMIZATIONS if o not in ("label_loss", "bf16_storage", "merged_sampling"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    assert decide_scaling(TrainArgs(deepspeed=str(config))).key == "zero2"
    assert levers(TrainArgs(deepspeed=str(config))) == tuple(
        o for o in OPTIMIZATIONS if o not in ("bf16_storage", "merged_sampling"))


def test_bad_deepspeed_file_is_named(tmp_path, capsys):
    broken = tmp_path / "ds.json"
    broken.write_text("{stage: 2")
    assert main(["train", "--deepspeed", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"unift: error: --deepspeed {broken}: not valid JSON")


def test_an_8bit_base_is_refused_for_sharding_engines(monkeypatch):
    from unift.train.scaling import decide_scaling

    zero3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
    with pytest.raises(UniftError, match="an 8-bit base cannot be sharded by ZeRO-3"):
        decide_scaling(TrainArgs(quantization_bit=8, deepspeed=zero3))
    zero2 = decide_scaling(TrainArgs(quantization_bit=8, deepspeed=str(REPO / "configs/deepspeed/zero2.json")))
    assert (zero2.engine, zero2.zero_stage, zero2.sharded) == ("deepspeed", 2, False)
    qlora = decide_scaling(TrainArgs(peft_type="qlora", deepspeed=zero3))
    assert (qlora.engine, qlora.key, qlora.sharded) == ("deepspeed", "zero3", True)


def test_qlora_for_sharding_engines_packs_4bit_weights_in_the_compute_dtype(tiny_model):
    """FSDP and ZeRO-3 flatten and shard tensors of one dtype: the 4-bit base is stored in bf16 for them."""
    import torch

    from unift.models import get_model_spec, load_model

    spec = get_model_spec("qwen2")
    model = load_model(str(tiny_model("qwen2")), spec, quantization_bit=4, compute_dtype=torch.bfloat16,
                       quant_storage=torch.bfloat16)
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and all(p.dtype == torch.bfloat16 for p in packed)
    plain = load_model(str(tiny_model("qwen2")), spec, quantization_bit=4, compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.uint8 for p in plain.parameters() if type(p).__name__ == "Params4bit")


def test_the_engine_is_decided_once_with_its_stage_and_layout(monkeypatch, tmp_path):
    """The engine key names the checkpoint layout: one CPU process under an FSDP config trains as a single
    process (unift shards a CPU run only across processes), ZeRO's stage is part of the key."""
    import unift.train.scaling
    from unift.train.scaling import decide_scaling

    monkeypatch.setattr(unift.train.scaling, "has_accelerator", lambda: False)
    assert decide_scaling(TrainArgs()).key == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert decide_scaling(TrainArgs()).key == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert decide_scaling(TrainArgs()).key == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert (decide_scaling(TrainArgs()).engine, decide_scaling(TrainArgs()).key) == ("fsdp", "single")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate's DeepSpeed plugin, no --deepspeed
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    ds = decide_scaling(TrainArgs())
    assert (ds.engine, ds.zero_stage, ds.key, ds.sharded, ds.trainer_deepspeed()) == ("deepspeed", 3, "zero3", True, None)
