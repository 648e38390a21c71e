"""The dataset registry: data/dataset_info.json maps names to files, formats and column mappings.

The layout is LLaMA-Factory's (file_name, formatting, columns, tags, num_samples, and hf_hub_url with
subset, split and folder for hub datasets), so users can bring theirs unchanged: `--dataset_dir` points at
the folder that holds it. Names not found there fall back to the bundled registry. A --data entry that is a
path to a file or a folder is used directly; one that reads ORG/NAME is a hub dataset (unift.data.hub).
unift adds one key: `combine`, a list of names trained together as one entry (the original toolkit's
`alpaca-belle-cot` is alpaca + belle + cot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unift.data.hub import HubSpec, hub_path, parse_hub_id
from unift.data.layouts import normalize_format
from unift.errors import UniftError

REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
HUB_KEYS = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")  # other sources than the HF hub


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
    if "file_name" not in raw and "hf_hub_url" not in raw:
        hub = next((f"{k} {raw[k]!r}" for k in HUB_KEYS if k in raw), None)
        if hub:
            raise UniftError(f"{where} is not on the Hugging Face hub ({hub}); unift reads local files and "
                             "hf_hub_url datasets: download it and set 'file_name'")
        raise UniftError(f"{where} has no 'file_name' (or 'hf_hub_url')")
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
    if "hf_hub_url" in raw:
        spec = HubSpec(raw["hf_hub_url"], raw.get("file_name") or raw.get("folder"), raw.get("subset"),
                       raw.get("split") or "train")
        path = hub_path(spec, f"--data {name}")
    else:
        path = dataset_dir / raw["file_name"]
    return DatasetEntry(
        name=name, path=path, formatting=formatting,
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
    spec = parse_hub_id(name_or_path)
    if spec is not None:
        return DatasetEntry(name=spec.path.rsplit("/", 1)[-1].split(".")[0] if spec.path else
                            spec.repo.split("/")[1], path=hub_path(spec, f"--data {name_or_path}"))
    known = ", ".join(sorted({n for _, r in registries for n in r})) or "none"
    raise UniftError(f"--data {name_or_path!r} is neither a file, a registered dataset nor a hub dataset id "
                     f"(ORG/NAME) (known names: {known})")


def _registries(dataset_dir: Path | None) -> list[tuple[Path, dict[str, dict]]]:
    dataset_dir = dataset_dir or default_dataset_dir()
    found = [(dataset_dir, load_registry(dataset_dir))] if dataset_dir.is_dir() else []
    if not found or dataset_dir.resolve() != REPO_DATA_DIR.resolve():
        found.append((REPO_DATA_DIR, load_registry(REPO_DATA_DIR)))
    return found


def expand_names(names: list[str], dataset_dir: Path | None = None) -> list[str]:
    """--data entries with registry `combine` entries replaced by the names they list."""
    out: list[str] = []
    for name in names:
        raw = next((r[name] for _, r in _registries(dataset_dir) if name in r), None)
        parts = raw.get("combine") if isinstance(raw, dict) else None
        if parts is None:
            out.append(name)
        elif not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p != name for p in parts):
            raise UniftError(f"dataset_info.json: {name!r}: 'combine' must be a list of other dataset names")
        else:
            out += expand_names(parts, dataset_dir)
    return out
