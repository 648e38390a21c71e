"""Stderr discipline: a failing command prints exactly one line on stderr, whatever other libraries log
on this machine (kernels, bitsandbytes, deepspeed, the hub client) and whichever malloc was chosen; what
they said comes out once the command is under way (unift.console)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from after_training_helpers import PYTHON, REPO, cli_result, env

from unift.errors import UniftError

ERROR = "x.jsonl: record 1: field 'output' is missing"


def noisy_sources(then_log: bool):
    """A stand-in for reading the data that makes the noise libraries make, then fails on a record."""
    def load_sources(options):
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
        warnings.warn("a library's deprecation notice", DeprecationWarning, stacklevel=1)
        warnings.warn("a library's user warning", UserWarning, stacklevel=1)
        print("a library printing to stderr", file=sys.stderr)
        if then_log:
            logging.getLogger("unift").info("tokenizing x.jsonl")
        raise UniftError(ERROR)
    return load_sources


@pytest.mark.parametrize("allocator", ["system", "auto"])
def test_other_libraries_lines_before_an_error_are_dropped(tmp_path, capsys, monkeypatch, allocator):
    monkeypatch.setenv("UNIFT_ALLOCATOR", allocator)
    monkeypatch.setattr("unift.train.prepared.load_sources", noisy_sources(then_log=False))
    code, _, err = cli_result(["train", "--data", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "o")],
                              capsys)
    assert (code, err) == (2, f"unift: error: {ERROR}\n")


def test_they_come_out_in_order_once_the_command_is_under_way(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("unift.train.prepared.load_sources", noisy_sources(then_log=True))
    code, _, err = cli_result(["train", "--data", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "o")],
                              capsys)
    lines = err.splitlines()
    assert code == 2 and lines[-2:] == ["[unift] tokenizing x.jsonl", f"unift: error: {ERROR}"]
    assert lines[0] == "kernels._internals.hf_hub: Skipping publisher trust check"
    assert "a library printing to stderr" in err  # (pytest records the warnings itself)


def test_a_crash_keeps_what_the_libraries_said(tmp_path, capsys, monkeypatch):
    def crash(options):
        logging.getLogger("deepspeed").warning("accelerator probed")
        raise RuntimeError("boom")

    monkeypatch.setattr("unift.train.prepared.load_sources", crash)
    with pytest.raises(RuntimeError, match="boom"):
        cli_result(["train", "--data", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "o")], capsys)
    assert "accelerator probed" in capsys.readouterr().err


def test_a_usage_mistake_drops_what_building_the_flags_logged(capsys, monkeypatch):
    """argparse refuses a flag's value while the command's modules are imported and some log (kernels,
    on some machines): the usage line is all that is printed, as for a UniftError."""
    import unift.cli

    real = unift.cli.make_parser

    def noisy(chosen=None):
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
        return real(chosen)

    monkeypatch.setattr(unift.cli, "make_parser", noisy)
    code, _, err = cli_result(["data", "check", "--template", "nope"], capsys)
    assert code == 2 and err.startswith("unift data check: error: argument --template: unknown --template 'nope'")
    assert len(err.splitlines()) == 1, err


def bad_inputs(tmp_path, tiny: str) -> list[tuple[list[str], str]]:
    """Real commands with bad input, as a user types them, in fresh processes (so every library logs what
    it logs at import on this machine): (argv, the start of the one line)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi."}\n')
    return [
        (["train", "--data", str(bad), "--output_dir", str(tmp_path / "a")], f"unift: error: {bad}: record 1"),
        (["train", "--peft_type", "qlora", "--data", str(bad), "--output_dir", str(tmp_path / "b")],
         f"unift: error: {bad}: record 1"),
        (["train", "--data", str(tmp_path / "nowhere.jsonl")], "unift: error: --data"),
        (["train", "--model_name_or_path", tiny, "--data", "arith", "--max_steps", "1", "--device", "cuda:99",
          "--output_dir", str(tmp_path / "c")], "unift: error: --device cuda:99"),
        (["generate", "--model_name_or_path", tiny, "--prompt", "Hi", "--device", "cuda:99"],
         "unift: error: --device cuda:99"),
        (["predict", "--adapter_dir", str(tmp_path / "no_run"), "--data", str(bad), "--result_dir",
          str(tmp_path / "p")], "unift: error:"),
        (["predict", "--data", str(bad)], "unift predict: error: the following arguments are required: --result_dir"),
        (["data", "check", "--template", "nope"], "unift data check: error: argument --template: unknown"),
    ]


def test_real_bad_inputs_print_one_line_with_either_allocator(tmp_path, tiny_model):
    # the allocator is chosen by `unift train` only: the other commands run once, with the default
    cases = [(argv, start, allocator) for argv, start in bad_inputs(tmp_path, str(tiny_model("llama")))
             for allocator in (("system", "auto") if argv[0] == "train" else ("auto",))]

    def run(case):
        argv, _, allocator = case
        return subprocess.run([PYTHON, "-m", "unift.cli", *argv], capture_output=True, text=True, cwd=REPO,
                              env={**env(), "UNIFT_ALLOCATOR": allocator, "OMP_NUM_THREADS": "1"}, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        for (argv, start, allocator), done in zip(cases, pool.map(run, cases)):
            lines = done.stderr.splitlines()
            assert done.returncode == 2 and len(lines) == 1, (allocator, argv, done.stderr[-2000:])
            assert done.stdout == "", (argv, done.stdout[-2000:])  # nothing printed before it, anywhere
            assert lines[0].startswith(start), (allocator, lines[0])
