"""Adapters from the Hugging Face hub: `--adapter_dir ORG/NAME[@REVISION]` becomes the snapshot folder in
the hub cache ($HF_HUB_CACHE), downloaded once and then read from the cache (with HF_HUB_OFFLINE=1, from the
cache only), the way unift.data.hub resolves hub datasets. A local folder always wins over a hub id."""

from __future__ import annotations

import re
from pathlib import Path

from unift.errors import UniftError

# ORG/NAME with the hub's characters, optionally @REVISION (a branch, tag or commit)
HUB_MODEL_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_adapter(value: str) -> tuple[str, str | None] | None:
    """(repo, revision) for a hub adapter id; None for what reads as a local path. Only the whole path
    existing makes ORG/NAME local: a folder ./ORG says nothing about ORG/NAME (`runs/missing` is then
    looked up on the hub, whose "no such folder" error names both readings)."""
    if value.startswith(("/", ".", "~")) or "\\" in value or Path(value).exists():
        return None
    match = HUB_MODEL_ID.match(value)
    return (match["repo"], match["revision"]) if match else None


def is_hub_adapter(value: str | None) -> bool:
    return bool(value) and parse_hub_adapter(value) is not None


def resolve_adapter_dir(value: str | None, flag: str = "--adapter_dir") -> str | None:
    """The local folder of an adapter: the folder itself, or the hub snapshot of ORG/NAME[@REVISION]."""
    if not value:
        return value
    parsed = parse_hub_adapter(value)
    if parsed is None:
        return value
    repo, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}" if revision else repo
    try:
        return snapshot_download(repo, revision=revision, repo_type="model")
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            # "no such folder" first: a mistyped local folder reads like a hub id
            raise UniftError(f"{flag} {value}: no such folder, and hub adapter {where} is not cached and "
                             "HF_HUB_OFFLINE=1; run once online to download it") from None
        raise UniftError(f"{flag} {value}: cannot reach the hub to download {where}") from None
    except GatedRepoError:
        raise UniftError(f"{flag} {value}: hub adapter {repo} is gated: accept its terms on the hub and log in "
                         "(`hf auth login`)") from None
    except RevisionNotFoundError:
        raise UniftError(f"{flag} {value}: hub adapter {repo} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise UniftError(f"{flag} {value}: no such folder, nor a model {repo} on the hub (or it is private: "
                         "log in)") from None
    except HfHubHTTPError as err:
        raise UniftError(f"{flag} {value}: downloading {where} failed: {str(err).splitlines()[0]}") from None
