"""The dataset registry: data/dataset_info.json maps names to files, formats and column mappings.

The layout is LLaMA-Factory's (file_name, formatting, columns, tags, num_samples), so users can bring
theirs unchanged: `--dataset_dir` points at the folder that holds it. Names not found there fall back to
the bundled registry. A --data entry that is a path to a file or a folder is used directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unift.data.formats import normalize_format
from unift.errors import UniftError

REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path  # a file or a folder of files
    formatting: str | None = None  # None: detected from the first record of each file
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    num_samples: int | None = None  # LLaMA-Factory's per-dataset cap


def default_dataset_dir() -> Path:
    local = Path("data")
    return local if (local / "dataset_info.json").exists() else REPO_DATA_DIR


def load_registry(dataset_dir: Path) -> dict[str, dict]:
    info = dataset_dir / "dataset_info.json"
    if not info.exists():
        return {}
    try:
        registry = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UniftError(f"{info}: invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(registry, dict):
        raise UniftError(f"{info}: expected an object mapping dataset names to entries")
    return registry


def _entry(name: str, raw: dict, dataset_dir: Path) -> DatasetEntry:
    where = f"{dataset_dir / 'dataset_info.json'}: {name!r}"
    if not isinstance(raw, dict):
        raise UniftError(f"{where}: expected an object")
    if raw.get("ranking"):
        raise UniftError(f"{where}: preference data (ranking) is not supported by supervised fine-tuning")
    if "file_name" not in raw:
        hub = next((f"{k} {raw[k]!r}" for k in HUB_KEYS if k in raw), None)
        if hub:
            raise UniftError(f"{where} is a hub dataset ({hub}); unift reads local files: download it and "
                             "set 'file_name'")
        raise UniftError(f"{where} has no 'file_name'")
    for key in ("columns", "tags"):
        if not isinstance(raw.get(key, {}), dict):
            raise UniftError(f"{where}: {key!r} must be an object")
    try:
        formatting = normalize_format(raw.get("formatting"))
    except UniftError as err:
        raise UniftError(f"{where}: {err}") from None
    if formatting == "sharegpt" and raw.get("tags", {}).get("role_tag") == "role":
        formatting = "messages"  # LLaMA-Factory spells OpenAI-style data as sharegpt with role/content tags
    num_samples = raw.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise UniftError(f"{where}: 'num_samples' must be a positive integer")
    return DatasetEntry(
        name=name, path=dataset_dir / raw["file_name"], formatting=formatting,
        columns=dict(raw.get("columns", {})), tags=dict(raw.get("tags", {})), num_samples=num_samples,
    )


def resolve_dataset(name_or_path: str, dataset_dir: Path | None = None) -> DatasetEntry:
    """A --data entry: a path to a file or folder, else a name in dataset_dir's registry, else a bundled name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return DatasetEntry(name=path.stem if path.is_file() else path.name, path=path)
    dataset_dir = dataset_dir or default_dataset_dir()
    if not dataset_dir.is_dir():
        raise UniftError(f"--dataset_dir {dataset_dir}: no such folder")
    registries = [(dataset_dir, load_registry(dataset_dir))]
    if dataset_dir.resolve() != REPO_DATA_DIR.resolve():
        registries.append((REPO_DATA_DIR, load_registry(REPO_DATA_DIR)))
    for folder, registry in registries:
        if name_or_path in registry:
            return _entry(name_or_path, registry[name_or_path], folder)
    known = ", ".join(sorted({n for _, r in registries for n in r})) or "none"
    raise UniftError(f"--data {name_or_path!r} is neither a file nor a registered dataset (known: {known})")
