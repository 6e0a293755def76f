"""What a checkpoint's strip marker (``layout.STRIP_MARKER``) says, read and written as JSON.

The marker is written before the first file of a strip goes (state ``stripping``, with the
files it is removing) and rewritten once the last is gone (state ``stripped``, with what was
removed). Torch-free and small: the validator reads it for every checkpoint that has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import checkpoint_reads as reads

STRIPPING = "stripping"
STRIPPED = "stripped"
# A marker small enough for any strip: a checkpoint's resume-only files are a handful.
_MAX_MARKER_BYTES = 1 << 20


@dataclass(frozen=True)
class StripMarker:
    """``state`` is STRIPPING or STRIPPED; ``files`` ((relpath, bytes), ...) is what the strip
    was removing (STRIPPING) or removed (STRIPPED); ``started``/``finished`` ISO times;
    ``directory_times_ns`` (STRIPPING): the checkpoint directory's (atime, mtime) before the
    strip, which a run that finishes an interrupted strip sets back."""

    state: str
    files: tuple[tuple[str, int], ...]
    started: str = ""
    finished: str = ""
    by: str = ""
    directory_times_ns: tuple[int, int] | None = None

    @property
    def finished_strip(self) -> bool:
        return self.state == STRIPPED

    def to_json(self) -> bytes:
        listed = [{"path": p, "bytes": b} for p, b in self.files]
        doc: dict = {"state": self.state}
        if self.state == STRIPPED:
            doc |= {"removed": listed, "started": self.started, "finished": self.finished}
        else:
            doc |= {"removing": listed, "started": self.started}
            if self.directory_times_ns is not None:
                doc["directory_times_ns"] = list(self.directory_times_ns)
        doc["by"] = self.by
        return (json.dumps(doc, indent=2) + "\n").encode()


def parse_marker(raw: bytes) -> StripMarker | str:
    """The marker in ``raw``, or why it cannot be read (a torn write, another tool's file)."""
    if len(raw) > _MAX_MARKER_BYTES:
        return f"larger than {_MAX_MARKER_BYTES} bytes"
    doc = reads.parse_json(raw, None)
    if isinstance(doc, str):
        return doc
    state = doc.get("state")
    listed = doc.get("removed" if state == STRIPPED else "removing")
    if state not in (STRIPPING, STRIPPED) or not isinstance(listed, list):
        return "not a strip marker of ckpt-tools (no state and file list)"
    files = []
    for item in listed:
        path = item.get("path") if isinstance(item, dict) else None
        size = item.get("bytes") if isinstance(item, dict) else None
        if not isinstance(path, str) or type(size) is not int:
            return "a listed file lacks its path or bytes"
        files.append((path, size))
    text = {k: v if isinstance(v, str) else "" for k, v in
            ((k, doc.get(k)) for k in ("started", "finished", "by"))}
    times = doc.get("directory_times_ns")
    if not (isinstance(times, list) and len(times) == 2 and all(type(t) is int for t in times)):
        times = None
    return StripMarker(state, tuple(files), text["started"], text["finished"], text["by"],
                       None if times is None else (times[0], times[1]))


def read_marker(path: str, file_size: int | None = None, storage=None) -> StripMarker | str:
    """The marker at ``path``, or why it cannot be read; OSError where it cannot be opened.
    ``storage``: the object storage it is in (``checkpoint_reads.read_json_bytes``)."""
    return parse_marker(reads.read_json_bytes(path, file_size, storage))


__all__ = ["StripMarker", "STRIPPING", "STRIPPED", "parse_marker", "read_marker"]
