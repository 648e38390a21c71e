"""Shared fixtures: tiny randomly initialised models of every family, built from configs here (nothing is
downloaded), with the embedded model's real tokenizer, cached once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each (and in what they start), or the
    # workers' thread pools oversubscribe the cores and spin against each other.
    os.environ["OMP_NUM_THREADS"] = "1"

FAMILIES = ["llama", "internlm", "bloom", "chatglm", "moss", "qwen2"]
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def tiny_config(model_type: str, vocab_size: int, pad_token_id: int):
    import transformers

    from unift.models import get_model_spec

    spec = get_model_spec(model_type)
    config_cls = getattr(transformers, spec.config_class)
    # A wide initialisation lets a small LoRA move the logits of a random model far enough to memorise
    # (with the default 0.02 the loss of a tiny model barely moves from ln(vocab)).
    common = {"vocab_size": vocab_size, "pad_token_id": pad_token_id, "tie_word_embeddings": False,
              "initializer_range": 0.2}
    if spec.config_class == "BloomConfig":
        return config_cls(hidden_size=64, n_layer=2, n_head=4, **common)
    if spec.config_class == "CodeGenConfig":
        return config_cls(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_ctx=512, rotary_dim=8, **common)
    extra = {"num_key_value_heads": 2, "max_position_embeddings": 512, "head_dim": 16}
    config = config_cls(**SMALL, **extra, **common)
    for key, value in spec.config_overrides:
        setattr(config, key, value)
    return config


def tiny_lora_model(model_type: str, seed: int = 0, *, vocab: int = 96, bf16_values: bool = False):
    """(a random tiny model of the family, fp32, with LoRA on every linear layer and no dropout, its spec).
    `bf16_values`: every base weight rounded to a bf16 value (stored in fp32), as a bf16 checkpoint loaded
    for fp32 compute is."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from unift.models import get_model_spec
    from unift.peft import get_method, wrap_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab, 0))
    model.config.use_cache = False
    if bf16_values:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).float())
    options = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None, total_steps=4)
    spec = get_model_spec(model_type)
    peft_model = wrap_model(model, get_method("lora"), options, spec)
    for name, param in peft_model.named_parameters():  # LoRA B starts at zero: give it values to check
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return peft_model.train(), spec


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from unift.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_dir):
    """tiny_model(model_type) -> folder with a random tiny model of that family and a real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from unift.models import load_tokenizer

    built: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type in built:
            return built[model_type]
        tokenizer = load_tokenizer(str(embedded_dir))
        torch.manual_seed(0)
        config = tiny_config(model_type, len(tokenizer), tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        built[model_type] = folder
        return folder

    return build


# The two CPU dtype plans (unift.models.dtypes): what `--compute_dtype auto` becomes on a CPU with
# AVX512-BF16/AMX (a bf16 frozen base under bf16 autocast) and on one without (fp32). Tests of what the
# plan changes take the `dtype_plan` fixture and run under both on any machine (bf16 is emulated, slower,
# where the CPU lacks it).
PLANS = ("fp32", "bf16")


@pytest.fixture(params=PLANS, ids=[f"plan-{p}" for p in PLANS])
def dtype_plan(request, monkeypatch) -> str:
    """'fp32' or 'bf16': UNIFT_CPU_BF16 forces that plan for this test and the processes it starts."""
    monkeypatch.setenv("UNIFT_CPU_BF16", "1" if request.param == "bf16" else "0")
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads per process
    oversubscribe the cores (measured: 14 s instead of 2.4 s per model x method pair)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows: list[dict], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="module")
def memorisation_file(tmp_path_factory):
    """memorisation_file(n) -> a JSONL file of memorisation_rows(n) (the training data the method tests share)."""
    def write(n: int = 8) -> Path:
        path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in memorisation_rows(n)), encoding="utf-8")
        return path

    return write


def memorisation_rows(n: int = 8) -> list[dict]:
    return [{"instruction": f"What is the code word number {i}?", "input": "", "output": f"The word is w{i * 7}."}
            for i in range(n)]


def tiny_run_args(folder, data_file, out, **values):
    """TrainArgs for a few fp32 steps on a tiny model and the memorisation data: constant learning rate 1e-2,
    no warm-up, a log line every step, no checkpoint; `values` override or add flags."""
    from unift.train.args import TrainArgs

    base = dict(model_name_or_path=str(folder), data=[str(data_file)], output_dir=str(out), max_steps=4,
                per_gpu_train_batch_size=4, cutoff_len=64, learning_rate=1e-2, warmup_ratio=0.0,
                lr_scheduler_type="constant", logging_steps=1, save_steps=1000, report_to="none",
                compute_dtype="fp32")
    return TrainArgs(**{**base, **values})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failure: a missing browser or library must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`make test` schedules with pytest-xdist's loadgroup: a test file's tests stay on one worker (its
    module fixtures build once), except that a file's tests under each dtype plan form a group of their
    own, so the plan-doubled files (the PEFT matrix above all) spread over both workers."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        plan = callspec.params.get("dtype_plan") if callspec else None
        group = item.nodeid.split("::")[0] + (f":plan-{plan}" if plan else "")
        item.add_marker(pytest.mark.xdist_group(group))
