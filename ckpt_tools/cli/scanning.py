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
