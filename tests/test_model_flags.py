"""The flags that say how a model loads, in every command that loads one: --device and --template checked
when the flags are parsed (one line, before any model loads)."""

from __future__ import annotations

import pytest

from unift.cli import main, parse

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
