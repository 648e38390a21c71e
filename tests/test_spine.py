"""The spine end to end on tiny models: CLI parsing and errors, masking, the run folder, reload, generate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import memorisation_rows

from unift.cli import main, parse
from unift.data import IGNORE_INDEX, encode_conversation, encode_prompt, get_template
from unift.models import load_tokenizer
from unift.train.args import TrainArgs

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--model_type", "gpt9"], "unknown --model_type 'gpt9'; known: bloom, chatglm"),
        (["train", "--peft_type", "magic"], "unknown --peft_type 'magic'; known:"),
        (["train", "--quantization_bit", "3"], "invalid choice"),
        (["train", "--epochs", "many"], "invalid float value: 'many'"),
        (["train", "--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model: no such folder"),
    ],
)
def test_bad_flags_fail_at_parse_time(argv, expected, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert expected in err


def test_bad_record_names_file_record_and_field(write_jsonl, capsys, tmp_path):
    rows = memorisation_rows(3)
    del rows[1]["output"]
    path = write_jsonl(rows)
    code, err = run_cli(["train", "--data", str(path), "--model_name_or_path", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    # One line, naming the file, the record and the field; reported before any model is touched.
    assert err.strip() == f"unift: error: {path}: record 2: field 'output' is missing"


def test_unknown_dataset_lists_registered_names(capsys):
    code, err = run_cli(["train", "--data", "no_such_data"], capsys)
    assert code == 2 and "arith" in err and "no_such_data" in err


def test_yaml_config_is_overridden_by_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_type: bloom\nlearning_rate: 0.01\nlora_r: 4\n")
    ns = parse(["train", "--config", str(config), "--lora_r", "2"])
    assert (ns.model_type, ns.learning_rate, ns.lora_r) == ("bloom", 0.01, 2)


def test_yaml_config_rejects_unknown_keys(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_rank: 4\n")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and "unknown option(s) lora_rank" in err


@pytest.mark.parametrize("template_name", ["auto", "alpaca"])
def test_loss_mask_covers_the_answer_and_nothing_else(embedded_dir, template_name):
    tokenizer = load_tokenizer(str(embedded_dir))
    template = get_template(template_name)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    enc = encode_conversation(messages, template, tokenizer, cutoff_len=512)
    prompt = encode_prompt(messages[:1], template, tokenizer)
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    # The prompt is exactly what inference feeds the model, and every prompt token is masked.
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.input_ids[len(prompt):] == answer
    text = tokenizer.decode(answer)
    assert text.startswith("2 + 3 = 5.")
    assert tokenizer.eos_token in text  # the end of the turn is trained, so the model learns to stop


def test_cutoff_truncates(embedded_dir):
    tokenizer = load_tokenizer(str(embedded_dir))
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok " * 50}]
    enc = encode_conversation(messages, get_template("alpaca"), tokenizer, cutoff_len=64)
    assert enc.truncated and len(enc.input_ids) == len(enc.labels) == 64


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    """A tiny llama fine-tuned on a memorisation set through the real training path."""
    from unift.train.run import train

    folder = tmp_path_factory.mktemp("run")
    data = folder / "mem.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorisation_rows(8)))
    args = TrainArgs(
        model_type="llama", model_name_or_path=str(tiny_model("llama")), data=[str(data)],
        output_dir=str(folder / "out"), max_steps=60, per_gpu_train_batch_size=8, learning_rate=2e-2,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, logging_steps=1, compute_dtype="fp32", save_steps=1000,
    )
    return train(args)


def test_loss_falls_and_run_folder_describes_itself(trained_run):
    out, metrics = trained_run.output_dir, trained_run.metrics
    curve = [p["loss"] for p in metrics["loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "unift_run.json",
                 "metrics.json"):
        assert (out / name).exists(), name
    card = json.loads((out / "unift_run.json").read_text())
    assert card["model_type"] == "llama" and card["peft_type"] == "lora" and card["template"] == "auto"
    assert card["versions"]["transformers"] and card["arguments"]["lora_r"] == 8
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tokens_per_second"] > 0 and saved["peak_rss_mib"] > 0 and saved["global_steps"] == 60


def test_adapter_reloads_to_identical_logits(trained_run):
    from unift.inference.generator import Generator

    ids = torch.tensor([[5, 17, 301, 42, 7]])
    trained = trained_run.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        with trained.disable_adapter():
            base = trained(input_ids=ids).logits
    from transformers import AutoModelForCausalLM

    from unift.peft import load_adapter

    base_model = AutoModelForCausalLM.from_pretrained(trained_run.model.peft_config["default"].base_model_name_or_path,
                                                      dtype=torch.float32)
    with torch.no_grad():
        reloaded = load_adapter(base_model, str(trained_run.output_dir)).eval()(input_ids=ids).logits
    generator = Generator.load(str(trained_run.output_dir))
    assert generator.merged  # LoRA on an fp32 base is folded into the weights for inference
    with torch.no_grad():
        merged = generator.model(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the model...
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)  # ...and reloads exactly
    # merged: fp32 rounding of W + BA (unmerging it again is no exact reload either: W + BA - BA)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-4)


def test_generate_answers_from_the_run_folder_alone(trained_run):
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--lora_dir", str(trained_run.output_dir),
         "--prompt", "What is the code word number 3?", "--max_new_tokens", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # A random model cannot produce this shape; the tuned one answers in the memorised form.
    found = re.search(r"The word is w(\d+)\.", proc.stdout)
    assert found, proc.stdout
    assert int(found.group(1)) in {i * 7 for i in range(8)}


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    code, err = run_cli(["train", "--resume_from_checkpoint", "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and "no checkpoint-* folder" in err


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config):
    ns = parse(["train", "--config", str(config)])
    assert ns.model_type and ns.peft_type


@pytest.mark.parametrize(
    ("text", "expected"),
    [("43 + 46 = 89.\nAnswer: 89", "89"), ("Answer: 1,234.", "1234"), ("Answer: -5", "-5"),
     ("13 + 35 = 48\n答案：48", "48"), ("答案：七千九百三十八", "七千九百三十八"), ("Some  Free text", "some free text")],
)
def test_final_answer_extraction(text, expected):
    from unift.evals.evaluate import final_answer

    assert final_answer(text) == expected


def test_checkpoints_describe_themselves_and_resume(tiny_model, write_jsonl, tmp_path):
    from unift.inference.generator import Generator
    from unift.train.run import train

    data = write_jsonl(memorisation_rows(8))
    common = dict(model_type="qwen2", model_name_or_path=str(tiny_model("qwen2")), data=[str(data)],
                  output_dir=str(tmp_path / "run"), per_gpu_train_batch_size=4, save_steps=2,
                  compute_dtype="fp32", logging_steps=1)
    first = train(TrainArgs(max_steps=4, **common))
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "unift_run.json").exists() and (checkpoint / "tokenizer.json").exists()
    generator = Generator.load(str(checkpoint))  # a checkpoint is usable on its own, e.g. mid-training
    assert generator.has_adapter and generator.card.model_type == "qwen2"
    resumed = train(TrainArgs(max_steps=6, resume_from_checkpoint="latest", **common))
    assert resumed.metrics["global_steps"] == 6
    assert resumed.metrics["tokens_seen"] < first.metrics["tokens_seen"]  # 2 new steps, not 6
    # Resuming continues from step 4 and keeps the earlier history: one curve, no step twice.
    assert [p["step"] for p in resumed.metrics["loss_curve"]] == [1, 2, 3, 4, 5, 6]


def test_qlora_run_reloads_through_the_generator_to_the_same_logits(tiny_model, write_jsonl, tmp_path):
    """The generator rebuilds a 4-bit base the way training did (quantized from the compute dtype)."""
    from accelerate.utils import extract_model_from_parallel

    from unift.inference.generator import Generator
    from unift.train.run import train

    data = write_jsonl(memorisation_rows(8))
    result = train(TrainArgs(model_type="bloom", model_name_or_path=str(tiny_model("bloom")), data=[str(data)],
                             peft_type="qlora", output_dir=str(tmp_path / "q"), max_steps=3, save_steps=100,
                             learning_rate=1e-2, per_gpu_train_batch_size=4))
    trained = extract_model_from_parallel(result.model, keep_fp32_wrapper=False).eval()
    ids = torch.tensor([[5, 17, 301, 42, 7]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
        reloaded = Generator.load(str(result.output_dir)).model(input_ids=ids).logits.float()
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-4)


def test_python_dash_m_unift_runs_the_cli():
    """`python -m unift` is the same command line as `unift`."""
    import subprocess
    import sys

    from after_training_helpers import REPO, env

    proc = subprocess.run([sys.executable, "-m", "unift", "train", "--lora_r", "0"], capture_output=True,
                          text=True, env={**env(), "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--lora_r must be ≥ 1" in proc.stderr, proc.stderr[-2000:]
    listing = subprocess.run([sys.executable, "-m", "unift", "list"], capture_output=True, text=True,
                             env={**env(), "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert listing.returncode == 0 and "lora" in listing.stdout


def test_every_numeric_train_flag_is_range_checked(capsys):
    """Each int/float flag has a range, and a value outside it is one line naming the flag, before anything
    loads (the model folder here does not even exist)."""
    import dataclasses

    from unift.options import _flag_type

    for f in dataclasses.fields(TrainArgs):
        scalar, _ = _flag_type(f.type)
        if scalar not in (int, float) or f.metadata.get("choices"):
            continue
        bounds = f.metadata.get("range")
        assert bounds is not None, f"--{f.name} has no range"
        bad = next(v for v in (-2, -1, 0, 1, 1e9) if not bounds.contains(v))
        value = str(int(bad)) if scalar is int else str(bad)
        code, err = run_cli(["train", f"--{f.name}", value, "--model_name_or_path", "/no/such/model"], capsys)
        assert code == 2 and err.strip().startswith(f"unift: error: --{f.name} must be "), (f.name, err)


@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "--lora_r", "0"], "--lora_r must be ≥ 1 (got 0)"),
    (["train", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1) (got 1.5)"),
    (["train", "--max_steps", "0"], "--max_steps must be ≥ 1 or -1 (got 0)"),
    (["data", "check", "--cutoff_len", "0"], "--cutoff_len must be ≥ 1 (got 0)"),
    (["generate", "--top_p", "0"], "--top_p must be in (0, 1] (got 0)"),
    (["generate", "--max_new_tokens", "0"], "--max_new_tokens must be ≥ 1 (got 0)"),
    (["predict", "--input", "x", "--result_dir", "y", "--batch_size", "0"], "--batch_size must be ≥ 1"),
    (["serve", "--max_batch", "0"], "--max_batch must be ≥ 1 (got 0)"),
    (["eval", "--show", "-1"], "--show must be ≥ 0 (got -1)"),
])
def test_numeric_flags_name_the_flag_and_the_range(argv, expected, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and expected in err
