"""The merge check (unift.inference.fidelity): the merged folder, loaded back as the inference commands load it,
against the adapter model on records of the run's data; the figures in the summary line and unift_merged.json,
a departing merge refused in one line with nothing written, and the gap a quantized base leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from after_training_helpers import cli_result, run_folder, trained_run

from unift.commands.merge import DEFAULT_MAX_KL
from unift.inference import fidelity


def fidelity_of(folder) -> dict:
    return json.loads((folder / "unift_merged.json").read_text())["fidelity"]


def test_the_flag_default_is_the_fidelity_default():
    assert DEFAULT_MAX_KL == fidelity.DEFAULT_MAX_KL


def test_a_lora_merge_reports_a_tiny_kl_on_the_run_data(tiny_model, tmp_path, capsys):
    run = trained_run(tiny_model("llama"))
    out = tmp_path / "merged"
    code, _, err = cli_result(["merge", "--adapter_dir", str(run), "--merged_dir", str(out)], capsys)
    assert code == 0
    figures = fidelity_of(out)
    data = json.loads((run / "unift_run.json").read_text())["arguments"]["data"][0]
    # the run's own records (trained_run writes 8; the check takes the first few), not the probes
    assert figures["records"] == f"{fidelity.RECORDS} records of {data}" and figures["tokens"] > 20
    assert figures["merged"]["mean_kl"] < 1e-9 and figures["merged"]["max_abs_logit_diff"] < 1e-3
    assert "gguf" not in figures and "quantized_base" not in figures
    summary = next(line for line in err.splitlines() if "merged vs adapter model" in line)
    assert "mean KL" in summary and f"--max_kl {DEFAULT_MAX_KL:g}" in summary


def test_no_check_writes_no_figures(tiny_model, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, err = cli_result(["merge", "--adapter_dir", str(trained_run(tiny_model("llama"))), "--merged_dir",
                               str(out), "--no_check"], capsys)
    assert code == 0 and fidelity_of(out) is None and "mean KL" not in err


def corrupting_load(monkeypatch):
    """The loader the check reads the written folder with, after one of its weights is scaled by 50."""
    from safetensors.torch import load_file, save_file

    real = fidelity.load

    def load(*args, base_model: str, **kwargs):
        path = next(Path(base_model).glob("*.safetensors"))
        weights = load_file(path)
        weights["model.layers.0.mlp.down_proj.weight"] *= 50
        save_file(weights, path, metadata={"format": "pt"})
        return real(*args, base_model=base_model, **kwargs)

    monkeypatch.setattr(fidelity, "load", load)


@pytest.mark.parametrize("broken", ["a corrupted weight", "--max_kl 0"])
def test_a_departing_merge_fails_in_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch, broken):
    argv = ["merge", "--adapter_dir", str(trained_run(tiny_model("llama"))), "--merged_dir", str(tmp_path / "m")]
    if broken == "--max_kl 0":
        argv += ["--max_kl", "0"]  # an fp32 merge's KL is ~1e-12, not 0
    else:
        corrupting_load(monkeypatch)
    code, _, err = cli_result(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("unift: error: merge check failed: the merged model departs from the adapter model on ")
    assert "mean KL" in err and "nothing was written" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))  # nor its temporary folder


def test_a_qlora_merge_reports_the_gap_to_its_quantized_base(tiny_model, tmp_path, capsys):
    """Folded into the full-precision base, the merge reproduces the adapter over that base (up to bf16, the
    run's dtype); the adapter as trained, over the 4-bit base, differs by the base's quantization error."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")
    run = run_folder(tiny_model("llama"), tmp_path / "run", "lora", quantization_bit=4, compute_dtype="bf16")
    out = tmp_path / "merged"
    code, _, err = cli_result(["merge", "--adapter_dir", str(run), "--merged_dir", str(out)], capsys)
    assert code == 0, err
    figures = fidelity_of(out)
    # run_folder's card names no data: the fixed probe conversations stand in
    assert figures["records"].startswith(f"{len(fidelity.PROBES)} probe conversations")
    assert figures["merged"]["mean_kl"] <= DEFAULT_MAX_KL
    quantized = figures["quantized_base"]
    assert quantized["bits"] == 4 and "not_measured" not in quantized
    assert quantized["mean_kl"] > 10 * figures["merged"]["mean_kl"]
    assert "vs the adapter over its 4-bit base, as trained" in err
