"""The dataset registry: data/dataset_info.json maps names to files, formats and column mappings.

The layout follows LLaMA-Factory's dataset_info.json (file_name, formatting, columns) so that users can
bring theirs unchanged. A --data entry that is a path to a file is used directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unift.errors import UniftError

REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path
    formatting: str | None = None
    columns: dict = field(default_factory=dict)


def default_dataset_dir() -> Path:
    local = Path("data")
    return local if (local / "dataset_info.json").exists() else REPO_DATA_DIR


def load_registry(dataset_dir: Path) -> dict[str, dict]:
    info = dataset_dir / "dataset_info.json"
    if not info.exists():
        return {}
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UniftError(f"{info}: invalid JSON at line {err.lineno} ({err.msg})") from None


def resolve_dataset(name_or_path: str, dataset_dir: Path | None = None) -> DatasetEntry:
    dataset_dir = dataset_dir or default_dataset_dir()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return DatasetEntry(name=path.stem, path=path)
    registry = load_registry(dataset_dir)
    if name_or_path in registry:
        entry = registry[name_or_path]
        if "file_name" not in entry:
            raise UniftError(f"{dataset_dir / 'dataset_info.json'}: {name_or_path!r} has no 'file_name'")
        return DatasetEntry(
            name=name_or_path, path=dataset_dir / entry["file_name"],
            formatting=entry.get("formatting"), columns=entry.get("columns", {}),
        )
    known = ", ".join(sorted(registry)) or "none"
    raise UniftError(f"--data {name_or_path!r} is neither a file nor a registered dataset (known in {dataset_dir}: {known})")
