"""`unift experiment`: a sweep of train + eval runs on a tiny model writes its table, CSV and charts into
one folder, resumes without redoing finished runs, and rejects bad files before anything trains."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import memorisation_rows

from unift.cli import main
from unift.commands.experiment import load_experiment
from unift.errors import UniftError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def experiment_file(tmp_path, model_dir, data, **extra) -> str:
    spec = {
        "name": "tiny", "metric": "exact_match",
        "presets": {"small": {
            "train": {"model_name_or_path": str(model_dir), "data": [str(data)], "max_steps": 2,
                      "per_gpu_train_batch_size": 4, "cutoff_len": 64, "learning_rate": 1.0e-2,
                      "logging_steps": 1, "save_steps": 1000, "compute_dtype": "fp32", "report_to": "none"},
            "eval": {"data": [str(data)], "metrics": ["em", "ppl"], "max_samples": 4, "max_new_tokens": 4,
                     "batch_size": 4, "show": 0}}},
        "runs": [{"name": "base", "train": False}, {"name": "lora", "train": {"peft_type": "lora"}}],
        "sweep": {"lora_r": [2, 4]},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(path)


def test_sweep_writes_table_csv_and_charts_and_resumes(tiny_model, write_jsonl, tmp_path, capsys):
    data = write_jsonl(memorisation_rows(8))
    path = experiment_file(tmp_path, tiny_model("llama"), data)
    out = tmp_path / "out"
    assert main(["experiment", path, "--output_dir", str(out)]) == 0
    names = ["base-lora_r=2", "base-lora_r=4", "lora-lora_r=2", "lora-lora_r=4"]
    for name in names:
        assert (out / name / "eval_results.json").exists()
    assert not (out / "base-lora_r=2" / "adapter_config.json").exists()  # train: false = the base model
    for name in names[2:]:
        assert json.loads((out / name / "adapter_config.json").read_text())["r"] == int(name[-1])
    for report in ("results.md", "results.csv", "loss_curves.png", "exact_match.png"):
        assert (out / report).stat().st_size > 0, report
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert sorted(r["run"] for r in rows) == names
    lora = next(r for r in rows if r["run"] == "lora-lora_r=2")
    assert float(lora["final_loss"]) > 0 and float(lora[f"{data}:perplexity"]) > 1
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| rank | run |" in table and "held-out perplexity" in table and "lora-lora_r=4" in table

    # resumable: finished runs are kept as they are; a run whose results are missing is redone
    adapter = out / "lora-lora_r=2" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    (out / "lora-lora_r=4" / "eval_results.json").unlink()
    capsys.readouterr()
    assert main(["experiment", path, "--output_dir", str(out)]) == 0
    assert adapter.stat().st_mtime_ns == before
    assert (out / "lora-lora_r=4" / "eval_results.json").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"runs": [{"name": "x", "train": {"lora_rank": 4}}]}, "runs[0]: unknown train option 'lora_rank'"),
    ({"runs": [{"name": "x", "eval": {"shots": 3}}]}, "runs[0]: unknown eval option 'shots'"),
    ({"runs": [{"train": {}}]}, "runs[0]: every run needs a name"),
    ({"runs": [{"name": "a"}, {"name": "a"}], "sweep": {}}, "run names must be unique (a)"),
])
def test_bad_experiment_files_fail_before_training(tmp_path, change, message):
    path = experiment_file(tmp_path, tmp_path / "model", tmp_path / "data.jsonl", **change)
    with pytest.raises(UniftError) as err:
        load_experiment(path, "small")
    assert message in str(err.value) and str(err.value).startswith(path)
    with pytest.raises(UniftError, match="no preset 'huge'; it has small"):
        load_experiment(path, "huge")


def test_shipped_experiment_files_parse():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))
    assert {f.stem for f in files} >= {"peft_methods", "lora_dropout", "zero_few_lora", "cot_mixture"}
    for file in files:
        for preset in ("small", "full"):
            assert load_experiment(str(file), preset).runs


def test_a_run_starts_from_an_earlier_run_of_the_experiment(tiny_model, write_jsonl, tmp_path):
    """`adapter_dir: run:NAME` is that earlier run's folder (SFT, then GRPO on its adapter); naming a run that
    has not finished before it is a one-line error."""
    data = write_jsonl(memorisation_rows(8))
    runs = [{"name": "sft", "train": {"peft_type": "lora"}},
            {"name": "grpo", "train": {"stage": "grpo", "adapter_dir": "run:sft", "num_generations": 2,
                                       "max_completion_length": 4}}]
    path = experiment_file(tmp_path, tiny_model("llama"), data, runs=runs, sweep={})
    out = tmp_path / "out"
    assert main(["experiment", path, "--output_dir", str(out)]) == 0
    card = json.loads((out / "grpo" / "unift_run.json").read_text())
    assert card["stage"] == "grpo" and card["parent"]["folder"] == str((out / "sft").resolve())
    assert (out / "grpo" / "eval_results.json").exists()
    backwards = experiment_file(tmp_path, tiny_model("llama"), data, runs=runs[::-1], sweep={})
    with pytest.raises(UniftError, match="adapter_dir run:sft: no finished run of that name before it"):
        from unift.commands.experiment import run_experiment

        run_experiment(backwards, output_dir=str(tmp_path / "other"))
