"""Plan a retention policy over a scan: per checkpoint KEEP / STRIP / DELETE with its reasons and
the bytes each action frees, and the trash of each run due for purging.

Planning reads records only (and lists each run's trash): nothing is changed. Executing a plan
is ``retention.execute``; it re-scans and re-validates each checkpoint right before acting.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from ..kinds import RetentionAction
from ..records import Checkpoint, ScanResult
from .decision import Decision
from .policy import RunPolicyRefused, policy_for_run
from .rules import Policy, decide, link_index
from .strip import Refusal, StripPlan, strip_plan
from .trash import TrashEntry, list_trash


@dataclass(frozen=True)
class RetentionItem:
    """What the policy does with one checkpoint. ``strip``: the strip plan (or why it is refused:
    then nothing is done to it); ``frees_now``: bytes a strip frees; ``frees_when_purged``:
    bytes a delete frees once its trash entry is purged (a file also linked from outside the
    checkpoint frees nothing)."""

    decision: Decision
    checkpoint: Checkpoint
    strip: StripPlan | Refusal | None = None
    frees_now: int = 0
    frees_when_purged: int = 0

    @property
    def refused(self) -> str | None:
        return self.strip.reason if isinstance(self.strip, Refusal) else None

    def to_dict(self) -> dict:
        d = self.decision.to_dict()
        d.update(frees_bytes=self.frees_now, frees_bytes_when_purged=self.frees_when_purged)
        if self.refused:
            d["refused"] = self.refused
        return d


@dataclass(frozen=True)
class RunPurge:
    """A run's trash: the entries a purge will remove now, and those still waiting."""

    root: str
    run: str                 # relative to root
    run_dir: str             # absolute
    due: tuple[TrashEntry, ...]
    waiting: tuple[TrashEntry, ...]

    @property
    def frees_bytes(self) -> int:
        return sum(e.frees_bytes for e in self.due)


@dataclass(frozen=True)
class RetentionPlan:
    policy: Policy | None
    items: tuple[RetentionItem, ...]
    purges: tuple[RunPurge, ...]
    refused_runs: tuple[tuple[str, str, str], ...] = ()   # (root, run, why its policy file is refused)
    purge_after_s: float = 0.0
    purge_now: bool = False    # the trash is purged whatever its age, this run's deletes included

    @property
    def acting(self) -> tuple[RetentionItem, ...]:
        """The items that change something: strips not refused, deletes."""
        return tuple(i for i in self.items if i.decision.action is RetentionAction.DELETE
                     or (i.decision.action is RetentionAction.STRIP and not i.refused))

    @property
    def freed_now(self) -> int:
        now = sum(i.frees_now for i in self.acting) + sum(p.frees_bytes for p in self.purges)
        return now + (self._deleted_bytes if self.purge_now else 0)

    @property
    def freed_when_purged(self) -> int:
        return 0 if self.purge_now else self._deleted_bytes

    @property
    def _deleted_bytes(self) -> int:
        return sum(i.frees_when_purged for i in self.acting if i.decision.action is RetentionAction.DELETE)

    @property
    def has_work(self) -> bool:
        return bool(self.acting or any(p.due for p in self.purges))

    def counts(self) -> dict[str, int]:
        c = Counter(i.decision.action.value for i in self.items)
        return {a.value: c.get(a.value, 0) for a in RetentionAction}

    def to_dict(self) -> dict:
        return {
            "decisions": [i.to_dict() for i in self.items],
            "purge": [{"run": p.run, "entries": [e.to_dict() for e in p.due],
                       "frees_bytes": p.frees_bytes} for p in self.purges if p.due],
            "refused_runs": [{"run": run, "reason": why} for _, run, why in self.refused_runs],
            "counts": self.counts(),
            "frees_bytes_now": self.freed_now,
            "frees_bytes_when_purged": self.freed_when_purged,
            "purge_after_s": self.purge_after_s,
        }


def plan_retention(scan: ScanResult, policy: Policy | None, *, now: float, min_age_s: float,
                   purge_after_s: float, purge_now: bool = False,
                   storage=None) -> RetentionPlan:
    """Decide every checkpoint of every run of ``scan`` by ``policy`` (each run's own policy
    file may add keeps and pins), and find the trash due for purging (with or without a
    policy: a later run purges what an earlier one deleted). ``storage``: the scan's object
    storage, where the runs are in a bucket (it has no trash: nothing to purge)."""
    items: list[RetentionItem] = []
    refused: list[tuple[str, str, str]] = []
    if policy is not None:
        links = link_index(scan.checkpoints)
        for run in scan.runs:
            try:
                run_policy = policy_for_run(policy, run, storage)
            except RunPolicyRefused as exc:
                refused.append((run.root, run.path, str(exc)))
                continue
            by_path = {c.path: c for c in run.checkpoints}
            for d in decide(run, run_policy, now=now, min_age_s=min_age_s, links=links):
                items.append(_item(d, by_path[d.path]))
    purges = _purges(scan, now, purge_after_s, purge_now) if storage is None else ()
    return RetentionPlan(policy, tuple(items), purges,
                         tuple(refused), purge_after_s, purge_now)


def item_purge(item: RetentionItem) -> RunPurge:
    """The (empty) purge of the run of ``item``: where ``--purge-now`` purges what this run trashed."""
    c = item.checkpoint
    return RunPurge(c.dir.root, c.run, _run_dir(c.dir.root, c.run), (), ())


def _run_dir(root: str, run: str) -> str:
    return os.path.abspath(root if run == "." else os.path.join(root, run))


def _item(d: Decision, c: Checkpoint) -> RetentionItem:
    if d.action is RetentionAction.STRIP:
        plan = strip_plan(c)
        return RetentionItem(d, c, plan, frees_now=plan.freed_bytes if isinstance(plan, StripPlan) else 0)
    if d.action is RetentionAction.DELETE:
        return RetentionItem(d, c, frees_when_purged=_whole_bytes(c))
    return RetentionItem(d, c)


def _whole_bytes(c: Checkpoint) -> int:
    """Allocated bytes the checkpoint's files free once all of them are gone: a file hard-linked
    from outside it frees nothing, a file linked twice within it counts once."""
    links = Counter((f.dev, f.ino) for f in c.dir.files if not f.is_symlink)
    seen: set = set()
    total = 0
    for f in c.dir.files:
        key = (f.dev, f.ino)
        if f.is_symlink:
            total += f.allocated
        elif key not in seen:
            seen.add(key)
            if links[key] >= f.nlink:
                total += f.allocated
    return total


def _purges(scan: ScanResult, now: float, purge_after_s: float, purge_now: bool) -> tuple[RunPurge, ...]:
    out = []
    seen: set[str] = set()
    for run in scan.runs:
        run_dir = _run_dir(run.root, run.path)
        if run_dir in seen:
            continue
        seen.add(run_dir)
        entries = list_trash(run_dir)
        if not entries:
            continue
        due = tuple(e for e in entries if e.deleted_at is not None and (
            e.purging or purge_now or now - e.deleted_at >= purge_after_s))
        waiting = tuple(e for e in entries if e not in due and e.deleted_at is not None)
        out.append(RunPurge(run.root, run.path, run_dir, due, waiting))
    return tuple(out)
