"""Hub datasets with the network off: the test writes a hub cache in huggingface_hub's own layout
(datasets--ORG--NAME/refs/main + snapshots/SHA/...), and the code path that downloads online
(huggingface_hub.snapshot_download) answers from it. Also the original toolkit's dataset names (files of its
hub collection QingyiSi/Alpaca-CoT), and `generate.py --data NAME --model_type T` finding the run
`uniform_finetune.py` wrote to its default folder."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from unift.cli import main
from unift.data import DataOptions, load_sources, resolve_dataset
from unift.data.hub import HubSpec, parse_hub_id


def alpaca(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}?", "input": "", "output": f"{tag} answer {i}."} for i in range(n)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """publish(repo, {path: records or text}) puts a dataset into a fresh hub cache; offline throughout."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("UNIFT_CACHE", str(tmp_path / "unift-cache"))

    def publish(repo: str, files: dict[str, object]) -> Path:
        sha = hashlib.sha1(repo.encode()).hexdigest()
        root = cache / f"datasets--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(sha)
        snapshot = root / "snapshots" / sha
        for name, content in files.items():
            path = snapshot / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            elif name.endswith(".jsonl"):
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
            else:
                path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        return snapshot

    return publish


@pytest.mark.parametrize(("text", "spec"), [
    ("tatsu-lab/alpaca", HubSpec("tatsu-lab/alpaca")),
    ("hf://datasets/tatsu-lab/alpaca", HubSpec("tatsu-lab/alpaca")),
    ("org/name:en@test", HubSpec("org/name", None, "en", "test")),
    ("QingyiSi/Alpaca-CoT/alpaca/alpaca_data_cleaned.json",
     HubSpec("QingyiSi/Alpaca-CoT", "alpaca/alpaca_data_cleaned.json")),
    ("./missing.json", None),
    ("/abs/missing.json", None),
    ("org/missing.json", None),  # a local file name, not a repository
    ("plain", None),
])
def test_hub_ids_parse(text, spec):
    assert parse_hub_id(text) == spec


def test_hub_id_with_splits_and_subsets(hub):
    hub("org/qa", {"README.md": "# qa\n", "en/train-00000.jsonl": alpaca(3, "en"), "en/test.jsonl": alpaca(2, "en-t"),
                   "zh/train.jsonl": alpaca(4, "zh"), "zh/test.jsonl": alpaca(1, "zh-t")})
    counts = {}
    for name in ("org/qa", "org/qa:en", "org/qa:zh@test", "org/qa/en/test.jsonl"):
        (source,) = load_sources(DataOptions(data=[name]))
        counts[name] = source.records
    assert counts == {"org/qa": 7, "org/qa:en": 3, "org/qa:zh@test": 1, "org/qa/en/test.jsonl": 2}


def test_llamafactory_hub_entries_read_unchanged(hub, tmp_path):
    hub("someone/adgen", {"train.json": [{"content": "c", "summary": "s"}] * 3,
                          "validation.json": [{"content": "c", "summary": "s"}] * 2})
    info = {"adgen_train": {"hf_hub_url": "someone/adgen", "split": "train",
                            "columns": {"prompt": "content", "response": "summary"}},
            "adgen_eval": {"hf_hub_url": "someone/adgen", "split": "validation",
                           "columns": {"prompt": "content", "response": "summary"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    train, val = load_sources(DataOptions(data=["adgen_train", "adgen_eval"], dataset_dir=str(tmp_path)))
    assert (train.records, val.records) == (3, 2)


def test_not_cached_offline_is_one_line(hub, capsys, tmp_path):
    code = main(["train", "--data", "nobody/nothing", "--model_name_or_path", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("unift: error: --data nobody/nothing: hub dataset nobody/nothing is not cached and "
                   "HF_HUB_OFFLINE=1; run once online to download it\n")
    hub("org/partial", {"a/train.jsonl": alpaca(2, "a")})
    code = main(["train", "--data", "org/partial/b/train.jsonl", "--model_name_or_path", str(tmp_path / "x")])
    assert code == 2 and "b/train.jsonl not found in the cache (HF_HUB_OFFLINE=1) of hub dataset org/partial" in \
        capsys.readouterr().err


def the_collection(hub) -> None:
    """The three files of QingyiSi/Alpaca-CoT that `alpaca-belle-cot` stands for (CoT text keeps its
    newlines as the two characters backslash-n, as the collection's formatted CoT files do)."""
    cot = [{"instruction": "Is 3 odd?", "input": "", "output": "3 = 2 + 1.\\nSo the answer is yes."}] * 2
    hub("QingyiSi/Alpaca-CoT", {"alpaca/alpaca_data_cleaned.json": alpaca(5, "alpaca"),
                                "belle_cn/belle_data_cn.json": alpaca(4, "belle"),
                                "Chain-of-Thought/CoT_data.json": cot})


def test_the_original_toolkits_names_resolve_to_its_collection(hub):
    the_collection(hub)
    assert resolve_dataset("alpaca").path.as_posix().endswith("alpaca/alpaca_data_cleaned.json")
    sources = load_sources(DataOptions(data=["alpaca-belle-cot"]))
    assert [(s.name, s.records) for s in sources] == [("alpaca", 5), ("belle", 4), ("cot", 2)]
    assert sources[2].conversations[0][-1]["content"] == "3 = 2 + 1.\nSo the answer is yes."


def test_toolkit_readme_commands_with_a_local_checkpoint(hub, tiny_model, tmp_path, monkeypatch, capsys):
    """`uniform_finetune.py --model_type llama --data alpaca-belle-cot ...` then
    `generate.py --data alpaca-belle-cot --model_type llama`: the run is found by its data name."""
    the_collection(hub)
    monkeypatch.chdir(tmp_path)
    base = str(tiny_model("llama"))
    common = ["--model_type", "llama", "--model_name_or_path", base, "--data", "alpaca-belle-cot",
              "--lora_target_modules", "q_proj", "v_proj", "--per_gpu_train_batch_size", "4", "--max_steps", "1",
              "--cutoff_len", "64", "--compute_dtype", "fp32"]
    assert main(["train", *common]) == 0
    assert main(["train", *common, "--peft_type", "ia3"]) == 0
    newest = tmp_path / "saved_models" / "llama_alpaca-belle-cot" / "ia3"
    older = newest.parent / "lora"
    assert (older / "unift_run.json").is_file() and (newest / "unift_run.json").is_file()
    os.utime(older / "unift_run.json", (time.time() - 60, time.time() - 60))
    capsys.readouterr()
    assert main(["generate", "--data", "alpaca-belle-cot", "--model_type", "llama", "--prompt", "Hi?",
                 "--max_new_tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert f"using the newest, {Path('saved_models/llama_alpaca-belle-cot/ia3')}" in captured.err
    assert main(["generate", "--data", "alpaca", "--model_type", "llama", "--prompt", "Hi?"]) == 2
    assert "no run in saved_models/llama_alpaca/" in capsys.readouterr().err
