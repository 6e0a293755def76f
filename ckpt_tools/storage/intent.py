"""Intent records: what a prune in a bucket is about to delete, written before it deletes, so
that a run killed in the middle of a checkpoint is finished by the next one.

On disk a checkpoint's merged weights go one unlink at a time too, but a killed prune leaves
files that the next scan judges as before. In a bucket the same holds, except for a sharded
model: without some of its shards a checkpoint is ``broken`` and never pruned again. So before
the first DELETE of a checkpoint, prune writes
``<root>/.ckpt-tools-intent/<run-id>-<checkpoint hash>.json``
(conditional create) naming each object it will delete with the ETag it checked, and each
object of the PEFT tree it proved them against; it deletes the record when the checkpoint is
done. A run that finds a record (its run was killed) finishes it first, under the lock:

- when every object the record kept still has its ETag (the PEFT tree the proof read is
  unchanged), each object it names is deleted with ``If-Match`` on its recorded ETag: one
  changed since is kept (a ``skip``, "changed since the plan"), one gone was deleted by the
  killed run;
- otherwise nothing is deleted (the proof no longer holds) and the record is dropped: the
  scan that follows judges the checkpoint as it is now.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from .. import layout
from .conditional import ConditionalStore, PreconditionFailed

INTENT_DIR = layout.INTENT_DIR


def intent_path(root_path: str, name: str) -> str:
    """Where the intent record ``name`` (a run id, and its checkpoint's) lies under a root
    (a file system path)."""
    return f"{root_path}/{INTENT_DIR}/{name}.json"


@dataclass(frozen=True)
class Intent:
    """What one run is about to delete in one checkpoint: object paths with their ETags and
    sizes (``delete``), and the objects the proof read with their ETags (``kept``)."""

    run_id: str
    root: str                     # the root URL, as the run was given it
    checkpoint: str               # relative to the root
    prefix: str                   # the checkpoint's path in the file system (bucket/...)
    delete: tuple[tuple[str, str, int], ...]    # (path, ETag, size)
    kept: tuple[tuple[str, str], ...]           # (path, ETag)

    def to_json(self, clock=time.time) -> bytes:
        return json.dumps({
            "tool": "ckpt-tools", "run_id": self.run_id, "host": socket.gethostname(),
            "pid": os.getpid(), "written_epoch": clock(), "root": self.root,
            "checkpoint": self.checkpoint, "prefix": self.prefix,
            "delete": [{"key": k, "etag": e, "size": s} for k, e, s in self.delete],
            "kept": [{"key": k, "etag": e} for k, e in self.kept]}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Intent:
        """``ValueError`` for a record this version cannot read."""
        doc = json.loads(data)
        try:
            return cls(str(doc["run_id"]), str(doc["root"]), str(doc["checkpoint"]),
                       str(doc["prefix"]),
                       tuple((str(d["key"]), str(d["etag"]), int(d["size"]))
                             for d in doc["delete"]),
                       tuple((str(k["key"]), str(k["etag"])) for k in doc["kept"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an intent record: {exc}") from None


@dataclass
class Finished:
    """What finishing one intent record did."""

    record: str                   # the record's path
    intent: Intent | None         # None: unreadable, dropped
    deleted: list[tuple[str, int]] = field(default_factory=list)   # (path, bytes) deleted now
    gone: list[str] = field(default_factory=list)                  # deleted by the killed run
    kept: list[tuple[str, str]] = field(default_factory=list)      # (path, why) not deleted
    dropped: str = ""             # why the record was dropped without deleting anything


def pending(fs, root_path: str) -> list[str]:
    """The intent records under a root, listed now (nothing cached)."""
    where = f"{root_path}/{INTENT_DIR}"
    fs.invalidate_cache(where)
    try:
        return sorted(p for p in fs.find(where) if p.endswith(".json"))
    except FileNotFoundError:
        return []


def finish(store: ConditionalStore, record: str) -> Finished:
    """Finish the intent record at ``record`` (see the module's docstring), then delete it."""
    try:
        data, record_etag, _ = store.get(record)
    except FileNotFoundError:
        return Finished(record, None, dropped="gone meanwhile")
    try:
        intent = Intent.from_json(data)
    except ValueError as exc:
        done = Finished(record, None, dropped=f"unreadable record ({exc}); nothing deleted")
    else:
        done = _finish(store, intent, record)
    try:
        store.delete(record, record_etag)
    except (PreconditionFailed, FileNotFoundError):
        pass   # rewritten or dropped by another run meanwhile: its business
    return done


def _finish(store: ConditionalStore, intent: Intent, record: str) -> Finished:
    done = Finished(record, intent)
    now = _etags(store.fs, intent)
    changed = [k for k, e in intent.kept if now.get(k) != e]
    if changed:
        done.dropped = (f"{changed[0]} changed since the interrupted run proved the merged "
                        "weights redundant; nothing of it deleted")
        return done
    for key, etag, size in intent.delete:
        try:
            store.delete(key, etag)
        except PreconditionFailed:
            done.kept.append((key, "changed since the plan"))
        except FileNotFoundError:
            done.gone.append(key)
        except OSError as exc:
            done.kept.append((key, f"cannot delete: {exc.strerror or exc}"))
        else:
            done.deleted.append((key, size))
    return done


def _etags(fs, intent: Intent) -> dict[str, str]:
    """The ETags of the checkpoint's objects now (one listing of its prefix)."""
    fs.invalidate_cache(intent.prefix)
    try:
        found = fs.find(intent.prefix, detail=True)
    except FileNotFoundError:
        return {}
    return {k: v.get("ETag", "") for k, v in found.items()}


__all__ = ["Intent", "Finished", "intent_path", "pending", "finish", "INTENT_DIR"]
