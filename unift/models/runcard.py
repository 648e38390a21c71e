"""The run card (unift_run.json): what every after-training command needs to use a run folder alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unift.errors import UniftError

RUN_CARD = "unift_run.json"
METRICS = "metrics.json"
# Written by `unift merge` beside the merged weights: the template and family the run was trained with,
# so `--model_name_or_path merged/` prompts exactly as the adapter did.
MERGED_CARD = "unift_merged.json"


@dataclass
class RunCard:
    model_type: str
    peft_type: str
    template: str | dict  # a built-in template's name, or a template file's definition (data.templates)
    base_model: str | None  # None = the embedded model, resolved on whatever machine reads the card
    trust_remote_code: bool = False
    quantization_bit: int | None = None
    compute_dtype: str = "fp32"
    base_dtype: str = "fp32"  # dtype of the frozen base weights during training
    versions: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)
    # per source: records used, skipped (which, why), dropped; and what --cutoff_len did: examples whose
    # front was cut ("truncated"), answers too long on their own ("long_answers": dropped or kept cut)
    data: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    created: str = ""
    # how it ran: engine (single, ddp, fsdp, deepspeed), world_size, nodes, each process's peak RSS (MiB)
    scaling: dict[str, Any] = field(default_factory=dict)
    stage: str = "sft"  # what trained the adapter (--stage): sft, dpo, orpo, simpo, kto
    # The folder holds the whole trained model (config.json, model.safetensors), not an adapter: methods
    # that train the model's own weights (full, freeze). Loaded from here; base_model is only its origin.
    holds_model: bool = False
    # --adapter_dir: the run this one started from (its folder, stage, method, creation time)
    parent: dict[str, Any] | None = None
    # --rope_scaling (TYPE:FACTOR; None: the checkpoint's own) and --attn_implementation the run trained with:
    # every command loads the run with them unless its own flag says otherwise (unift.models.overrides)
    rope_scaling: str | None = None
    attn_implementation: str | None = None

    def save(self, folder: Path) -> None:
        from unift.runtime import write_json_atomic

        write_json_atomic(Path(folder) / RUN_CARD, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> RunCard:
        path = Path(folder) / RUN_CARD
        if not Path(folder).is_dir():
            raise UniftError(f"{folder}: no such run folder")
        if not path.exists():
            raise UniftError(f"{folder}: neither {RUN_CARD} nor adapter_config.json here: not a run folder of "
                             "`unift train` nor a PEFT adapter folder")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UniftError(f"{path}: invalid JSON ({err.msg})") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- adapter folders that unift did not write (their cards: unift.peft.foreign) ------------------------

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_folder(adapter_dir: str | None, base_path: str) -> str:
    """Where the tokenizer is: the run folder (unift saves it there), else the base model's folder."""
    if adapter_dir and any((Path(adapter_dir) / name).is_file() for name in TOKENIZER_FILES):
        return adapter_dir
    return base_path


def read_merged_card(path: str) -> dict | None:
    """unift_merged.json of a folder written by `unift merge`; None for any other model folder."""
    card = Path(path) / MERGED_CARD
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ---- run folders by the original toolkit's naming ----------------------------------------------------

def data_label(data: list[str]) -> str:
    """The --data entries as one folder-name part: file names without their data suffix, hub ids without
    their owner (`alpaca-belle-cot`, `train+extra`, `Alpaca-CoT`)."""
    from unift.data.readers import DATA_SUFFIXES

    names = []
    for entry in data:
        path = Path(entry.split(":")[0].split("@")[0])
        names.append(path.stem if path.suffix.lower() in DATA_SUFFIXES else path.name)
    return "+".join(names)


def default_run_dir(model_type: str, data: list[str], peft_type: str) -> Path:
    """Where `unift train` (uniform_finetune.py) writes a run when --output_dir is not given."""
    return Path("saved_models") / f"{model_type}_{data_label(data)}" / peft_type


def find_run(data: list[str], model_type: str | None) -> str:
    """The run that `uniform_finetune.py --model_type T --data NAME` wrote to its default folder (the
    newest if several methods were trained): the original toolkit's `generate.py --data NAME --model_type T`."""
    import logging

    from unift.models import get_model_spec

    family = get_model_spec(model_type or "llama").name
    folder = default_run_dir(family, data, "x").parent
    cards = sorted(folder.glob(f"*/{RUN_CARD}"), key=lambda card: card.stat().st_mtime)
    if not cards:
        raise UniftError(f"--data {' '.join(data)} --model_type {family}: no run in {folder}/ (train one with "
                         f"`uniform_finetune.py --model_type {family} --data {' '.join(data)}`, or pass --lora_dir)")
    chosen = cards[-1].parent
    if len(cards) > 1:
        logging.getLogger("unift").info("%d runs in %s; using the newest, %s", len(cards), folder, chosen)
    return str(chosen)
