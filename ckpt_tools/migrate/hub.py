"""A hub model id resolved from the local Hugging Face cache only: migrate never uses the network."""

from __future__ import annotations


class NotCached(LookupError):
    """``repo_id`` names no model in the local cache; ``why`` is None where it is no hub id at
    all (a path, or more than one '/'), else the kind of error the hub raised."""

    def __init__(self, repo_id: str, why: str | None):
        super().__init__(repo_id)
        self.why = why


def cached_snapshot(repo_id: str) -> str:
    """The local directory of ``repo_id``'s snapshot in the Hugging Face cache."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        raise NotCached(repo_id, None)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the hub raises several kinds for "not cached"
        raise NotCached(repo_id, type(exc).__name__) from None
