"""The run card (unift_run.json): what every after-training command needs to use a run folder alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unift.errors import UniftError

RUN_CARD = "unift_run.json"
METRICS = "metrics.json"


@dataclass
class RunCard:
    model_type: str
    peft_type: str
    template: str
    base_model: str | None  # None = the embedded model, resolved on whatever machine reads the card
    trust_remote_code: bool = False
    quantization_bit: int | None = None
    compute_dtype: str = "fp32"
    base_dtype: str = "fp32"  # dtype of the frozen base weights during training
    versions: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # per source: records used, skipped (which, why), dropped
    command: str = ""
    created: str = ""

    def save(self, folder: Path) -> None:
        from unift.runtime import write_json_atomic

        write_json_atomic(Path(folder) / RUN_CARD, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> RunCard:
        path = Path(folder) / RUN_CARD
        if not Path(folder).is_dir():
            raise UniftError(f"{folder}: no such run folder")
        if not path.exists():
            raise UniftError(f"{folder}: no {RUN_CARD} here; is it a folder written by `unift train`?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UniftError(f"{path}: invalid JSON ({err.msg})") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
