"""The scan every reading command starts with, with its progress bar."""

from __future__ import annotations

from .output import Output


def scan_roots(out: Output, roots, **kwargs):
    """``api.scan`` of ``roots``, a bar on stderr counting the checkpoints validated."""
    from .. import api
    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:   # the total is known once the first checkpoint is done
            bars.append(out.bar(total, "validating"))
        if bars[0] is not None:
            bars[0].update(1)

    try:
        return api.scan(*roots, progress=progress, **kwargs)
    finally:
        if bars and bars[0] is not None:
            bars[0].close()


def storage_line(storage) -> str:
    """What reading a bucket cost, for ``-v``: requests and bytes."""
    from ..report import size_str
    c = storage.counts
    return (f"storage: {c.requests} requests ({c.listings} listings, {c.reads} reads), "
            f"{size_str(c.bytes_read)} read")
