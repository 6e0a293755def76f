"""Carry out a retention plan in a bucket: strips and whole-checkpoint deletes, with what S3
offers instead of rename, ``flock`` and inodes (``prune.bucket`` does the same for merged
weights).

A bucket has no rename (a rename is a copy), so it has no trash: a checkpoint ``--delete``
removes is deleted at once. The grace period a trash gives on disk is the bucket's versioning
and lifecycle rules' job there; ``--purge-after``/``--purge-now`` mean nothing.

Right before acting on a checkpoint its prefix is listed again and the checkpoint
re-validated through the storage (``revalidate``: a ``prune.bucket.BucketRevalidator``
without the content proof); every object it acts on must still have the ETag the plan saw
(``BucketRetention.etags``), and every DELETE names that ETag (``If-Match``), so an object
changed since the plan is never deleted ("changed since the plan").

- delete: the objects listed now must be exactly those of the plan (an object that appeared
  means the checkpoint is being written again: left alone), the checkpoint still complete and
  sound and older than ``--min-age``; then an intent record naming every object and its ETag
  (``storage.intent``: a run killed now is finished by the next), the DELETEs, the record
  deleted.
- strip: the strip marker first (``stripping``, a plain PUT: it is the run's own object), each
  resume-only object by a conditional DELETE, the marker rewritten ``stripped``. A killed strip
  leaves the marker ``stripping`` (audit: ``strip-interrupted``) and the next run finishes it.

In a versioned bucket a DELETE only adds a delete marker: nothing is counted as freed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from .. import __version__, layout
from ..kinds import PruneAction, RetentionAction, Status
from ..problems import STRIP_INTERRUPTED
from ..prune.bucket import CHANGED_SINCE_PLAN, Bucket, record_path
from ..prune.result import PruneEvent
from ..records import Checkpoint
from ..storage.conditional import PreconditionFailed
from ..storage.intent import Intent
from .execute import RetentionResult, _reasons
from .plan import RetentionItem, RetentionPlan
from .strip import Refusal, strip_plan
from .strip_marker import STRIPPED, STRIPPING, StripMarker, parse_marker

_BY = f"ckpt-tools {__version__}"


@dataclass(frozen=True)
class BucketRetention:
    """A retention plan made for a bucket (``for_bucket``), with the ETag of each object of
    each checkpoint it decided on as the plan's scan listed it, and the bytes its deletes leave
    behind delete markers under each root whose bucket keeps versions."""

    plan: RetentionPlan
    etags: dict[tuple[str, str], dict[str, str]]   # (root, checkpoint) → relpath → ETag
    hidden: dict[str, int] = dataclasses.field(default_factory=dict)   # root → bytes


def for_bucket(plan: RetentionPlan, bucket: Bucket) -> BucketRetention:
    """``plan`` as it is carried out in ``bucket``: no trash and no purge, a delete frees its
    bytes now, and nothing is freed where the bucket keeps versions."""
    storage = bucket.storage
    items: list[RetentionItem] = []
    etags: dict[tuple[str, str], dict[str, str]] = {}
    hidden: dict[str, int] = {}
    acting = {id(i) for i in plan.acting}
    for item in plan.items:
        c = item.checkpoint
        prefix = storage.path_of(c.dir)
        etags[(c.dir.root, c.path)] = {f.relpath: storage.etags.get(f"{prefix}/{f.relpath}", "")
                                       for f in c.dir.files}
        frees = (item.frees_when_purged if item.decision.action is RetentionAction.DELETE
                 else item.frees_now)
        if c.dir.root in bucket.hides and id(item) in acting:
            hidden[c.dir.root] = hidden.get(c.dir.root, 0) + frees
            frees = 0
        items.append(dataclasses.replace(item, frees_now=frees, frees_when_purged=0))
    return BucketRetention(dataclasses.replace(plan, items=tuple(items), purges=(),
                                               purge_now=False), etags, hidden)


def execute_retention_in_bucket(
        retention: BucketRetention, bucket: Bucket, *,
        revalidate: Callable[[str, str], Checkpoint], now: float,
        emit: Callable[[PruneEvent], None] = lambda e: None,
        before_delete: Callable[[Checkpoint], None] | None = None) -> RetentionResult:
    """Strip, then delete (see the module's docstring); one bad checkpoint never stops the
    others. ``before_delete(checkpoint)``: called after a checkpoint's checks and its intent
    record, right before its DELETEs (tests change an object there). Raises only on bugs."""
    run = _Run(retention, bucket, revalidate, now, emit, before_delete)
    for item in retention.plan.acting:
        if item.decision.action is RetentionAction.STRIP:
            run.strip(item)
    for item in retention.plan.acting:
        if item.decision.action is RetentionAction.DELETE:
            run.delete(item)
    return run.result


class _Changed(Exception):
    """The checkpoint is not what the plan decided on: left alone, with the reason."""


class _Run:
    def __init__(self, retention, bucket, revalidate, now, emit, before_delete):
        self.retention, self.bucket, self.revalidate = retention, bucket, revalidate
        self.storage, self.store = bucket.storage, bucket.store
        self.when = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")
        self.emit, self.before_delete = emit, before_delete
        self.result = RetentionResult()

    def event(self, action: str, root: str, path: str, n: int = 0, reason: str = "") -> None:
        self.emit(PruneEvent(action, root, path, n, reason))

    def skip(self, root: str, path: str, why: str) -> None:
        self.result.skipped.append((root, path, why))
        self.event(PruneAction.SKIP, root, path, 0, why)

    def fail(self, root: str, path: str, why: str) -> None:
        self.result.failed.append((root, path, why))
        self.event(PruneAction.FAIL, root, path, 0, why)

    def judged(self, item: RetentionItem) -> tuple[Checkpoint, dict[str, str]]:
        """The checkpoint listed and validated again, and its objects' ETags now; ``_Changed``
        where it cannot be judged again or is no longer sound."""
        c = item.checkpoint
        try:
            fresh = self.revalidate(c.dir.root, c.path)
        except FileNotFoundError:
            raise _Changed("the checkpoint vanished since the plan") from None
        except Exception as exc:  # noqa: BLE001 - a listing or read failure, the revalidator's own
            raise _Changed(f"cannot be judged again: {exc}") from None
        prefix = self.storage.path_of(fresh.dir)
        return fresh, {f.relpath: self.storage.etags.get(f"{prefix}/{f.relpath}", "")
                       for f in fresh.dir.files}

    # --- delete --------------------------------------------------------------------------

    def delete(self, item: RetentionItem) -> None:
        c = item.checkpoint
        root, path = c.dir.root, c.path
        planned = self.retention.etags[(root, path)]
        try:
            fresh, now = self.judged(item)
            _same_objects(planned, now)
            if fresh.status not in (Status.HEALTHY, Status.REDUNDANT) or fresh.errors:
                raise _Changed(f"no longer complete and sound: {fresh.status}")
            if fresh.fresh:
                raise _Changed("written to since the plan: younger than --min-age")
        except _Changed as exc:
            self.skip(root, path, str(exc))
            return
        prefix = self.storage.path_of(fresh.dir)
        sizes = {f.relpath: f.size for f in fresh.dir.files}
        intent = Intent(self.bucket.run_id, root, path, prefix,
                        tuple((f"{prefix}/{rel}", etag, sizes[rel])
                              for rel, etag in sorted(planned.items())), ())
        record = record_path(self.bucket, root, path)
        try:
            record_etag = self.store.create(record, intent.to_json())
        except (PreconditionFailed, OSError) as exc:
            self.fail(root, path, f"not deleted: the intent record {record} cannot be "
                                  f"written: {exc}")
            return
        if self.before_delete is not None:
            self.before_delete(fresh)
        kept = self.delete_objects(root, path, prefix, planned)
        try:
            self.store.delete(record, record_etag)
        except (PreconditionFailed, OSError):
            pass   # the next run finds it and finishes it: every object named is gone or changed
        if kept:
            return   # the objects changed since the plan stay, each said; the others are gone
        freed = 0 if root in self.bucket.hides else sum(sizes.values())
        self.result.deleted.append((root, path, freed))
        self.event(PruneAction.DELETE, root, path, freed,
                   f"{_reasons(item)}; deleted (a bucket has no trash)")

    def delete_objects(self, root: str, path: str, prefix: str, etags: dict[str, str]) -> int:
        """Each object by a DELETE on its planned ETag; how many were not deleted."""
        kept = 0
        for rel, etag in sorted(etags.items()):
            try:
                self.store.delete(f"{prefix}/{rel}", etag)
            except PreconditionFailed:
                kept += 1
                self.skip(root, f"{path}/{rel}", CHANGED_SINCE_PLAN)
            except FileNotFoundError:
                continue
            except OSError as exc:
                kept += 1
                self.fail(root, f"{path}/{rel}", f"cannot delete: {exc.strerror or exc}")
        return kept

    # --- strip ---------------------------------------------------------------------------

    def strip(self, item: RetentionItem) -> None:
        c = item.checkpoint
        root, path = c.dir.root, c.path
        planned = self.retention.etags[(root, path)]
        try:
            fresh, now = self.judged(item)
            again = strip_plan(fresh)
            if isinstance(again, Refusal):
                raise _Changed(f"no longer to be stripped: {again.reason}")
        except _Changed as exc:
            self.skip(root, path, str(exc))
            return
        prefix = self.storage.path_of(fresh.dir)
        marker_key = f"{prefix}/{layout.STRIP_MARKER}"
        previous = (self.previous_marker(marker_key)
                    if any(p.code == STRIP_INTERRUPTED for p in fresh.problems) else None)
        earlier = dict(previous.files) if previous else {}
        removing = earlier | {f.relpath: f.frees_bytes for f in item.strip.files}
        started = previous.started if previous and previous.started else self.when
        before = fresh.dir.file(layout.STRIP_MARKER)
        marker = StripMarker(STRIPPING, tuple(sorted(removing.items())), started, by=_BY).to_json()
        try:
            self.store.put(marker_key, marker)
        except OSError as exc:
            self.skip(root, path, f"the strip marker could not be written: {exc.strerror or exc}")
            return
        removed, left = self.strip_objects(item, prefix, planned, now)
        if not left:
            planned_now = {f.relpath for f in item.strip.files}
            done = {p: b for p, b in earlier.items() if p not in planned_now} | removed
            stripped = StripMarker(STRIPPED, tuple(sorted(done.items())), started, self.when,
                                   _BY).to_json()
            try:
                self.store.put(marker_key, stripped)
                marker = stripped
            except OSError as exc:
                self.fail(root, f"{path}/{layout.STRIP_MARKER}", "stripped, but the marker could "
                          f"not be rewritten to say so: {exc.strerror or exc}")
        # the marker's bytes are new bytes in the bucket: what the strip frees is net of them
        grown = max(0, len(marker) - (before.size if before is not None else 0))
        freed = 0 if root in self.bucket.hides else sum(removed.values()) - grown
        self.result.stripped.append((root, path, freed))
        self.event(PruneAction.STRIP, root, path, freed, _reasons(item))

    def strip_objects(self, item: RetentionItem, prefix: str, planned: dict[str, str],
                      now: dict[str, str]) -> tuple[dict[str, int], int]:
        """Each resume-only object of the plan still with its planned ETag, deleted on it:
        (relpath → bytes, for those deleted; how many were left)."""
        c = item.checkpoint
        removed: dict[str, int] = {}
        left = 0
        for f in item.strip.files:
            rel, etag = f.relpath, planned.get(f.relpath, "")
            if rel not in now:
                continue   # gone since the plan (a strip killed before took it): fine
            if now[rel] != etag or not etag:
                left += 1
                self.skip(c.dir.root, f"{c.path}/{rel}", CHANGED_SINCE_PLAN)
                continue
            try:
                self.store.delete(f"{prefix}/{rel}", etag)
            except PreconditionFailed:
                left += 1
                self.skip(c.dir.root, f"{c.path}/{rel}", CHANGED_SINCE_PLAN)
            except FileNotFoundError:
                continue
            except OSError as exc:
                left += 1
                self.fail(c.dir.root, f"{c.path}/{rel}", f"cannot delete: {exc.strerror or exc}")
            else:
                removed[rel] = f.record.size
        return removed, left

    def previous_marker(self, key: str) -> StripMarker | None:
        """An interrupted strip's marker (state ``stripping``), whose files it was removing."""
        try:
            data, _, _ = self.store.get(key)
        except OSError:
            return None
        marker = parse_marker(data)
        return marker if not isinstance(marker, str) and marker.state == STRIPPING else None


def _same_objects(planned: dict[str, str], now: dict[str, str]) -> None:
    """``_Changed`` unless the checkpoint holds the plan's objects, each with its ETag."""
    added = sorted(set(now) - set(planned))
    gone = sorted(set(planned) - set(now))
    changed = sorted(r for r in set(planned) & set(now) if planned[r] != now[r] or not now[r])
    if added:
        raise _Changed(f"changed since the plan: {added[0]} appeared (it is being written again)")
    if gone:
        raise _Changed(f"changed since the plan: {gone[0]} is gone")
    if changed:
        raise _Changed(f"changed since the plan: {changed[0]} changed")


__all__ = ["BucketRetention", "for_bucket", "execute_retention_in_bucket"]
