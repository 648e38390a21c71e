"""Datasets on the Hugging Face hub, read as local files.

`--data ORG/NAME` (optionally `ORG/NAME/PATH` for a file or folder inside the repository, `:SUBSET` and
`@SPLIT`), and registry entries with LLaMA-Factory's `hf_hub_url` (with its `subset`, `split` and `folder`
keys; `file_name` names a file inside the repository). The files are fetched with huggingface_hub on first
use and kept in its cache ($HF_HUB_CACHE); with HF_HUB_OFFLINE=1 the same call answers from that cache.
`datasets.load_dataset` is not used for this on purpose: offline it ignores the hub cache and only reuses
its own processed copies. The files then go through unift's own readers, like any local file.

Which files make a subset and a split, without running the dataset's loading script: a subset is a folder
of that name (or files named after it); a split is picked by its name in the file path (`train-0000.parquet`,
`data/validation.jsonl`); files that name no split are all the train split.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from unift.data.readers import DATA_SUFFIXES
from unift.errors import UniftError

# ORG/NAME[/PATH][:SUBSET][@SPLIT], optionally written as hf://datasets/ORG/NAME...
HUB_ID = re.compile(r"^(?:hf://datasets/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<path>[^:@]+))?"
                    r"(?::(?P<subset>[^:@/]+))?(?:@(?P<split>[\w.-]+))?$")
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")


@dataclass(frozen=True)
class HubSpec:
    repo: str
    path: str | None = None  # a file or folder inside the repository
    subset: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return (self.repo + (f"/{self.path}" if self.path else "") + (f":{self.subset}" if self.subset else "")
                + (f"@{self.split}" if self.split != "train" else ""))


def parse_hub_id(text: str) -> HubSpec | None:
    """A hub dataset id, or None when the text reads as a local path (that then does not exist)."""
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    match = HUB_ID.match(text)
    if not match:
        return None
    repo, path = match["repo"], match["path"]
    owner, name = repo.split("/")
    if Path(owner).is_dir() or (path is None and name.lower().endswith(DATA_SUFFIXES)):
        return None  # `data/missing.json`: a local file that is not there, not a repository
    return HubSpec(repo, path.strip("/") if path else None, match["subset"], match["split"] or "train")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(spec: HubSpec, label: str) -> Path:
    """The local snapshot folder holding the wanted files (downloaded once, then from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = None  # the whole repository
    if spec.path:
        patterns = [spec.path, f"{spec.path}/*", f"{spec.path}/**"]
    elif spec.subset:
        patterns = [f"{spec.subset}/**", f"**/{spec.subset}/**", f"*{spec.subset}*", f"**/*{spec.subset}*"]
    try:
        return Path(snapshot_download(spec.repo, repo_type="dataset", allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if _offline():
            raise UniftError(f"{label}: hub dataset {spec.repo} is not cached and HF_HUB_OFFLINE=1; run once "
                             "online to download it") from None
        raise UniftError(f"{label}: cannot reach the hub to download {spec.repo}") from None
    except GatedRepoError:
        raise UniftError(f"{label}: hub dataset {spec.repo} is gated: accept its terms on the hub and log in "
                         "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UniftError(f"{label}: no dataset {spec.repo} on the hub (or it is private: log in)") from None
    except HfHubHTTPError as err:
        raise UniftError(f"{label}: downloading {spec.repo} failed: {str(err).splitlines()[0]}") from None


def _split_of(relative: str) -> str | None:
    parts = re.split(r"[/_.\-]", relative.lower())
    return next((s for s in SPLIT_NAMES if s in parts), None)


def select_files(root: Path, spec: HubSpec, label: str) -> list[Path]:
    """The data files of the wanted subset and split inside a snapshot folder."""
    base = root / spec.path if spec.path else root
    if not base.exists():
        where = "in the cache (HF_HUB_OFFLINE=1)" if _offline() else "in the repository"
        raise UniftError(f"{label}: {spec.path} not found {where} of hub dataset {spec.repo}")
    if base.is_file():
        return [base]
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(base).parts))
    if spec.subset:
        in_folder = [f for f in files if spec.subset in f.relative_to(base).parts[:-1]]
        named = [f for f in files if spec.subset in re.split(r"[/_.\-]", f.relative_to(base).as_posix())]
        files = in_folder or named
        if not files:
            raise UniftError(f"{label}: hub dataset {spec.repo} has no subset {spec.subset!r} (no folder or file "
                             "of that name)")
    if not files:
        raise UniftError(f"{label}: hub dataset {spec.repo} has no data files ({', '.join(DATA_SUFFIXES)})")
    splits = {f: _split_of(f.relative_to(base).as_posix()) for f in files}
    if any(splits.values()):
        chosen = [f for f, s in splits.items() if s == spec.split or (s is None and spec.split == "train")]
    else:
        chosen = files if spec.split == "train" else []
    if not chosen:
        found = sorted({s or "train" for s in splits.values()})
        raise UniftError(f"{label}: hub dataset {spec.repo} has no split {spec.split!r} (found: {', '.join(found)})")
    return chosen


def as_one_path(files: list[Path], root: Path) -> Path:
    """One --data path for the files: the file itself, their folder when it holds nothing else, or else a
    folder of links to them (kept beside unift's other caches)."""
    if len(files) == 1:
        return files[0]
    from unift.runtime import cache_dir

    folder = files[0].parent
    siblings = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
    if sorted(siblings) == sorted(files):
        return folder
    digest = hashlib.sha256("\n".join(str(f) for f in files).encode()).hexdigest()[:16]
    view = cache_dir() / "hub-views" / digest
    view.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = view / file.relative_to(root).as_posix().replace("/", "__")
        if not link.exists():
            os.symlink(file, link)
    return view


def hub_path(spec: HubSpec, label: str) -> Path:
    """A local file or folder with the hub dataset's wanted files."""
    root = download(spec, label)
    return as_one_path(select_files(root, spec, label), root)
