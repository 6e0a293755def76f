"""Plan the deletion of redundant merged weights.

Planning reads records and returns a ``PrunePlan``; the only files it reads are the LoRA and
router tensors of each ``redundant`` checkpoint, to prove by content that its merged
weights hold nothing its PEFT tree lacks (``proof``). Executing a plan is in
``execute``; it re-validates, proves again and re-checks every file right before unlinking.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..kinds import ModelKind, Status
from ..records import Checkpoint, FileRecord

_SKIP_REASONS = {
    Status.HEALTHY: "healthy: no merged weights to remove",
    Status.LEGACY: "legacy: no complete PEFT tree; migrate it first",
    Status.BROKEN: "broken: has validation errors",
    Status.IN_PROGRESS: "in-progress: being written or younger than --min-age",
}
# a healthy checkpoint with merged weights: the validator's merged-export
_MERGED_EXPORT_REASON = ("healthy: its merged weights hold no LoRA tensors to compare with the "
                         "PEFT tree (a merged export); kept")


def skip_reason(c: Checkpoint) -> str:
    """Why prune leaves ``c`` alone, for people and logs (one line)."""
    if c.status is Status.BROKEN:
        codes = sorted({p.code for p in c.errors})
        return _SKIP_REASONS[Status.BROKEN] + (f" ({', '.join(codes)})" if codes else "")
    if c.status is Status.IN_PROGRESS:
        if c.dir.tmp_name:
            return "in-progress: a tmp-checkpoint-* directory is still being written"
        return "in-progress: its newest file is younger than --min-age"
    if c.fresh:
        return f"{c.status} (fresh): complete, but a file of it is younger than --min-age"
    if c.status is Status.HEALTHY and not _dylora(c):
        return f"healthy: a {c.model_kind.replace('-', ' ')}, nothing in it is redundant"
    if c.status is Status.HEALTHY and c.merged_files:
        return _MERGED_EXPORT_REASON
    return _SKIP_REASONS.get(c.status, c.status)


def _dylora(c: Checkpoint) -> bool:
    """A DyLoRA-MoE checkpoint (or a record built without a verdict, which says nothing else)."""
    return c.model_kind in (ModelKind.DYLORA_MOE, ModelKind.UNKNOWN)


@dataclass(frozen=True)
class PlannedDeletion:
    """One merged-weight file to unlink, with the identity it must still have."""

    root: str
    checkpoint: str        # relative to root
    relpath: str           # relative to the checkpoint
    record: FileRecord
    frees_bytes: int       # 0 when other hard links keep the data alive
    held_by_links: int     # bytes that stay allocated because of links outside the plan
    other_links: int = 0   # hard links to this file that the plan does not delete
    etag: str = ""         # in a bucket: the object's ETag as listed (every DELETE names it)

    @property
    def path(self) -> str:
        return self.relpath if self.checkpoint == "." else f"{self.checkpoint}/{self.relpath}"


@dataclass(frozen=True)
class Skip:
    root: str
    path: str
    reason: str
    # the checkpoint's Status when skipped at plan time; execute's CHANGED or STOPPED
    # when skipped at execute time
    status: str = ""
    fresh: bool = False    # complete, but younger than --min-age (``Checkpoint.fresh``)


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
            "held_bytes": self.held_bytes,
        }


Prover = Callable[[Checkpoint], "str | None"]
# Below this many redundant checkpoints per worker, forking costs more than the proofs.
_MIN_PROOFS_PER_WORKER = 100


def plan_prune(checkpoints: Iterable[Checkpoint], *, prove: bool | Prover = True,
               jobs: int = 1) -> PrunePlan:
    """The merged-weight files of ``redundant`` checkpoints, with exact bytes freed.

    With ``prove`` (the default) each redundant checkpoint's merged weights are first
    proven redundant by content (``proof.ContentProof``, or the callable given: None
    when proven, else the reason); one that is not is skipped with that reason and none of its
    files is planned. ``prove=False`` plans from the verdicts alone: what ``audit`` reports as
    reclaimable. ``jobs`` worker processes share the proofs of a large tree.

    A file frees its blocks only when every hard link to it is in the plan; what
    other links keep alive is reported as ``held_by_links``. Bytes are credited to
    the last link of a file in plan order, the one whose unlink really frees them.
    """
    checkpoints = list(checkpoints)
    unproven = _unproven(checkpoints, prove, jobs) if prove else {}
    candidates: list[tuple[Checkpoint, FileRecord]] = []
    skipped: list[Skip] = []
    for i, c in enumerate(checkpoints):
        if c.status is not Status.REDUNDANT or c.fresh:
            if c.merged_files and _dylora(c):   # a full model's weights are no merged copy
                skipped.append(Skip(c.dir.root, c.path, skip_reason(c), c.status, c.fresh))
            continue
        if i in unproven:
            skipped.append(Skip(c.dir.root, c.path, unproven[i], c.status))
            continue
        for rel in c.merged_files:
            rec = c.dir.file(rel)
            if rec is not None:
                candidates.append((c, rec))
    links_in_plan: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for i, (_, rec) in enumerate(candidates):
        if not rec.is_symlink:
            key = (rec.dev, rec.ino)
            links_in_plan[key] = links_in_plan.get(key, 0) + 1
            last[key] = i
    deletions = []
    for i, (c, rec) in enumerate(candidates):
        key = (rec.dev, rec.ino)
        if rec.is_symlink:
            frees, held, others = rec.allocated, 0, 0
        else:
            others = max(rec.nlink - links_in_plan[key], 0)
            credited = last[key] == i
            if others == 0:
                frees, held = (rec.allocated if credited else 0), 0
            else:
                frees, held = 0, (rec.allocated if credited else 0)
        deletions.append(PlannedDeletion(c.dir.root, c.path, rec.relpath, rec, frees, held, others))
    return PrunePlan(tuple(deletions), tuple(skipped))


def _unproven(checkpoints: list[Checkpoint], prove: bool | Prover, jobs: int) -> dict[int, str]:
    """{index: reason} of the redundant checkpoints whose merged weights are not proven
    redundant by content; with ``jobs`` > 1 and enough of them, proven in forked workers."""
    if prove is True:
        from .proof import ContentProof   # only prune proves: audit never loads it
        prove = ContentProof()
    proof: Prover = prove
    todo = [i for i, c in enumerate(checkpoints) if c.status is Status.REDUNDANT and not c.fresh]

    def run(span: tuple[int, int]) -> list[tuple[int, str]]:
        out = []
        for i in todo[span[0]:span[1]]:
            try:
                reason = proof(checkpoints[i])
            except Exception as exc:  # noqa: BLE001 - a proof that breaks proves nothing (§5.4.6)
                reason = f"merged weights not proven redundant: {type(exc).__name__}: {exc}"
            if reason is not None:
                out.append((i, reason))
        return out

    n_workers = min(jobs, len(todo) // _MIN_PROOFS_PER_WORKER)
    collecting = gc.isenabled()
    gc.disable()   # the scan's records are many and acyclic: see api.scan
    try:
        from .. import workers
        if n_workers > 1 and workers.available():
            with workers.Workers(workers.spans_of(len(todo), n_workers), n_workers, run) as w:
                return dict(item for part in w.in_order() for item in part)
        return dict(run((0, len(todo))))
    finally:
        if collecting:
            gc.enable()
