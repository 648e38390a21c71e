"""unift.compat: for each patch of another library, a test that the upstream behaviour it works around is
still there (it FAILS once upstream fixes it: then drop the patch), and a test that the patch works.
Tiny random models built from configs here; nothing from the hub."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from unift import compat

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96
IDS = torch.tensor([[5, 17, 42, 8, 23, 61]])


def tiny_llama(dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, 0)).to(dtype)


def adalora(total_step: int = 10):
    from peft import AdaLoraConfig, TaskType

    return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=4, target_r=2, total_step=total_step,
                         target_modules=["q_proj", "v_proj"])


# ---- apply(): explicit, idempotent, and cheap ------------------------------------------------------------

def test_importing_unift_applies_nothing_and_apply_is_idempotent():
    """Importing unift's modules patches no library; apply() patches, and may be called again."""
    probe = ("import sys, unift.cli, unift.peft, unift.compat as c, peft\n"
             "patched = lambda: getattr(peft.PeftModelForCausalLM.generate, '_unift_prefix_cache', False)\n"
             "assert not patched()\n"
             "c.apply(); first = peft.PeftModelForCausalLM.generate; c.apply()\n"
             "assert patched() and peft.PeftModelForCausalLM.generate is first\n"
             "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# ---- generation_cache: prefix tuning generates with the KV cache -----------------------------------------

def prefix_model():
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(std=1.0)  # a prefix that visibly moves the logits
    return model.eval()


def generate_without_cache(model) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3,
                              min_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)


def test_upstream_peft_cannot_generate_a_prefix_model_without_the_cache(monkeypatch):
    """Fails once peft generates a prefix-tuned model with use_cache=False."""
    from peft import PeftModelForCausalLM

    compat.generation_cache.apply()
    monkeypatch.setattr(PeftModelForCausalLM, "generate", PeftModelForCausalLM.generate.__wrapped__)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        generate_without_cache(prefix_model())


def test_generation_cache_patch_generates_the_prefix_model_with_the_cache():
    compat.apply()
    model = prefix_model()
    with torch.no_grad():
        cached = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3,
                                min_new_tokens=3, do_sample=False, pad_token_id=0)
        forward = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits[0, -1]
    assert torch.equal(generate_without_cache(model), cached)
    assert int(cached[0, IDS.shape[1]]) == int(forward.argmax())  # the prefix is in the first step


# ---- peft_types: peft's closed PeftType enum ------------------------------------------------------------

def test_upstream_peft_registers_only_members_of_its_enum():
    """Fails once peft's register_peft_method accepts a new method name without a PeftType member."""
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import PeftType, register_peft_method

    assert "UNIFT_PROBE" not in PeftType.__members__
    with pytest.raises(ValueError, match="Unknown PEFT type UNIFT_PROBE"):
        register_peft_method(name="unift_probe", config_cls=PeftConfig, model_cls=BaseTuner)


def test_peft_type_extended_for_the_bottleneck_plugin():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    from unift.peft.bottleneck import BOTTLENECK, BottleneckConfig

    assert compat.peft_types.extend_peft_type("BOTTLENECK") is BOTTLENECK  # idempotent
    assert PeftType("BOTTLENECK") is PeftType.BOTTLENECK is BOTTLENECK and BOTTLENECK == "BOTTLENECK"
    assert "BOTTLENECK" in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BOTTLENECK"] is BottleneckConfig


# ---- peft_adapters: AdaLoRA over a half-precision base --------------------------------------------------

def test_adalora_ranknum_stays_a_frozen_constant_over_a_half_base():
    """peft's fp32 upcast of a bf16 base's adapter keeps AdaLoRA's `ranknum` (the rank it divides by) frozen
    (peft 0.21 made it trainable; unift froze it again)."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(torch.bfloat16), adalora())
    ranknum = [p for n, p in model.named_parameters() if ".ranknum." in n]
    assert len(ranknum) == 4 and not any(p.requires_grad for p in ranknum)


def saved_adalora(tmp_path: Path) -> dict:
    """A trained-looking AdaLoRA adapter over a bf16 base (its budget pruned to 3 of 4 ranks, fp32 weights
    bf16 cannot hold), saved; its saved tensors."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(torch.bfloat16), adalora())
    pattern = {f"{name}.lora_E": [True, True, True, False] for name, _ in model.base_model.model.named_modules()
               if name.endswith(("q_proj", "v_proj"))}
    model.base_model.resize_modules_by_rank_pattern(pattern, "default")  # as training's budget allocation does
    model.peft_config["default"].rank_pattern = pattern
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) / 3
    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / compat.peft_adapters.WEIGHTS))


def loaded_matches(model, saved: dict) -> bool:
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    return all(torch.equal(loaded[k].float(), saved[k].float()) for k in saved)


def test_upstream_peft_rounds_saved_adapter_weights_to_a_half_base(tmp_path):
    """Fails once PeftModel.from_pretrained keeps the saved fp32 weights over a bf16 base."""
    from peft import PeftModel

    saved = saved_adalora(tmp_path)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert not loaded_matches(PeftModel.from_pretrained(tiny_llama(torch.bfloat16), tmp_path), saved)


def test_reload_saved_weights_restores_them_exactly(tmp_path):
    from peft import PeftModel

    from unift.peft import load_adapter

    saved = saved_adalora(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(torch.bfloat16), tmp_path)
    assert compat.peft_adapters.reload_saved_weights(model, tmp_path)
    assert loaded_matches(model, saved)
    assert loaded_matches(load_adapter(tiny_llama(torch.bfloat16), str(tmp_path)), saved)
    assert not compat.peft_adapters.reload_saved_weights(  # an fp32 base loads them exactly already
        PeftModel.from_pretrained(tiny_llama(), tmp_path), tmp_path)


def rank_pattern_warnings(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    return model, [str(w.message) for w in caught if "rank_pattern keys did not match" in str(w.message)]


def test_upstream_peft_warns_that_adalora_rank_pattern_keys_match_nothing(tmp_path):
    """Fails once peft stops reading AdaLoRA's saved masks ("<module>.lora_E": [kept]) as LoRA's rank regexes
    at reload (the keys are applied, by resize_modules_by_rank_pattern: the pruned shapes come back)."""
    from peft import PeftModel

    saved_adalora(tmp_path)
    model, found = rank_pattern_warnings(lambda: PeftModel.from_pretrained(tiny_llama(), tmp_path))
    assert found and ".lora_E'" in found[0]
    assert {p.shape[0] for n, p in model.named_parameters() if "lora_E" in n} == {3}  # not ignored at all


def test_unift_reload_drops_only_that_warning(tmp_path):
    from unift.peft import load_adapter

    saved_adalora(tmp_path)
    model, found = rank_pattern_warnings(lambda: load_adapter(tiny_llama(), str(tmp_path)))
    assert not found
    assert {p.shape[0] for n, p in model.named_parameters() if "lora_E" in n} == {3}
    # a key that names no module of the model is a real mismatch: that warning stays
    assert not compat.peft_adapters._adalora_mask_keys_only(
        "The following rank_pattern keys did not match any targeted module or parameter and were ignored: "
        "['model.layers.9.self_attn.q_proj.lora_E'].", tiny_llama())
    assert compat.peft_adapters._adalora_mask_keys_only(
        "The following rank_pattern keys did not match any targeted module or parameter and were ignored: "
        "['model.layers.1.self_attn.q_proj.lora_E'].", tiny_llama())


# ---- bitsandbytes: the CPU AVX512-BF16 repack of 4-bit weights ------------------------------------------

def linear_4bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64, bias=False)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def input_grad(layer, x: torch.Tensor) -> torch.Tensor:
    layer.train()
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    return x.grad


def evaluate_then_grad(layer) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(repacked?, input gradient before, after) an evaluation-style forward (eval mode, no grad)."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    before = input_grad(layer, x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    repacked = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: no autograd kernel for the repacked gemv_4bit
        return repacked, before, input_grad(layer, x)


def test_upstream_bitsandbytes_repack_breaks_gradients():
    """What an AVX512-BF16 CPU does (the flag is forced here, so any CPU shows it): the evaluation repacks
    the weight, and gradients afterwards are broken. How they break depends on the CPU, and either breaks
    training: on a CPU with AVX512-BF16 the repacked layout runs a bf16 kernel with no autograd, so the
    input gets no gradient at all (None); on one without it, the fallback reads the repacked bytes as the
    old layout and the gradient is wrong. Fails once bitsandbytes stops repacking or keeps the gradients."""
    layer = linear_4bit()
    layer.support_avx512bf16_for_cpu = True
    repacked, before, after = evaluate_then_grad(layer)
    assert repacked and before is not None
    assert after is None or not torch.allclose(before, after, atol=1e-4)


def test_disable_cpu_bf16_repack_keeps_gradients():
    layer = linear_4bit()
    layer.support_avx512bf16_for_cpu = True
    model = torch.nn.Sequential(layer, torch.nn.Linear(64, 64))
    assert compat.bitsandbytes.disable_cpu_bf16_repack(model) == 1
    repacked, before, after = evaluate_then_grad(layer)
    assert not repacked and torch.equal(before, after)


# ---- keep_out: bitsandbytes and deepspeed imported whenever installed -----------------------------------

def test_upstream_libraries_import_bitsandbytes_and_deepspeed_eagerly():
    """peft imports bitsandbytes when it wraps a model in LoRA; the Trainer's start-up (accelerate's
    extract_model_from_parallel, called from Trainer.__init__) imports deepspeed. Fails once either stops
    doing so (then the keep-outs have nothing to save)."""
    from transformers import Trainer

    assert "unwrap_model(" in inspect.getsource(Trainer.__init__)
    probe = ("import sys, torch, peft\n"
             "sys.path.insert(0, 'tests')\n"
             "from test_compat import tiny_llama\n"
             "assert 'bitsandbytes' not in sys.modules\n"
             "peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=['q_proj']))\n"
             "bnb = 'bitsandbytes' in sys.modules\n"
             "from accelerate.utils.other import extract_model_from_parallel\n"
             "assert 'deepspeed' not in sys.modules\n"
             "extract_model_from_parallel(torch.nn.Linear(1, 1))\n"
             "print('imported:', bnb, 'deepspeed' in sys.modules)\n")  # deepspeed logs to stdout too
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "imported: True True" in done.stdout, done.stdout + done.stderr[-2000:]


def test_keep_out_marks_a_module_absent(monkeypatch):
    """The keep-out itself (tests/test_accel.py runs it against the real libraries in fresh processes)."""
    for name in ("unift_probe_lib", "unift_probe_user"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    keep = compat.keep_out._keep_out
    assert not keep("unift_probe_lib", ["train", "--probe"], imported_by="unift_probe_user", wanted_if=("probe",))
    assert keep("unift_probe_lib", ["train"], imported_by="unift_probe_user", wanted_if=("probe",))
    assert sys.modules["unift_probe_lib"] is None
    with pytest.raises(ImportError):
        import unift_probe_lib  # noqa: F401
    assert not keep("unift_probe_lib", ["train"], imported_by="unift_probe_user", wanted_if=("probe",))


# ---- quiet: other libraries' warnings silenced by the command line --------------------------------------

def test_peft_kbit_preparation_warns_nothing():
    """peft's k-bit preparation with gradient checkpointing calls transformers' current name (peft 0.21 called
    the deprecated one, whose FutureWarning unift's command line silenced)."""
    from peft import prepare_model_for_kbit_training

    model = tiny_llama()
    model.is_loaded_in_8bit = True  # peft's k-bit path, which enables gradient checkpointing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_upstream_bitsandbytes_logs_about_the_optional_kernels_on_cpu():
    """Fails once bitsandbytes stops logging a warning about the optional kernels package on CPU."""
    import importlib.util

    source = Path(importlib.util.find_spec(compat.quiet.BNB_CPU_OPS_LOGGER).origin).read_text()
    assert "logger.warning(" in source and "Failed to load CPU gemm_4bit_forward from kernels-community" in source


def test_quiet_silences_the_bitsandbytes_logger(monkeypatch):
    logger = logging.getLogger(compat.quiet.BNB_CPU_OPS_LOGGER)
    monkeypatch.setattr(logger, "level", logger.level)  # restored afterwards
    compat.quiet.apply()
    assert logger.getEffectiveLevel() == logging.ERROR


def wandb_offline_import(quiet: bool) -> subprocess.CompletedProcess:
    probe = ("import unift.compat.quiet as q\n" + ("q.apply()\n" if quiet else "")
             + f"import {compat.quiet.PRINTS_AT_IMPORT}\n")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})


def test_upstream_transformers_prints_wandb_offline_to_stdout_and_quiet_sends_it_to_stderr():
    """Fails once transformers stops printing at import (then the import hook has nothing to redirect)."""
    plain, quiet = wandb_offline_import(quiet=False), wandb_offline_import(quiet=True)
    assert "Running in WANDB offline mode" in plain.stdout, plain.stderr[-2000:]
    assert "Running in WANDB offline mode" not in quiet.stdout and "Running in WANDB offline mode" in quiet.stderr


# ---- trainer_checkpoints: transformers Trainer private methods that staged checkpoints override ------------

def test_upstream_trainer_private_methods_the_checkpoint_mixin_overrides():
    """CheckpointOverrides stages checkpoints by overriding `_get_output_dir(trial)`, which
    `_save_checkpoint(model, trial)` must call. Fails when transformers changes either."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert "self._get_output_dir(trial" in inspect.getsource(Trainer._save_checkpoint)


def test_upstream_trainer_private_methods_the_neutral_resume_overrides():
    """unift.compat.trainer_resume.ResumeOverrides skips the engine's own loading by calling `_prepare_for_training`
    without the checkpoint (which must then load nothing) and replaces `_load_from_checkpoint` and
    `_load_rng_state`. Fails when transformers changes those signatures or where the engine's state loads."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._prepare_for_training).parameters) == [
        "self", "max_steps", "train_dataloader", "resume_from_checkpoint"]
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == [
        "self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer._load_rng_state).parameters) == ["self", "checkpoint"]
    source = inspect.getsource(Trainer._prepare_for_training)
    assert "if resume_from_checkpoint is not None:" in source and "deepspeed_load_checkpoint(" in source
    assert "self._load_optimizer_and_scheduler(resume_from_checkpoint)" in source


def test_checkpoint_mixin_redirects_the_output_dir():
    from unift.train.checkpoints import STAGING, AtomicCheckpoints

    class Base:
        def _get_output_dir(self, trial):
            return "/run"

    class Staged(AtomicCheckpoints, Base):
        pass

    trainer = Staged()
    assert trainer._get_output_dir(None) == "/run"
    trainer._staging = True
    assert trainer._get_output_dir(None) == f"/run/{STAGING}"


# ---- trl_preference, trl_grpo: TRL trainers' private methods the stages override ---------------------------

@pytest.mark.parametrize(("trainer", "method", "parameters"), [
    ("DPOTrainer", "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    ("KTOTrainer", "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    ("RewardTrainer", "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    ("DPOTrainer", "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    ("KTOTrainer", "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    ("DPOTrainer", "_compute_loss", ["self", "model", "inputs", "return_outputs"]),
    ("KTOTrainer", "_compute_loss", ["self", "model", "inputs", "return_outputs"]),
    ("GRPOTrainer", "_tokenize_prompts", ["self", "prompts"]),
    ("GRPOTrainer", "_prepare_inputs", ["self", "generation_batch"]),
])
def test_upstream_trl_private_methods_the_stages_override(trainer, method, parameters):
    """Fails when TRL renames one of the private methods unift.compat.trl_preference and trl_grpo override,
    or changes its parameters."""
    import trl

    assert list(inspect.signature(getattr(getattr(trl, trainer), method)).parameters) == parameters


def test_upstream_trl_tokenizes_prompts_in_one_place():
    """GRPOOverrides hands TRL unift's prompt ids by answering `_tokenize_prompts`: TRL must still call it
    for the prompts it generates from, and read (ids, images, extra fields) back."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate)
    assert "self._tokenize_prompts(prompts)" in source


# ---- badam_blocks: the badam package's private block order -------------------------------------------------

def test_upstream_badam_block_order_and_single_process_step():
    """BlockAdam replaces `_update_active_block_idx()` (the next block in random order) and steps with
    `step_single_gpu`; fails when the badam package renames either or stops calling the first on a switch."""
    from badam import BlockOptimizer

    assert list(inspect.signature(BlockOptimizer._update_active_block_idx).parameters) == ["self"]
    assert "step_single_gpu" in vars(BlockOptimizer)
    assert "self._update_active_block_idx()" in inspect.getsource(BlockOptimizer.switch_trainable_params)


# ---- deepspeed_cpu: no C++ op compiled when DeepSpeed runs on a CPU --------------------------------------

def test_upstream_deepspeed_compiles_the_shm_comm_op_when_its_backend_starts():
    """Fails once deepspeed stops building the shared-memory op at start-up (or stops reading the table)."""
    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` finds torch itself there
    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__)
    assert "__compatible_ops__" in inspect.getsource(ds_torch.build_shm_op)
    assert deepspeed.ops.__compatible_ops__.get(compat.deepspeed_cpu.SHM_OP) is True


def test_skip_shm_comm_build_makes_the_backend_skip_it(monkeypatch):
    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, compat.deepspeed_cpu.SHM_OP, True)
    assert compat.deepspeed_cpu.skip_shm_comm_build()
    assert ds_torch.build_shm_op() is None  # returns at once: nothing compiled


# ---- accelerate_fsdp: accelerate's FSDP state on a CPU ---------------------------------------------------

def test_upstream_accelerate_turns_fsdp_on_only_for_gpu_like_devices():
    """Fails once AcceleratorState also sets DistributedType.FSDP for MULTI_CPU (then unift need not)."""
    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    at = source.index("self.distributed_type = DistributedType.FSDP")
    branch = source[source.rindex("elif self.distributed_type in [", 0, at):at]
    assert "DistributedType.MULTI_GPU" in branch and "MULTI_CPU" not in branch


# ---- trl_stages: the preference trainers' reference adapter and CPU log-probabilities ------------------------

def test_upstream_trl_copies_a_peft_adapter_as_its_reference():
    """Fails once TRL's DPOTrainer stops adding the 'ref' adapter (drop_reference_adapter can go then)."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer.__init__)
    assert 'model.add_adapter("ref", default_config)' in source


def test_drop_reference_adapter_leaves_the_trained_one():
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"]))
    model.add_adapter("ref", model.peft_config["default"])
    assert compat.trl_stages.drop_reference_adapter(model)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert all(".ref." not in name for name, _ in model.named_parameters())
    assert not compat.trl_stages.drop_reference_adapter(model)


def test_upstream_trl_scores_every_position_on_a_cpu():
    """Fails once TRL's fused head scores only the answer positions on a CPU by itself."""
    from trl.kernels.chunked_logprob import _use_triton

    assert _use_triton(torch.device("cpu")) is False
    from trl.trainer import utils

    assert "compact = _use_triton(hidden_states.device)" in inspect.getsource(utils.add_fused_lm_head)


def test_answer_positions_only_give_the_same_log_probabilities(monkeypatch):
    from trl.trainer import utils

    model = tiny_llama()
    utils.add_fused_lm_head(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100

    def scores():
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs

    full = scores()
    monkeypatch.setattr(utils, "_use_triton", utils._use_triton)  # restored after the test
    compat.trl_stages.score_answer_tokens_only()
    assert utils._use_triton(torch.device("cpu"))
    compact = scores()
    assert torch.allclose(full, compact, atol=1e-6) and (compact[:, :6] == 0).all()
