"""What a prune did, or what a plan promises to do: its events, deletions, failures and result."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..kinds import PruneAction
from ..storage import is_url
from .plan import PrunePlan, Skip

PLAN, DELETE, SKIP, FAIL = PruneAction.PLAN, PruneAction.DELETE, PruneAction.SKIP, PruneAction.FAIL
CHANGED = "changed"    # Skip.status of what was skipped at execute time because it changed
STOPPED = "stopped"    # Skip.status of what was not started because the log cannot be written



@dataclass(frozen=True)
class PruneEvent:
    """One action, as the log and ``on_event`` see it. ``path`` is relative to ``root``."""

    action: str            # plan | delete | skip | fail
    root: str
    path: str
    bytes: int = 0
    reason: str = ""

    @property
    def abspath(self) -> str:
        if is_url(self.root):   # a bucket's key, as the URL names it
            return self.root.rstrip("/") + ("" if self.path == "." else "/" + self.path)
        root = os.path.abspath(self.root)
        return root if self.path == "." else os.path.join(root, *self.path.split("/"))


@dataclass(frozen=True)
class Deleted:
    root: str
    path: str
    bytes: int             # what this unlink freed: 0 when other links keep the data


@dataclass(frozen=True)
class Failure:
    root: str
    path: str
    reason: str


@dataclass(frozen=True)
class PruneResult:
    """What a prune did (or, from ``from_plan``, what a plan promises to do)."""

    deleted: tuple[Deleted, ...]
    skipped: tuple[Skip, ...]      # the plan's skips first, then what changed before its unlink
    failed: tuple[Failure, ...]
    freed_bytes: int
    held_bytes: int                # still allocated because of links the prune did not delete
    log_error: str = ""            # why the log stopped taking lines; the run stopped with it
    unlogged: tuple[Deleted, ...] = ()   # deleted after the log failed: reported, not logged

    @classmethod
    def from_plan(cls, plan: PrunePlan) -> PruneResult:
        return cls(deleted=tuple(Deleted(d.root, d.path, d.frees_bytes) for d in plan.deletions),
                   skipped=plan.skipped, failed=(), freed_bytes=plan.freed_bytes,
                   held_bytes=plan.held_bytes)

    @property
    def changed(self) -> tuple[Skip, ...]:
        """What the plan held but the run skipped because it changed since the plan."""
        return tuple(s for s in self.skipped if s.status == CHANGED)

    @property
    def stopped(self) -> tuple[Skip, ...]:
        """What the plan held but the run did not start because the log cannot be written."""
        return tuple(s for s in self.skipped if s.status == STOPPED)

    @property
    def ok(self) -> bool:
        """Everything planned was done, and logged."""
        return not self.failed and not self.changed and not self.log_error

    def to_dict(self, *, dry_run: bool = False, with_root: bool = False) -> dict:
        def item(x, **fields) -> dict:
            return ({"root": x.root} if with_root else {}) | {"path": x.path} | fields

        doc = {
            "dry_run": dry_run,
            "deleted": [item(d, bytes=d.bytes) for d in self.deleted],
            "skipped": [item(s, reason=s.reason) for s in self.skipped],
            "failed": [item(f, reason=f.reason) for f in self.failed],
            "freed_bytes": self.freed_bytes,
            "held_bytes": self.held_bytes,
        }
        if self.log_error:
            doc["log_error"] = self.log_error
            doc["unlogged"] = [item(d, bytes=d.bytes) for d in self.unlogged]
        return doc
