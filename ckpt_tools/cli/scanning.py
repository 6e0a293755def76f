"""The scan every reading command starts with, with its progress bar."""

from __future__ import annotations

from .output import Output


def scan_roots(out: Output, roots, **kwargs):
    """``api.scan`` of ``roots``, a bar on stderr counting the checkpoints validated."""
    from .. import api
    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:   # the total is known once the first checkpoint is done
            bars.append(out.bar(total, "validating", "checkpoint"))
        if bars[0] is not None:
            bars[0].update(1)

    try:
        return api.scan(*roots, progress=progress, **kwargs)
    finally:
        if bars and bars[0] is not None:
            bars[0].close()


def with_storage_counts(doc: dict, storage) -> dict:
    """``doc`` (audit's or validate's JSON) with what reading the bucket cost: in all, and
    per checkpoint (its own reads; the run's trainer_state.json counts in the total only)."""
    for c in doc["checkpoints"]:
        counts = storage.by_checkpoint.get((c["root"], c["path"]))
        c["storage"] = None if counts is None else counts.to_dict()
    return doc | {"storage": storage.counts.to_dict()}


def storage_line(storage) -> str:
    """What reading a bucket cost, for ``-v``: requests and bytes."""
    from ..report import size_str
    c = storage.counts
    return (f"storage: {c.requests} requests ({c.listings} listings, {c.reads} reads), "
            f"{size_str(c.bytes_read)} read")
