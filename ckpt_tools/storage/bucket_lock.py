"""The lock of a root in a bucket: an object created only where none is, refreshed while the
run lasts, taken over only when stale, released by a conditional delete.

A bucket has no ``flock`` and nothing is released when a process dies, so the lock is an
object (``<root>/.ckpt-tools.lock``) that names its run (host, pid, run id, when it was taken
and last refreshed), as restic's locks do:

- **taken** by a conditional create (``If-None-Match: *``): of two runs, the store lets one
  create it;
- **refreshed** every ``refresh_s`` (5 minutes) by a background thread, each rewrite
  conditional on the ETag of its own last one: a run whose lock was taken over finds out at
  its next refresh, and stops at the next checkpoint boundary (``lost``);
- **stale** when not refreshed for ``stale_s`` (30 minutes: six refreshes missed), then taken
  over only by a conditional delete naming the stale lock's ETag, then a conditional create:
  of two runs taking over one stale lock, one wins;
- **released** by a conditional delete naming its own ETag: a lock someone else holds now is
  never deleted.

A lock held by a live run: ``locking.LockHeld`` (exit 75), naming that run.

Once taken, the lock object proves that the store honours conditions, at the cost of two
requests a run: a second conditional create of it must be refused, and so must a delete of it
naming an ETag it does not have. A store that carries out either (it ignores conditions, as
older S3-compatible stores do) is refused with ``ConditionsIgnored`` (exit 2) before anything
else is done: every other promise of prune in a bucket rests on those conditions.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from .. import layout
from ..locking import LockHeld
from .conditional import ConditionalStore, ConditionsIgnored, PreconditionFailed

REFRESH_S = 300.0
STALE_S = 1800.0
_POLL_S = 1.0
#: an ETag no object has: a delete naming it must be refused
_NO_SUCH_ETAG = '"00000000000000000000000000000000"'


class BucketLock:
    """The lock object at ``path`` (``bucket/root/.ckpt-tools.lock``) for the run ``run_id``.
    ``clock`` gives the time written into the lock and compared with a lock found
    (``stale_s``); tests pass their own, and short ``refresh_s``."""

    def __init__(self, store: ConditionalStore, path: str, run_id: str, *,
                 clock: Callable[[], float] = time.time, refresh_s: float = REFRESH_S,
                 stale_s: float = STALE_S, url: str | None = None):
        self.store, self.path, self.run_id = store, path, run_id
        self.url = url or path
        self.clock, self.refresh_s, self.stale_s = clock, refresh_s, stale_s
        self.etag: str | None = None
        self.taken_at = 0.0
        self.lost: str | None = None     # why this run no longer holds it, once it does not
        self.took_over: dict | None = None   # the stale lock this run took over, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        now = self.clock()
        return json.dumps({"tool": "ckpt-tools", "run_id": self.run_id,
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "taken": _iso(self.taken_at), "refreshed": _iso(now),
                           "refreshed_epoch": now}, indent=1).encode()

    def acquire(self, timeout: float = 0.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for a live run to let it go;
        ``LockHeld`` then. Starts the refreshing thread."""
        deadline = time.monotonic() + timeout
        while True:
            self.taken_at = self.clock()
            try:
                self.etag = self.store.create(self.path, self.body())
                break
            except PreconditionFailed:
                pass
            held = self._take_over_if_stale()
            if held is None:
                continue   # it was stale and is gone, or gone by itself: create again
            if time.monotonic() >= deadline:
                raise LockHeld(f"{self.url} ({_holder(held)})", timeout)
            sleep(min(_POLL_S, max(deadline - time.monotonic(), 0)))
        self._prove_conditions()
        if self.refresh_s > 0:
            self._thread = threading.Thread(target=self._refreshing, daemon=True,
                                            name="ckpt-tools lock refresh")
            self._thread.start()

    def _prove_conditions(self) -> None:
        """The store refuses a create where the lock is, and a delete of it naming an ETag it
        does not have; else ``ConditionsIgnored`` (the lock let go first, where it still is)."""
        ignored = None
        try:
            self.etag = self.store.create(self.path, self.body())   # overwrote its own lock
            ignored = "If-None-Match: * on PUT"
        except PreconditionFailed:
            pass
        try:
            self.store.delete(self.path, _NO_SUCH_ETAG)
            ignored, self.etag = "If-Match on DELETE", None           # its own lock is gone
        except PreconditionFailed:
            pass
        if ignored is not None:
            self.release()
            raise ConditionsIgnored(f"{self.url}: the store ignored a conditional request "
                                    f"({ignored}): prune cannot keep its promises here")

    def _take_over_if_stale(self) -> dict | None:
        """The lock found, when it is live; None when there is none now (it was stale and
        this run deleted it, or its run released it meanwhile)."""
        try:
            data, etag, modified = self.store.get(self.path)
        except FileNotFoundError:
            return None
        held = _parsed(data)
        refreshed = held.get("refreshed_epoch")
        if not isinstance(refreshed, (int, float)):
            refreshed = modified   # a lock this version did not write: the store's time
        if self.clock() - refreshed <= self.stale_s:
            return held
        try:
            self.store.delete(self.path, etag)   # only that stale lock, not a fresh one
        except PreconditionFailed:
            return held   # refreshed or taken over meanwhile: live
        except FileNotFoundError:
            return None
        self.took_over = held
        return None

    def refresh(self) -> None:
        """Rewrite the lock with the time now, conditional on its own last ETag; ``lost``
        says why when the store refuses (another run took it over)."""
        if self.lost is not None or self.etag is None:
            return
        try:
            self.etag = self.store.replace(self.path, self.body(), self.etag)
        except (PreconditionFailed, FileNotFoundError):
            self.lost = (f"{self.url}: the lock was taken over by another run (it was not "
                         "refreshed in time)")
        except OSError as exc:
            # the store failed once: the lock stays ours until it is stale; try again next time
            if self.clock() - self.taken_at > self.stale_s:
                self.lost = f"{self.url}: the lock could not be refreshed: {exc.strerror or exc}"

    def _refreshing(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()
            if self.lost is not None:
                return

    def release(self) -> None:
        """Stop refreshing and delete the lock, only if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.etag is not None:
            try:
                self.store.delete(self.path, self.etag)
            except (PreconditionFailed, FileNotFoundError, OSError):
                pass   # not ours any more, or the store failed: it goes stale by itself
        self.etag = None

    def __enter__(self) -> BucketLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path_of(root_path: str) -> str:
    """The lock object of a root (a path of the file system: ``bucket/runs``)."""
    return f"{root_path}/{layout.LOCK_FILE}"


def _parsed(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _holder(held: dict) -> str:
    """Who holds the lock, for the message: host, pid, run and last refresh."""
    parts = [f"{k} {held[k]}" for k in ("host", "pid", "run_id") if held.get(k) is not None]
    if held.get("refreshed"):
        parts.append(f"refreshed {held['refreshed']}")
    return ", ".join(parts) or "a lock object this version did not write"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


__all__ = ["BucketLock", "lock_path_of", "REFRESH_S", "STALE_S"]
