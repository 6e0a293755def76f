"""``prune`` on roots in a bucket: what the command adds there to the plan and the execution of
``prune`` (``cli/prune.py`` stays the command; this module is imported only for URLs).

A session holds what one run needs of the bucket: the scan's ``ObjectStorage``, its
conditional requests, the run's id, the lock object of each root, and whether each root's
bucket keeps versions (then a delete frees nothing: it adds a delete marker).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from ..errors import UsageError
from ..prune.bucket import Bucket, BucketRevalidator, execute_in_bucket, hidden_bytes, with_etags
from ..prune.plan import plan_prune
from ..prune.proof import ContentProof
from ..prune.result import DELETE, SKIP, PruneEvent
from ..report import prune_where, size_str
from ..storage import is_url, open_storage
from ..storage.bucket_lock import BucketLock, lock_path_of
from ..storage.conditional import ConditionalStore, refuse_unless_conditional, split_key
from ..storage.intent import finish, pending
from ..storage.remote import cause_of
from .output import Output

_VERSIONED = ("Enabled", "Suspended")


def open_bucket_roots(roots, storage_options: dict, *, lock_path) -> BucketSession:
    """The session of roots given as URLs; ``UsageError`` (exit 2) for a store without
    conditional deletes and for ``--lock PATH``."""
    for root in filter(is_url, roots):
        refuse_unless_conditional(root.split("://", 1)[0], root)
    if lock_path is not None:
        raise UsageError(f"{roots[0]}: --lock names a local file; a root in a bucket is "
                         "locked by its own lock object (ROOT/.ckpt-tools.lock)")
    roots, storage = open_storage(roots, storage_options)
    paths = [(r, storage.root_path(r)) for r in roots]
    for a, pa in paths:
        for b, pb in paths:
            if a != b and pa != pb and pb.startswith(pa + "/"):
                raise UsageError(f"root {b} lies inside root {a}: give only {a}")
    once: dict[str, str] = {}   # one root per path: "s3://b/runs" and "s3://b/runs/" are one
    for r, p in paths:
        once.setdefault(p, r)
    return BucketSession(tuple(once.values()), storage)


class BucketSession:
    """One prune run's bucket (see the module's docstring)."""

    def __init__(self, roots: tuple[str, ...], storage):
        self.roots = roots
        self.storage = storage
        self.store = ConditionalStore(storage.fs, counted=storage.count_request)
        self.run_id = uuid.uuid4().hex
        self.locks: list[BucketLock] = []
        self._hides: dict[str, str] = {}   # bucket → why its deletes free nothing ("": they do)

    @contextlib.contextmanager
    def locked(self, timeout: float, exclusive: bool) -> Iterator[None]:
        """Hold each root's lock object (``exclusive``), or nothing (a dry run: a bucket has no
        shared lock; a dry run reads and writes nothing)."""
        if not exclusive:
            yield
            return
        try:
            for root in sorted(self.roots):
                path = lock_path_of(self.storage.root_path(root))
                lock = BucketLock(self.store, path, self.run_id,
                                  url=f"{root.rstrip('/')}/{path.rsplit('/', 1)[1]}")
                try:
                    lock.acquire(timeout)
                except OSError as exc:   # no such bucket, no credentials, no endpoint
                    raise UsageError(f"{root}: cannot take the lock {lock.url}: "
                                     f"{exc.strerror or exc}") from None
                self.locks.append(lock)
            yield
        finally:
            for lock in reversed(self.locks):
                lock.release()
            self.locks.clear()

    def lost_lock(self) -> str | None:
        """Why this run must start no other checkpoint: a lock of it was taken over."""
        return next((lock.lost for lock in self.locks if lock.lost is not None), None)

    def hides(self, root: str) -> str:
        """Why a delete under ``root`` frees no byte (its bucket keeps versions), or ""."""
        bucket, _ = split_key(self.storage.root_path(root))
        if bucket not in self._hides:
            try:
                status = self.store.versioning(bucket)
            except OSError as exc:
                self._hides[bucket] = (f"cannot tell whether bucket {bucket} keeps versions "
                                       f"({exc.strerror or exc}): no byte is counted as freed")
            else:
                self._hides[bucket] = (f"versioning is {status.lower()} in bucket {bucket}: a "
                                       "delete only adds a delete marker"
                                       if status in _VERSIONED else "")
        return self._hides[bucket]

    def bucket(self) -> Bucket:
        return Bucket(self.storage, self.store, self.run_id,
                      hides=frozenset(r for r in self.roots if self.hides(r)))

    def finish_interrupted(self, out: Output, log, multi_root: bool) -> None:
        """Finish the intent records that killed runs left under the roots (before the scan,
        under the lock): a line for each, and a log line per object."""
        for root in self.roots:
            root_path = self.storage.root_path(root)
            for record in self._pending(root):
                try:
                    done = finish(self.store, record)
                except OSError as exc:   # the plan judges what is there now: safe to go on
                    out.error(f"{record}: cannot finish this intent record of a killed run: "
                              f"{exc.strerror or exc}")
                    continue
                _report_finished(out, log, root, root_path, done, multi_root)

    def _pending(self, root: str) -> list[str]:
        """The intent records under ``root``; a store that cannot be listed (no bucket, no
        credentials, no endpoint) is one line, exit 2, as the scan's listing says it."""
        try:
            return pending(self.storage.fs, self.storage.root_path(root))
        except Exception as exc:  # noqa: BLE001 - the store's own errors, s3fs translates some
            raise UsageError(f"{root}: cannot list: {cause_of(exc)}") from None

    def pending_note(self) -> list[str]:
        """For a dry run, or a run without --yes: the intent records a run with --yes
        finishes first."""
        notes = []
        for root in self.roots:
            n = len(self._pending(root))
            if n:
                notes.append(f"{root}: a killed prune left {n} intent record"
                             f"{'s' if n != 1 else ''}: a run with --yes finishes "
                             f"{'it' if n == 1 else 'them'} first")
        return notes


def _report_finished(out: Output, log, root: str, root_path: str, done, multi_root: bool) -> None:
    def rel(path: str) -> str:
        return path[len(root_path) + 1:] if path.startswith(root_path + "/") else path

    what = (f"finished the interrupted prune run {done.intent.run_id} in "
            f"{prune_where(root, done.intent.checkpoint, multi_root)}"
            if done.intent is not None else f"dropped the intent record {done.record}")
    if done.dropped:
        out.say(f"{what}: {done.dropped}")
        return
    freed = sum(n for _, n in done.deleted)
    out.say(f"{what}: {len(done.deleted)} deleted now ({size_str(freed)}), "
            f"{len(done.gone)} deleted before it was killed, {len(done.kept)} kept")
    for path, why in done.kept:
        out.say(f"skipped: {prune_where(root, rel(path), multi_root)}: {why}")
    if log is None:
        return
    for path, nbytes in done.deleted:
        log.record(PruneEvent(DELETE, root, rel(path), nbytes,
                              f"finishing the interrupted run {done.intent.run_id}"))
    for path, why in done.kept:
        log.record(PruneEvent(SKIP, root, rel(path), 0, why))


def plan_in_bucket(checkpoints, session: BucketSession):
    """``plan_prune`` proven through the storage (one process: the store's round trips are
    the cost), each deletion with its ETag."""
    plan = plan_prune(checkpoints, prove=ContentProof(storage=session.storage), jobs=1)
    return with_etags(plan, session.bucket())


def hidden_note(plan, session: BucketSession, retention=None) -> list[str]:
    """One line per root whose deletes free nothing (a versioned bucket), with the bytes (of
    prune's plan and of ``retention``, a ``BucketRetention``)."""
    bucket = session.bucket()
    return [f"{root}: {session.hides(root)}: {size_str(n)} stay, hidden behind delete "
            "markers; the bucket's lifecycle rules free them"
            for root in session.roots
            if (n := hidden_bytes(plan, bucket, root)
                + (retention.hidden.get(root, 0) if retention is not None else 0))]


NO_TRASH = ("--purge-after and --purge-now mean nothing in a bucket: it has no trash (a rename "
            "is a copy there), so a checkpoint --delete removes is deleted at once; the "
            "bucket's versioning and lifecycle rules are its grace period")


def retention_in_bucket(kept, session: BucketSession):
    """The retention plan as it is carried out in the session's bucket (``for_bucket``)."""
    from ..retention.bucket import for_bucket
    return for_bucket(kept, session.bucket())


def execute_retention(session: BucketSession, retention, min_age, now, emit):
    """``execute_retention_in_bucket``: each checkpoint listed and validated again first."""
    from ..retention.bucket import execute_retention_in_bucket
    return execute_retention_in_bucket(
        retention, session.bucket(), now=now, emit=emit,
        revalidate=BucketRevalidator(session.storage, min_age_s=min_age, prove=False))


def execute(session: BucketSession, plan, min_age, log, on_event, stop):
    """``execute_in_bucket`` of the plan; ``stop`` also asked whether a lock was lost."""
    def why_stop():
        return session.lost_lock() or stop()

    return execute_in_bucket(plan, session.bucket(),
                             revalidate=BucketRevalidator(session.storage, min_age_s=min_age),
                             log=log, on_event=on_event, stop=why_stop)


__all__ = ["open_bucket_roots", "BucketSession", "plan_in_bucket", "hidden_note", "execute",
           "retention_in_bucket", "execute_retention", "NO_TRASH"]
