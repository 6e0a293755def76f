"""The memos of one scan: what its readers and its validator learnt from the bytes they read.

The checkpoints of a run repeat the same configs, headers and pickles byte for byte, so a
scan that remembers what it concluded from those bytes judges the next checkpoint from its
reads alone. Every such memo lives in one ``ReadCache``, owned by one scan (``api.scan``
creates one per call unless given its own) and passed down explicitly; the library keeps
no memo at module level. ``cache=None`` anywhere means no memo: every file is read and
judged afresh. A verdict never depends on the cache (tests/test_read_cache_differential.py
proves it on every fixture, the parser corpora and mutated sibling runs).

Sharing: one cache may serve several threads (each memo's get and put is atomic: dict
operations under the GIL, ``BoundedMemo`` under its lock; a memo dropped whole when full is
replaced, never half-cleared). A forked worker process inherits a copy of its parent's cache
as it was at the fork; what the child adds stays in the child. Nothing here is pickled.

Every entry is keyed by the bytes (or the parsed objects, kept alive by the entry so their
ids stay theirs) it was computed from, never by a path alone: a path says where to look,
not what is there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Entries a plain dict memo holds before it is dropped and started again.
MAX_ENTRIES = 16384


def bounded_put(memo: dict, key, value, most: int = MAX_ENTRIES) -> None:
    """``memo[key] = value``, dropping the whole memo first when it holds ``most`` entries
    (one atomic step under threads, unlike popping the oldest entry)."""
    if len(memo) >= most:
        memo.clear()
    memo[key] = value


class BoundedMemo:
    """A bounded, thread-safe LRU map: at most ``max_entries`` entries, and at most
    ``max_weight`` in total of the weights given to ``put`` (an estimate of bytes held)."""

    def __init__(self, max_entries: int, max_weight: int):
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.weight = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found[0]
        return None

    def put(self, key, value, weight: int) -> None:
        if weight > self.max_weight // 8:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, weight)
            self.weight += weight
            while len(self._entries) > self.max_entries or self.weight > self.max_weight:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.weight -= dropped

    def recent(self) -> list:
        """The keys, most recently used first."""
        with self._lock:
            return list(reversed(self._entries))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.weight = 0


class ArchiveMemo:
    """Whole small torch.save archives judged before (``formats.torchsave``): per file size,
    the byte ranges their checks depend on, and per (ranges, options, those bytes) the result."""

    MAX_ARCHIVES = 1024
    MAX_BYTES = 32 << 20
    MAX_RANGES_PER_SIZE = 4

    def __init__(self) -> None:
        self.ranges: dict[int, list] = {}   # file size → [torchsave.zip_archive.ArchiveRanges], newest first
        self.results: dict[tuple, object] = {}  # (ranges id, options, kept bytes) → TorchFileInfo
        self.weight = 0                     # bytes held by the keys of ``results``, about
        self._next_ident = 0

    def new_ident(self) -> int:
        self._next_ident += 1
        return self._next_ident

    def __len__(self) -> int:
        return len(self.results)

    def clear(self) -> None:
        self.ranges.clear()
        self.results.clear()
        self.weight = 0


class ReadCache:
    """Every memo one scan keeps; one per scan, passed as ``cache=``.

    Format readers: ``pickles`` (torch.save pickle evaluations, keyed by the pickle bytes),
    ``legacy_runs`` (lengths of the legacy files' pickle runs met last), ``archives`` (whole
    small zip archives), ``headers`` (parsed safetensors headers, keyed by the header bytes and
    file size). Validator: ``json`` (parsed configs by their bytes), ``header_hints`` (per
    relpath, the header last read there: the size of the next first read), ``shapes`` (what a
    set of relpaths decides), ``checks`` (pure checks of parsed objects), ``torch_tokens`` /
    ``token_of`` (one object per distinct torch.save content), ``recipes`` (``replay``).
    """

    def __init__(self) -> None:
        self.pickles = BoundedMemo(max_entries=4096, max_weight=64 << 20)
        self.legacy_runs = BoundedMemo(max_entries=16, max_weight=1 << 20)
        self.archives = ArchiveMemo()
        self.headers: dict = {}
        self.json: dict = {}
        self.header_hints: dict = {}
        self.shapes: dict = {}
        self.checks: dict = {}
        self.torch_tokens: dict = {}
        self.token_of: dict = {}
        self.recipes: dict = {}

    def clear(self) -> None:
        """Forget everything, as a new cache would."""
        self.pickles.clear()
        self.legacy_runs.clear()
        self.archives.clear()
        for memo in (self.headers, self.json, self.header_hints, self.shapes, self.checks,
                     self.torch_tokens, self.token_of, self.recipes):
            memo.clear()


__all__ = ["ReadCache", "BoundedMemo", "ArchiveMemo", "bounded_put", "MAX_ENTRIES"]
