"""The flags that say how a model loads, in every command that loads one: --device and --template checked
when the flags are parsed (one line, before any model loads), and --rope_scaling and --attn_implementation
reaching the loaded model's config, the run card, and the run folder when it is loaded again."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import memorisation_rows

from unift.cli import main, parse
from unift.errors import UniftError
from unift.models.overrides import ATTN_IMPLEMENTATIONS, check_rope_scaling

# every command that loads a model takes both (`data check` loads a tokenizer only: --template); argparse
# checks a flag's value as it reads it, before it looks for missing required flags
COMMANDS = [["train"], ["generate"], ["chat"], ["predict"], ["serve"], ["eval"], ["merge"], ["data", "check"]]
BAD = [
    (["--device", "gpu"], "argument --device: --device 'gpu': choose auto"),
    (["--device", "cuda:one"], "argument --device: --device 'cuda:one': choose auto"),
    (["--template", "chatmlx"], "argument --template: unknown --template 'chatmlx'; known: alpaca, auto,"),
    (["--template", "mine.yaml"], "argument --template: --template mine.yaml: cannot read the template file"),
]


def one_line_exit(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


CASES = [(command, flags, message) for command in COMMANDS for flags, message in BAD
         if not (command[0] == "data" and flags[0] == "--device")]


@pytest.mark.parametrize("command, flags, message", CASES, ids=[" ".join(c + f) for c, f, _ in CASES])
def test_device_and_template_fail_when_the_flags_are_parsed(command, flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # mine.yaml is not there
    err = one_line_exit([*command, *flags], capsys)
    assert message in err, err


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_good_devices_and_templates_parse(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text('user: "Q: {content}\\n"\nassistant: "A: {content}{eos}"\n')
    required = {"predict": ["--input", "x.jsonl", "--result_dir", "out"], "merge": ["--adapter_dir", "r", "--merged_dir", "m"]}
    for device, template in ((" CUDA:1 ", "glm"), ("auto", "auto"), ("mps", "mine.yaml")):
        device_flag = [] if command[0] == "data" else ["--device", device]
        ns = parse([*command, *required.get(command[0], []), *device_flag, "--template", template])
        assert ns.template == template and getattr(ns, "device", "n/a") in ("n/a", device.strip().lower())


def test_a_config_file_is_checked_like_the_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("device: tpu\n")
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == ("unift: error: --device 'tpu': choose auto (the first GPU, else the CPU), "
                                       "cpu, cuda, cuda:N or mps\n")
    config.write_text("template: alpacca\n")
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("unift: error: unknown --template 'alpacca'")


@pytest.mark.parametrize("value, expected", [("linear:2", "linear:2"), (" Dynamic:4.0", "dynamic:4"),
                                             ("yarn:1.5", "yarn:1.5"), ("none", "none")])
def test_rope_scaling_values(value, expected):
    assert check_rope_scaling(value) == expected


@pytest.mark.parametrize("flags, message", [
    (["--rope_scaling", "linear"], "--rope_scaling 'linear': write TYPE:FACTOR with TYPE one of linear, dynamic, yarn"),
    (["--rope_scaling", "ntk:2"], "--rope_scaling 'ntk:2': write TYPE:FACTOR"),
    (["--rope_scaling", "linear:two"], "the factor 'two' is not a number"),
    (["--rope_scaling", "linear:0.5"], "the factor must be ≥ 1"),
    (["--attn_implementation", "flash"], "argument --attn_implementation: invalid choice: 'flash'"),
])
@pytest.mark.parametrize("command", [["train"], ["generate"], ["eval"]], ids=" ".join)
def test_bad_rope_scaling_and_attention_fail_when_the_flags_are_parsed(command, flags, message, capsys):
    assert message in one_line_exit([*command, *flags], capsys)


def test_the_attention_choices_are_transformers_own():
    """Every choice is one transformers accepts, and every one it has (but paged and kernel ids) is offered."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from unift.accel.attention import NAME

    known = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()} - {NAME}
    assert set(ATTN_IMPLEMENTATIONS) <= known
    assert {k for k in known if not k.startswith("paged|")} == set(ATTN_IMPLEMENTATIONS)


def rope_of(model) -> tuple[str, float | None]:
    config = model.config
    return config.rope_parameters["rope_type"], config.rope_parameters.get("factor")


@pytest.fixture(scope="module")
def scaled_run(tiny_model, tmp_path_factory):
    """2 training steps of a tiny llama with linear RoPE scaling x2 and eager attention."""
    from unift.train.args import TrainArgs
    from unift.train.run import train

    folder = tmp_path_factory.mktemp("scaled")
    data = folder / "mem.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorisation_rows(4)))
    args = TrainArgs(model_type="llama", model_name_or_path=str(tiny_model("llama")), data=[str(data)],
                     output_dir=str(folder / "run"), max_steps=2, per_gpu_train_batch_size=2, compute_dtype="fp32",
                     rope_scaling="linear:2", attn_implementation="eager", device="cpu")
    return train(args)


def test_training_loads_the_model_with_them_and_the_run_card_records_them(scaled_run):
    model = scaled_run.model.get_base_model()
    assert rope_of(model) == ("linear", 2.0) and model.model.rotary_emb.rope_type == "linear"
    assert model.config._attn_implementation == "eager"
    # unift's CPU attention kernel would have replaced eager: an explicit choice is what trains
    assert "--attn_implementation eager" in scaled_run.metrics["optimizations_skipped"]["cpu_attention"]
    card = json.loads((scaled_run.output_dir / "unift_run.json").read_text())
    assert (card["rope_scaling"], card["attn_implementation"]) == ("linear:2", "eager")


def test_a_run_folder_loads_with_its_setting_unless_a_flag_says_otherwise(scaled_run, tmp_path):
    from unift.inference.generator import Generator

    generator = Generator.load(str(scaled_run.output_dir), device="cpu")
    model = generator.model.get_base_model()
    assert rope_of(model) == ("linear", 2.0) and model.config._attn_implementation == "eager"
    generator = Generator.load(str(scaled_run.output_dir), device="cpu", rope_scaling="none", attn_implementation="sdpa")
    model = generator.model.get_base_model()
    assert rope_of(model) == ("default", None) and model.config._attn_implementation == "sdpa"
    # merged, the model keeps the scaling in its own config (plain transformers loads it so)
    assert main(["merge", "--adapter_dir", str(scaled_run.output_dir), "--merged_dir", str(tmp_path / "m")]) == 0
    rope = json.loads((tmp_path / "m" / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_inference_commands_pass_them_to_the_loader(command, tiny_model, monkeypatch):
    """The flags of generate/chat/predict/serve (load_generator) and eval (evaluate) reach the loaded model."""
    import unift.loader
    from unift.cli import options_and_run

    seen = {}
    real = unift.loader.load

    def spy(*args, **kwargs):
        seen["model"] = real(*args, **kwargs).model
        raise UniftError("stop here")  # the model is what the test looks at

    monkeypatch.setattr(unift.loader, "load", spy)
    extra = ["--prompt", "hi"] if command == "generate" else ["--data", "arith_test", "--max_samples", "1"]
    options, run = options_and_run(parse([command, "--model_name_or_path", str(tiny_model("llama")), "--device",
                                          "cpu", "--rope_scaling", "yarn:4", "--attn_implementation", "eager",
                                          *extra]))
    with pytest.raises(UniftError, match="stop here"):
        run(options)
    assert rope_of(seen["model"]) == ("yarn", 4.0) and seen["model"].config._attn_implementation == "eager"


def test_what_a_model_cannot_take_is_one_line(tiny_model):
    from unift.loader import load

    with pytest.raises(UniftError, match="--rope_scaling linear:2: this bloom checkpoint has no rotary"):
        load(base_model=str(tiny_model("bloom")), model_type="bloom", device="cpu", rope_scaling="linear:2")
    if torch.cuda.is_available():
        return  # flash attention may well load there
    with pytest.raises(UniftError, match="^--attn_implementation flash_attention_2: ") as err:
        load(base_model=str(tiny_model("llama")), device="cpu", attn_implementation="flash_attention_2")
    assert "\n" not in str(err.value)
