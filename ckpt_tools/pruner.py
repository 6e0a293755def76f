"""Plan the deletion of redundant merged weights (SPEC §5.3).

Planning is pure: it reads records and returns a ``PrunePlan``. Executing a plan is
in ``prune_exec``; it re-validates and re-checks every file right before unlinking.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import BROKEN, IN_PROGRESS, LEGACY, PEFT_ONLY, REDUNDANT, Checkpoint, FileRecord

_SKIP_REASONS = {
    PEFT_ONLY: "peft-only: no merged weights to remove",
    LEGACY: "legacy: no complete PEFT tree; migrate it first",
    BROKEN: "broken: has validation errors",
    IN_PROGRESS: "in-progress: being written or younger than --min-age",
}


@dataclass(frozen=True)
class PlannedDeletion:
    """One merged-weight file to unlink, with the identity it must still have."""

    root: str
    checkpoint: str        # relative to root
    relpath: str           # relative to the checkpoint
    record: FileRecord
    frees_bytes: int       # 0 when other hard links keep the data alive
    held_by_links: int     # bytes that stay allocated because of links outside the plan

    @property
    def path(self) -> str:
        return self.relpath if self.checkpoint == "." else f"{self.checkpoint}/{self.relpath}"


@dataclass(frozen=True)
class Skip:
    root: str
    path: str
    reason: str


@dataclass(frozen=True)
class PrunePlan:
    deletions: tuple[PlannedDeletion, ...]
    skipped: tuple[Skip, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(d.frees_bytes for d in self.deletions)

    @property
    def held_bytes(self) -> int:
        return sum(d.held_by_links for d in self.deletions)

    def by_checkpoint(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for d in self.deletions:
            key = (d.root, d.checkpoint)
            out[key] = out.get(key, 0) + d.frees_bytes
        return out

    def to_dict(self) -> dict:
        return {
            "deleted": [{"path": d.path, "bytes": d.frees_bytes} for d in self.deletions],
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "freed_bytes": self.freed_bytes,
        }


def plan_prune(checkpoints) -> PrunePlan:
    """The merged-weight files of ``redundant`` checkpoints, with exact bytes freed.

    A file frees its blocks only when every hard link to it is in the plan; what
    other links keep alive is reported as ``held_by_links``.
    """
    candidates: list[tuple[Checkpoint, FileRecord]] = []
    skipped: list[Skip] = []
    for c in checkpoints:
        if c.status != REDUNDANT:
            if c.merged_files:
                skipped.append(Skip(c.dir.root, c.path, _SKIP_REASONS.get(c.status, c.status)))
            continue
        for rel in c.merged_files:
            rec = c.dir.file(rel)
            if rec is not None:
                candidates.append((c, rec))
    links_in_plan: dict[tuple[int, int], int] = {}
    for _, rec in candidates:
        if not rec.is_symlink:
            key = (rec.dev, rec.ino)
            links_in_plan[key] = links_in_plan.get(key, 0) + 1
    credited: set[tuple[int, int]] = set()
    deletions = []
    for c, rec in candidates:
        key = (rec.dev, rec.ino)
        if rec.is_symlink:
            frees, held = rec.allocated, 0
        elif links_in_plan[key] >= rec.nlink:
            frees, held = (0 if key in credited else rec.allocated), 0
            credited.add(key)
        else:
            frees, held = 0, (0 if key in credited else rec.allocated)
            credited.add(key)
        deletions.append(PlannedDeletion(c.dir.root, c.path, rec.relpath, rec, frees, held))
    return PrunePlan(tuple(deletions), tuple(skipped))
