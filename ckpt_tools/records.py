"""Immutable records produced by the scanner and the validator.

Sizes are integers of bytes everywhere; rendering them for people happens in
``report.py`` only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from . import layout
from .kinds import Layout, ModelKind, Status
from .problems import Problem

if TYPE_CHECKING:   # the validator imports this module: no cycle at run time
    from .trainer_state import Evaluation, RunTrainerState
    from .validator import Verdict, VerdictFacts

# The names other modules use; the members are the documented strings (kinds.Status).
HEALTHY = Status.HEALTHY
REDUNDANT = Status.REDUNDANT
LEGACY = Status.LEGACY
BROKEN = Status.BROKEN
IN_PROGRESS = Status.IN_PROGRESS
STATUSES = tuple(Status)


class FileRecord(NamedTuple):
    """One directory entry inside a checkpoint, as ``lstat`` saw it during the scan.

    A named tuple: a scan makes one per file (hundreds of thousands) and worker processes
    send them back pickled, where a tuple costs a fraction of an object with a ``__dict__``.
    """

    relpath: str          # relative to the checkpoint directory, '/'-separated
    size: int             # st_size (for a symlink: the link itself)
    allocated: int        # st_blocks * 512: what deleting the last link frees
    dev: int
    ino: int
    nlink: int
    mtime_ns: int
    is_symlink: bool = False
    symlink_target: str | None = None   # absolute, resolved; None when dangling or not a link
    escapes_root: bool = False          # a symlink whose target lies outside the root
    target_size: int | None = None      # size of the symlink's target when it stays in the root
    is_regular: bool = True             # a regular file (not a link, FIFO, socket or device)
    uid: int | None = None              # the owner's user id (None: not scanned)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """What must not change between planning and deleting."""
        return (self.dev, self.ino, self.size, self.mtime_ns)

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


# ``FileRecord._make`` without its length check: the scanner's rows always have every field.
_file_record = tuple.__new__


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint directory as found on disk, before any file is opened."""

    root: str             # the root as given on the command line
    path: str             # relative to root, '/'-separated; '.' when the root is the checkpoint
    run: str              # the run directory, relative to root ('.' for the root itself)
    name: str
    step: int | None
    files: tuple[FileRecord, ...]      # sorted by relpath
    newest_mtime_ns: int
    tmp_name: bool        # named tmp-checkpoint-*: always in progress
    unreadable: tuple[str, ...] = ()   # sub-paths the scan could not list (permission)
    dev: int = 0                       # identity of the directory itself, as scanned
    ino: int = 0

    @classmethod
    def from_values(cls, values: tuple) -> CheckpointDir:
        """The directory whose field values, in declaration order, are ``values``, with
        ``files`` as plain tuples of FileRecord fields: what the scanner collects and
        worker processes send back."""
        root, path, run, name, step, rows, newest, tmp_name, unreadable, dev, ino = values
        files = tuple([_file_record(FileRecord, row) for row in rows])
        return cls(root, path, run, name, step, files, newest, tmp_name, unreadable, dev, ino)

    @property
    def abspath(self) -> str:
        return os.path.normpath(os.path.join(self.root, self.path))

    def file(self, relpath: str) -> FileRecord | None:
        for f in self.files:
            if f.relpath == relpath:
                return f
        return None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint with its verdict: status, layout, problems and what prune could free."""

    dir: CheckpointDir
    status: Status
    layout: Layout
    problems: tuple[Problem, ...]
    merged_files: tuple[str, ...]      # relpaths (to the checkpoint) of merged-weight files
    num_experts: int | None
    size_bytes: int = 0
    reclaimable_bytes: int = 0
    facts: VerdictFacts | None = field(default=None, compare=False, hash=False)  # None: no verdict
    # From the run's trainer_state.json (``trainer_state.RunTrainerState.annotated``):
    best_of_run: bool = False            # the run's best_model_checkpoint, found by name
    evaluation: Evaluation | None = None  # eval metrics at this step, or the last before it
    model_kind: ModelKind = ModelKind.UNKNOWN   # UNKNOWN also where there was no verdict

    def __post_init__(self):
        # Records built from strings (a plan read back, a caller's own) get the members too.
        if type(self.status) is not Status:
            object.__setattr__(self, "status", Status(self.status))
        if type(self.layout) is not Layout:
            object.__setattr__(self, "layout", Layout(self.layout))
        if type(self.model_kind) is not ModelKind:
            object.__setattr__(self, "model_kind", ModelKind(self.model_kind))

    @classmethod
    def from_verdict(cls, dir: CheckpointDir, verdict: Verdict, size_bytes: int = 0) -> Checkpoint:
        """The record of ``dir`` judged ``verdict``; what prune could free is filled in
        later, over all the checkpoints of a scan (``api.assemble``)."""
        return cls(dir, verdict.status, verdict.layout, tuple(verdict.problems),
                   verdict.merged_files, verdict.num_experts, size_bytes, facts=verdict.facts,
                   model_kind=verdict.model_kind)

    def with_reclaimable(self, reclaimable_bytes: int) -> Checkpoint:
        return dataclasses.replace(self, reclaimable_bytes=reclaimable_bytes)

    @property
    def path(self) -> str:
        return self.dir.path

    @property
    def run(self) -> str:
        return self.dir.run

    @property
    def step(self) -> int | None:
        return self.dir.step

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.is_error)

    @property
    def fresh(self) -> bool:
        """Complete and judged by what it holds, but a file of it is younger than the minimum
        age: prune and migrate leave it alone all the same."""
        return self.facts is not None and self.facts.young and self.status is not Status.IN_PROGRESS

    def is_training_state(self, relpath: str) -> bool:
        """Whether the file at ``relpath`` is only needed to resume training (optimizer,
        scheduler, scaler, RNG state, DeepSpeed's and FSDP's optimizer state). Where DeepSpeed's
        partitioned state is the only copy of the model (ZeRO-3 without gathered weights), its
        global_step*/ is not: the model cannot be had without it."""
        return layout.is_resume_only(relpath) and not (
            self.model_kind is ModelKind.DEEPSPEED and layout.is_deepspeed_dir(relpath.split("/", 1)[0]))

    @property
    def training_state_bytes(self) -> int:
        """Bytes only resuming needs (``is_training_state``): what stripping it would free."""
        return sum(f.allocated for f in self.dir.files if self.is_training_state(f.relpath))

    @property
    def stripped(self) -> bool:
        """Its training state was stripped by ckpt-tools, or a strip of it began (its marker)."""
        return self.dir.file(layout.STRIP_MARKER) is not None

    @property
    def resumable(self) -> bool:
        """Whether the Trainer could resume from it: judged sound, its trainer_state.json and its
        optimizer state (optimizer.pt, DeepSpeed's global_step*/, FSDP's optimizer_*/) there,
        and never stripped. Without the optimizer state the Trainer starts a new optimizer and
        schedule silently (README, "Stripped checkpoints")."""
        if self.status in (BROKEN, IN_PROGRESS) or self.stripped:
            return False
        files = self.dir.files
        return any(f.relpath == layout.TRAINER_STATE_JSON for f in files) and any(
            f.relpath == layout.OPTIMIZER_STATE or ("/" in f.relpath and layout.is_resume_only(f.relpath))
            for f in files)

    @property
    def adapters(self) -> tuple:
        return () if self.facts is None else self.facts.adapters

    def to_dict(self) -> dict:
        d = self.dir
        return {
            "path": d.path,
            "root": d.root,
            "run": d.run,
            "step": d.step,
            "status": self.status,
            "model_kind": self.model_kind,
            "layout": self.layout,
            "fresh": self.fresh,
            "size_bytes": self.size_bytes,
            "reclaimable_bytes": self.reclaimable_bytes,
            "training_state_bytes": self.training_state_bytes,
            "resumable": self.resumable,
            "adapters": [{"name": a.name, "peft_type": a.peft_type} for a in self.adapters],
            "problems": [p.to_dict() for p in self.problems],
            "best_of_run": self.best_of_run,
            "metrics": None if self.evaluation is None else self.evaluation.as_dict(),
            "metrics_step": None if self.evaluation is None else self.evaluation.step,
        }


@dataclass(frozen=True)
class Run:
    root: str
    path: str
    checkpoints: tuple[Checkpoint, ...]
    trainer: RunTrainerState | None = None   # None: not read (a run assembled by hand)
    # the files in the run's trash (layout.TRASH_DIR), relpaths relative to the run
    trash: tuple[FileRecord, ...] = ()

    def to_dict(self) -> dict:
        doc = {"root": self.root, "path": self.path}
        if self.trainer is None:
            from .trainer_state import RunTrainerState
            return doc | RunTrainerState().to_dict()
        return doc | self.trainer.to_dict()

    @property
    def size_bytes(self) -> int:
        return sum(c.size_bytes for c in self.checkpoints)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(c.reclaimable_bytes for c in self.checkpoints)


@dataclass(frozen=True)
class ScanResult:
    """Everything found under some roots. ``problems`` holds those tied to no checkpoint."""

    roots: tuple[str, ...]
    runs: tuple[Run, ...]
    problems: tuple[Problem, ...] = ()
    total_size_bytes: int | None = None   # with hard links across checkpoints counted once

    @property
    def checkpoints(self) -> tuple[Checkpoint, ...]:
        return tuple(c for r in self.runs for c in r.checkpoints)

    def by_status(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for c in self.checkpoints:
            counts[c.status] += 1
        return counts

    @property
    def size_bytes(self) -> int:
        if self.total_size_bytes is not None:
            return self.total_size_bytes
        return sum(r.size_bytes for r in self.runs)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(r.reclaimable_bytes for r in self.runs)

    def to_dict(self) -> dict:
        from .space import scan_space
        space = scan_space(self)
        return {
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "runs": [r.to_dict() | s.to_dict() for r, s in zip(self.runs, space.runs)],
            "totals": {
                "checkpoints": len(self.checkpoints),
                "runs": len(self.runs),
                "by_status": self.by_status(),
                "size_bytes": self.size_bytes,
                "reclaimable_bytes": self.reclaimable_bytes,
            } | space.total.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
        }
