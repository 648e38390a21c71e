"""Adapters from the hub: `--adapter_dir ORG/NAME[@REVISION]` resolves through the hub cache in every command,
offline from the cache; the test writes the cache in huggingface_hub's layout (models--ORG--NAME/refs/... +
snapshots/SHA/...) from run folders made here, and a hub id not in the cache is one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from after_training_helpers import run_folder

from unift.cli import main

PROMPT = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """publish(repo, folder, revision) copies an adapter folder into a fresh hub cache; offline throughout."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # the hub id must not be read as a local folder

    def publish(repo: str, folder: Path, revision: str = "main") -> Path:
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(sha)
        snapshot = root / "snapshots" / sha
        shutil.copytree(folder, snapshot)
        return snapshot

    return publish


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Two run folders of the same base, with different adapter weights."""
    base = tiny_model("llama")
    work = tmp_path_factory.mktemp("hub-adapters")
    return (run_folder(base, work / "one", "lora", perturb=0.05, template="chatml"),
            run_folder(base, work / "two", "lora", perturb=0.2, template="chatml"))


def logits(loaded) -> torch.Tensor:
    ids = loaded.tokenizer(loaded.template.render(PROMPT, True, loaded.tokenizer), return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def test_a_hub_adapter_loads_from_the_cache_with_its_revision(hub, adapters):
    from unift.loader import load

    one, two = adapters
    snapshot = hub("org/tiny-lora", one)
    hub("org/tiny-lora", two, revision="v2")
    from_hub = load("org/tiny-lora", device="cpu", dtype="fp32")
    assert from_hub.name == "org/tiny-lora" and from_hub.card.template == "chatml"
    assert torch.equal(logits(from_hub), logits(load(str(one), device="cpu", dtype="fp32")))
    assert torch.equal(logits(load("org/tiny-lora@v2", device="cpu", dtype="fp32")),
                       logits(load(str(two), device="cpu", dtype="fp32")))
    assert snapshot.is_dir()


def test_every_command_takes_a_hub_adapter(hub, adapters, tmp_path, capsys):
    one, _ = adapters
    hub("org/tiny-lora", one)
    assert main(["generate", "--adapter_dir", "org/tiny-lora", "--prompt", "hi", "--max_new_tokens", "3",
                 "--device", "cpu"]) == 0
    held_out = tmp_path / "test.json"
    held_out.write_text(json.dumps([{"instruction": "2+2?", "output": "4"}]), encoding="utf-8")
    assert main(["eval", "--adapter_dir", "org/tiny-lora", "--data", str(held_out), "--metrics", "ppl",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "eval_results.json").is_file()  # not written into the hub cache
    assert main(["predict", "--adapter_dir", "org/tiny-lora", "--input", str(held_out), "--result_dir",
                 str(tmp_path / "pred"), "--max_new_tokens", "2", "--device", "cpu"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", "org/tiny-lora", "--merged_dir", str(merged)]) == 0
    assert json.loads((merged / "unift_merged.json").read_text())["adapter_dir"] == "org/tiny-lora"


def test_not_cached_is_one_line(hub, capsys):
    code = main(["generate", "--adapter_dir", "nobody/nothing", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("unift: error: --adapter_dir nobody/nothing: no such folder, and hub adapter nobody/nothing is "
                   "not cached and HF_HUB_OFFLINE=1; run once online to download it\n")
    code = main(["merge", "--adapter_dir", "nobody/nothing@v3", "--merged_dir", "m"])
    assert code == 2 and "hub adapter nobody/nothing@v3 is not cached" in capsys.readouterr().err


def test_readme_says_what_is_true():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "--adapter_dir ORG/NAME[@REVISION]" in readme
    # the official internlm-7b ships its own modelling code; only Llama-layout conversions load natively
    assert "InternLM 1 and Qwen2 families load natively" not in readme
    assert "`internlm/internlm-7b` need it" in readme


def test_a_folder_named_like_the_org_does_not_make_a_hub_id_local(tmp_path, monkeypatch):
    """Only the whole path makes ORG/NAME a local folder: ./ORG existing (an `org/` of one's own runs, say)
    leaves org/tiny-lora a hub id."""
    from unift.models.hub import parse_hub_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "other-run").mkdir(parents=True)
    assert parse_hub_adapter("org/tiny-lora") == ("org/tiny-lora", None)
    assert parse_hub_adapter("org/tiny-lora@v2") == ("org/tiny-lora", "v2")
    assert parse_hub_adapter("org/other-run") is None  # the folder itself exists: local
    assert parse_hub_adapter("./org/tiny-lora") is None  # written as a path: a local folder, missing
