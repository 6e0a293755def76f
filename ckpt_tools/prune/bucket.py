"""Execute a ``PrunePlan`` in a bucket: list again, re-validate, prove again, record the
intent, then delete each object only while it is the one the plan saw.

The promises are those of ``execute`` on disk, kept with what S3 offers instead of file
descriptors and ``lstat``. For each checkpoint of the plan, in plan order:

1. its prefix is listed again (``storage.walk.rescan_checkpoint``: nothing cached) and the
   checkpoint re-validated through the storage, as the plan's scan did: it must still be
   ``redundant`` with no error and not younger than ``--min-age``, and its merged weights
   proven redundant by content again (``proof.ContentProof`` reading byte ranges);
2. each planned object must still be listed with the plan's ETag and size;
3. an intent record is written (``storage.intent``: the objects to delete with their ETags,
   and the objects the proof read), so that a run killed now is finished by the next;
4. each DELETE carries the plan's ETag (``If-Match``): an object rewritten since the plan is
   refused by the store itself (412) and kept, a ``skip`` "changed since the plan";
5. the intent record is deleted.

In a versioned bucket a DELETE only adds a delete marker: the bytes stay, hidden, until the
bucket's lifecycle rules expire the noncurrent versions, so nothing is counted as freed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..api import DEFAULT_MIN_AGE_S, classify
from ..records import REDUNDANT, Checkpoint
from ..storage.conditional import ConditionalStore, PreconditionFailed
from ..storage.intent import Intent, intent_path
from ..storage.remote import ObjectStorage
from ..storage.walk import rescan_checkpoint
from ..validator import HEADERS
from .execute import _Changed, _Outcome
from .log import ActionLog
from .plan import PlannedDeletion, Prover, PrunePlan, skip_reason
from .proof import ContentProof
from .result import DELETE, Deleted, PruneEvent, PruneResult

CHANGED_SINCE_PLAN = "changed since the plan"


@dataclass(frozen=True)
class Bucket:
    """What deleting in a bucket needs: the scan's storage, its conditional requests, the
    run's id (its intent records' name), and the roots where a delete frees no byte
    (``hides``: their bucket keeps versions, a delete only adds a delete marker)."""

    storage: ObjectStorage
    store: ConditionalStore
    run_id: str
    hides: frozenset[str] = frozenset()


class BucketRevalidator:
    """``execute.Revalidator`` of a checkpoint in a bucket: listed again, validated through
    the storage, proven again by ranged reads. ``min_age_s`` must be the plan's."""

    def __init__(self, storage: ObjectStorage, *, min_age_s: float = DEFAULT_MIN_AGE_S,
                 clock: Callable[[], float] = time.time, prove: bool | Prover = True):
        self.storage, self.min_age_s, self.clock = storage, min_age_s, clock
        self.prove: Prover | None = (ContentProof(storage=storage) if prove is True
                                     else (prove or None))

    def __call__(self, root: str, checkpoint: str) -> Checkpoint:
        ckpt = rescan_checkpoint(self.storage, root, checkpoint)
        fresh = classify(ckpt, level=HEADERS, min_age_s=self.min_age_s, now=self.clock(),
                         storage=self.storage)
        if self.prove is not None and fresh.status == REDUNDANT and not fresh.errors:
            reason = self.prove(fresh)
            if reason is not None:
                raise _Changed(f"no longer proven redundant: {reason}")
        return fresh


def with_etags(plan: PrunePlan, bucket: Bucket) -> PrunePlan:
    """``plan`` with each deletion's ETag, as the scan's listing gave it; in a bucket that
    hides what it deletes, no deletion frees bytes."""
    storage = bucket.storage

    def etag_of(d: PlannedDeletion) -> str:
        return storage.etags.get(f"{storage.root_path(d.root)}/{d.path}", "")

    deletions = tuple(dataclasses.replace(d, etag=etag_of(d),
                                          frees_bytes=0 if d.root in bucket.hides
                                          else d.frees_bytes)
                      for d in plan.deletions)
    return PrunePlan(deletions, plan.skipped)


def hidden_bytes(plan: PrunePlan, bucket: Bucket, root: str) -> int:
    """What the plan's deletes under ``root`` leave behind delete markers (0 where its bucket
    keeps no versions)."""
    return sum(d.record.size for d in plan.deletions if d.root == root and root in bucket.hides)


def record_path(bucket: Bucket, root: str, checkpoint: str) -> str:
    """Where this run's intent record for ``checkpoint`` (under the root URL ``root``) lies:
    one record per checkpoint, so one left behind (its delete failed) never blocks the next."""
    return intent_path(bucket.storage.root_path(root),
                       f"{bucket.run_id}-{hashlib.sha256(checkpoint.encode()).hexdigest()[:16]}")


def execute_in_bucket(plan: PrunePlan, bucket: Bucket, *,
                      revalidate: Callable[[str, str], Checkpoint] | None = None,
                      log: ActionLog | None = None,
                      on_event: Callable[[PruneEvent], None] | None = None,
                      stop: Callable[[], str | None] | None = None,
                      before_delete: Callable[[Checkpoint, list[PlannedDeletion]], None]
                      | None = None) -> PruneResult:
    """Carry out ``plan`` (made with ``with_etags``) in ``bucket``; see the module's docstring.

    ``revalidate`` as for ``execute.execute_prune`` (default: a ``BucketRevalidator`` with
    a 1 h ``--min-age``); ``log``, ``on_event`` and ``stop`` as there: ``stop()`` is asked
    before each checkpoint (the lock lost, stdout closed). ``before_delete(checkpoint,
    deletions)``: called after the checks and the intent record, right before the DELETEs
    (tests change an object there). Raises only on bugs."""
    revalidate = revalidate if revalidate is not None else BucketRevalidator(bucket.storage)
    groups: dict[tuple[str, str], list[PlannedDeletion]] = {}
    for d in plan.deletions:
        groups.setdefault((d.root, d.checkpoint), []).append(d)
    out = _Outcome(log, on_event, None, stop)
    out.skipped.extend(plan.skipped)
    freed = 0
    for (root, ckpt), items in groups.items():
        why = out.why_stop()
        if why is not None:
            for d in items:
                out.stop(d, why)
            continue
        todo = _checked(root, ckpt, items, bucket, revalidate, out)
        if todo:
            freed += _delete(todo[0], todo[1], bucket, out, before_delete)
    log_error = log.error() if log is not None else None
    return PruneResult(tuple(out.deleted), tuple(out.skipped), tuple(out.failed), freed, 0,
                       str(log_error) if log_error else "", tuple(out.unlogged))


def _checked(root: str, ckpt: str, items: list[PlannedDeletion], bucket: Bucket, revalidate,
             out: _Outcome) -> tuple[Checkpoint, list[PlannedDeletion]] | None:
    """(the checkpoint as it is now, the deletions still as planned), each other one skipped;
    None when none is left."""
    try:
        fresh = revalidate(root, ckpt)
        if fresh.status != REDUNDANT or fresh.errors or fresh.fresh:
            raise _Changed(f"no longer redundant: {skip_reason(fresh)}")
    except _Changed as exc:
        reason = str(exc)
    except FileNotFoundError:
        reason = "the checkpoint vanished since the plan"
    except OSError as exc:
        for d in items:
            out.fail(d, f"cannot list the checkpoint again: {exc.strerror or exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - one bad checkpoint never stops the run (§5.4.6)
        for d in items:
            out.fail(d, f"re-validation failed: {type(exc).__name__}: {exc}")
        return None
    else:
        reason = ""
    if reason:
        for d in items:
            out.skip(d, reason)
        return None
    storage = bucket.storage
    prefix = storage.path_of(fresh.dir)
    todo = []
    for d in items:
        rec = fresh.dir.file(d.relpath)
        if d.relpath not in fresh.merged_files:
            out.skip(d, "no longer a merged-weight file of a redundant checkpoint")
        elif rec is None:
            out.skip(d, "vanished since the plan")
        elif (storage.etags.get(f"{prefix}/{d.relpath}") != d.etag or not d.etag
              or rec.size != d.record.size):
            out.skip(d, CHANGED_SINCE_PLAN)
        else:
            todo.append(d)
    return (fresh, todo) if todo else None


def _delete(fresh: Checkpoint, todo: list[PlannedDeletion], bucket: Bucket, out: _Outcome,
            before_delete) -> int:
    """The intent record, each conditional DELETE, the record removed; the bytes freed."""
    storage, store = bucket.storage, bucket.store
    prefix = storage.path_of(fresh.dir)
    going = {d.relpath for d in todo}
    intent = Intent(bucket.run_id, fresh.dir.root, fresh.path, prefix,
                    tuple((f"{prefix}/{d.relpath}", d.etag, d.record.size) for d in todo),
                    tuple((f"{prefix}/{f.relpath}", storage.etags.get(f"{prefix}/{f.relpath}", ""))
                          for f in fresh.dir.files if f.relpath not in going))
    record = record_path(bucket, fresh.dir.root, fresh.path)
    try:
        record_etag = store.create(record, intent.to_json())
    except (PreconditionFailed, OSError) as exc:
        for d in todo:
            out.fail(d, f"not deleted: the intent record {record} cannot be written: {exc}")
        return 0
    if before_delete is not None:
        before_delete(fresh, todo)
    freed = 0
    for d in todo:
        try:
            store.delete(f"{prefix}/{d.relpath}", d.etag)
        except PreconditionFailed:
            out.skip(d, CHANGED_SINCE_PLAN)
            continue
        except FileNotFoundError:
            out.skip(d, "vanished since the plan")
            continue
        except OSError as exc:
            out.fail(d, f"cannot delete: {exc.strerror or exc}")
            continue
        nbytes = 0 if d.root in bucket.hides else d.record.size
        freed += nbytes
        deleted = Deleted(d.root, d.path, nbytes)
        out.deleted.append(deleted)
        if not out._report(PruneEvent(DELETE, d.root, d.path, nbytes, "")):
            out.unlogged.append(deleted)
    try:
        store.delete(record, record_etag)
    except (PreconditionFailed, OSError):
        pass   # the next run finds it and finishes it: every object named is gone or changed
    return freed


__all__ = ["Bucket", "BucketRevalidator", "execute_in_bucket", "with_etags", "hidden_bytes",
           "record_path",
           "CHANGED_SINCE_PLAN"]
