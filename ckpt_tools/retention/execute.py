"""Carry out a retention plan under prune's lock: strips, moves into the trash, purges.

Right before acting on a checkpoint it is re-scanned and re-validated (``revalidate``, prune's
``Revalidator``): it must still be complete and sound, older than ``--min-age``, and its files
the ones the plan saw; otherwise it is skipped with the reason. Every action is an event for
``--log`` and ``on_event`` (``PruneEvent``: strip, trash, purge, skip, fail).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..fs import FileOps
from ..kinds import PruneAction, RetentionAction, Status
from ..prune.result import PruneEvent
from ..records import CheckpointDir
from .plan import RetentionItem, RetentionPlan, item_purge
from .strip import execute_strip
from .trash import MoveFailed, MoveSkipped, move_to_trash, purge


@dataclass
class RetentionResult:
    """What was done: bytes freed now (strips, purges, and deletes in a bucket, which has no
    trash), bytes moved to the trash (freed when it is purged), and what was skipped or failed,
    each (root, path, reason)."""

    stripped: list[tuple[str, str, int]] = field(default_factory=list)
    trashed: list[tuple[str, str, int]] = field(default_factory=list)
    purged: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    deleted: list[tuple[str, str, int]] = field(default_factory=list)   # in a bucket: no trash

    @property
    def freed_now(self) -> int:
        return (sum(b for *_, b in self.stripped) + sum(b for *_, b in self.purged)
                + sum(b for *_, b in self.deleted))

    @property
    def freed_when_purged(self) -> int:
        return sum(b for *_, b in self.trashed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        def rows(xs, key):
            return [{"path": p, key: v} for _, p, v in xs]
        return {"stripped": rows(self.stripped, "bytes"), "trashed": rows(self.trashed, "bytes"),
                "purged": rows(self.purged, "bytes"), "skipped": rows(self.skipped, "reason"),
                "failed": rows(self.failed, "reason"), "freed_bytes_now": self.freed_now,
                "freed_bytes_when_purged": self.freed_when_purged} | (
                    {"deleted": rows(self.deleted, "bytes")} if self.deleted else {})


def execute_retention(plan: RetentionPlan, *, revalidate, now: float, fs: FileOps | None = None,
                      emit: Callable[[PruneEvent], None] = lambda e: None) -> RetentionResult:
    """Strip, then move to the trash, then purge; one bad checkpoint never stops the others."""
    result = RetentionResult()

    def event(action: str, root: str, path: str, n: int = 0, reason: str = "") -> None:
        emit(PruneEvent(action, root, path, n, reason))

    for item in plan.acting:
        if item.decision.action is RetentionAction.STRIP:
            _strip(item, fs, revalidate, now, result, event)
    for item in plan.acting:
        if item.decision.action is RetentionAction.DELETE:
            _trash(item, fs, revalidate, now, result, event)
    purges = {p.run_dir: p for p in plan.purges if p.due}
    if plan.purge_now:   # what this run moved to the trash goes at once too
        for item in plan.acting:
            if item.decision.action is RetentionAction.DELETE:
                p = item_purge(item)
                purges.setdefault(p.run_dir, p)
    for p in purges.values():
        done = purge(fs, p.run_dir, older_than_s=plan.purge_after_s, now=now, purge_now=plan.purge_now)
        for entry, freed in done.purged:
            result.purged.append((p.root, _trash_rel(p, entry.name), freed))
            event(PruneAction.PURGE, p.root, _trash_rel(p, entry.name), freed, "purged from the trash")
        for path, why in done.failed:
            result.failed.append((p.root, path, why))
            event(PruneAction.FAIL, p.root, path, 0, why)
    return result


def _trash_rel(p, name: str) -> str:
    from ..layout import TRASH_DIR
    return f"{p.run}/{TRASH_DIR}/{name}" if p.run != "." else f"{TRASH_DIR}/{name}"


def _reasons(item: RetentionItem) -> str:
    return ", ".join(item.decision.reasons)


def _strip(item, fs, revalidate, now, result, event) -> None:
    c = item.checkpoint
    root, path = c.dir.root, c.path
    out = execute_strip(fs, root, item.strip, now=now, revalidate=revalidate)
    if out.refused:
        result.skipped.append((root, path, out.refused))
        event(PruneAction.SKIP, root, path, 0, out.refused)
        return
    result.stripped.append((root, path, out.freed_bytes))
    event(PruneAction.STRIP, root, path, out.freed_bytes, _reasons(item))
    for rel, why in out.skipped:
        result.skipped.append((root, f"{path}/{rel}", why))
        event(PruneAction.SKIP, root, f"{path}/{rel}", 0, why)
    for rel, why in out.failed:
        result.failed.append((root, f"{path}/{rel}", why))
        event(PruneAction.FAIL, root, f"{path}/{rel}", 0, why)


def _trash(item, fs, revalidate, now, result, event) -> None:
    c = item.checkpoint
    root, path = c.dir.root, c.path

    def still_deletable(fresh: CheckpointDir) -> str | None:
        changed = _changed_files(c.dir, fresh)
        if changed:
            return changed
        try:
            judged = revalidate(root, path)
        except Exception as exc:  # noqa: BLE001 - the revalidator's _Changed and any read failure
            return f"cannot be judged again: {exc}"
        if judged.status not in (Status.HEALTHY, Status.REDUNDANT) or judged.errors:
            return f"no longer complete and sound: {judged.status}"
        if judged.fresh:
            return "written to since the plan: younger than --min-age"
        return None

    try:
        entry = move_to_trash(fs, root, c, now=now, check=still_deletable)
    except MoveSkipped as exc:
        result.skipped.append((root, path, str(exc)))
        event(PruneAction.SKIP, root, path, 0, str(exc))
        return
    except MoveFailed as exc:
        result.failed.append((root, path, str(exc)))
        event(PruneAction.FAIL, root, path, 0, str(exc))
        return
    result.trashed.append((root, path, item.frees_when_purged))
    event(PruneAction.TRASH, root, path, item.frees_when_purged,
          f"{_reasons(item)}; moved to {entry.path}")


def _changed_files(planned: CheckpointDir, fresh: CheckpointDir) -> str | None:
    """Why the files of the checkpoint are not the ones the plan saw, or None."""
    was = {f.relpath: (f.dev, f.ino, f.size, f.mtime_ns) for f in planned.files}
    now = {f.relpath: (f.dev, f.ino, f.size, f.mtime_ns) for f in fresh.files}
    if was == now:
        return None
    gone = sorted(set(was) - set(now))
    added = sorted(set(now) - set(was))
    changed = sorted(r for r in set(was) & set(now) if was[r] != now[r])
    what = (f"{gone[0]} is gone" if gone else f"{added[0]} appeared" if added
            else f"{changed[0]} changed")
    return f"changed since the plan: {what}"
