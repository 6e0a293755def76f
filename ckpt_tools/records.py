"""Immutable records produced by the scanner and the validator.

Sizes are integers of bytes everywhere; rendering them for people happens in
``report.py`` only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .problems import Problem

PEFT_ONLY = "peft-only"
REDUNDANT = "redundant"
LEGACY = "legacy"
BROKEN = "broken"
IN_PROGRESS = "in-progress"
STATUSES = (PEFT_ONLY, REDUNDANT, LEGACY, BROKEN, IN_PROGRESS)


@dataclass(frozen=True)
class FileRecord:
    """One directory entry inside a checkpoint, as ``lstat`` saw it during the scan."""

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

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """What must not change between planning and deleting."""
        return (self.dev, self.ino, self.size, self.mtime_ns)

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


_FILE_FIELDS = ("relpath", "size", "allocated", "dev", "ino", "nlink", "mtime_ns", "is_symlink",
                "symlink_target", "escapes_root", "target_size", "is_regular")
_new = object.__new__
_set = object.__setattr__


def file_record_from_row(row: tuple) -> FileRecord:
    """A ``FileRecord`` from its field values in declaration order, as ``FileRecord(*row)``
    makes it, at a third of the cost (scans build tens of thousands of them)."""
    (relpath, size, allocated, dev, ino, nlink, mtime_ns, is_symlink, symlink_target,
     escapes_root, target_size, is_regular) = row
    rec = _new(FileRecord)
    _set(rec, "__dict__", {
        "relpath": relpath, "size": size, "allocated": allocated, "dev": dev, "ino": ino,
        "nlink": nlink, "mtime_ns": mtime_ns, "is_symlink": is_symlink,
        "symlink_target": symlink_target, "escapes_root": escapes_root,
        "target_size": target_size, "is_regular": is_regular})
    return rec


def file_records_from_rows(rows) -> tuple[FileRecord, ...]:
    """``tuple(FileRecord(*row) for row in rows)``, fast."""
    return tuple(map(file_record_from_row, rows))


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint directory as found on disk, before any file is opened."""

    root: str             # the root as given on the command line
    path: str             # relative to root, '/'-separated; '.' when the root is the checkpoint
    run: str              # the run directory, relative to root ('.' for the root itself)
    name: str
    step: int | None
    files: tuple[FileRecord, ...]
    newest_mtime_ns: int
    tmp_name: bool        # named tmp-checkpoint-*: always in progress
    unreadable: tuple[str, ...] = ()   # sub-paths the scan could not list (permission)
    dev: int = 0                       # identity of the directory itself, as scanned
    ino: int = 0

    @property
    def abspath(self) -> str:
        return os.path.normpath(os.path.join(self.root, self.path))

    def file(self, relpath: str) -> FileRecord | None:
        if "files" not in self.__dict__:  # built from rows: make only the record asked for
            for row in self.__dict__["_file_rows"]:
                if row[0] == relpath:
                    return file_record_from_row(row)
            return None
        for f in self.files:
            if f.relpath == relpath:
                return f
        return None

    def __getattr__(self, name: str):
        # Reached only for an attribute the instance lacks: ``files`` of a directory that
        # ``checkpoint_from_rows`` made, which holds the rows and builds the records on
        # first use (a scan makes tens of thousands and most are never looked at).
        if name == "files":
            rows = self.__dict__.get("_file_rows")
            if rows is not None:
                files = file_records_from_rows(rows)
                _set(self, "files", files)
                return files
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def checkpoint_from_rows(values: tuple) -> CheckpointDir:
    """The ``CheckpointDir`` of the field values ``values``, in declaration order, with
    ``files`` as FileRecord rows (see ``file_records_from_rows``); its records are built
    when first asked for."""
    root, path, run, name, step, rows, newest, tmp_name, unreadable, dev, ino = values
    ckpt = _new(CheckpointDir)
    _set(ckpt, "__dict__", {"root": root, "path": path, "run": run, "name": name, "step": step,
                            "_file_rows": rows, "newest_mtime_ns": newest, "tmp_name": tmp_name,
                            "unreadable": unreadable, "dev": dev, "ino": ino})
    return ckpt


def file_rows(ckpt: CheckpointDir) -> tuple[tuple, ...]:
    """``ckpt``'s files as FileRecord rows, without building records that do not exist yet."""
    rows = ckpt.__dict__.get("_file_rows")
    if rows is None:
        rows = tuple(tuple(getattr(f, name) for name in _FILE_FIELDS) for f in ckpt.files)
    return rows


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint with its verdict: status, layout, problems and what prune could free."""

    dir: CheckpointDir
    status: str
    layout: str
    problems: tuple[Problem, ...]
    merged_files: tuple[str, ...]      # relpaths (to the checkpoint) of merged-weight files
    num_experts: int | None
    size_bytes: int = 0
    reclaimable_bytes: int = 0
    facts: dict = field(default_factory=dict, compare=False, hash=False)

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

    def to_dict(self) -> dict:
        d = self.dir
        return {
            "path": d.path,
            "root": d.root,
            "run": d.run,
            "step": d.step,
            "status": self.status,
            "layout": self.layout,
            "size_bytes": self.size_bytes,
            "reclaimable_bytes": self.reclaimable_bytes,
            "problems": [p.to_dict() for p in self.problems],
        }


def checkpoint_record(dir: CheckpointDir, status: str, layout: str, problems: tuple,
                      merged_files: tuple, num_experts: int | None, size_bytes: int = 0,
                      reclaimable_bytes: int = 0, facts: dict | None = None) -> Checkpoint:
    """``Checkpoint(...)`` with these fields, at a fraction of the frozen ``__init__``'s cost."""
    rec = _new(Checkpoint)
    _set(rec, "__dict__", {"dir": dir, "status": status, "layout": layout, "problems": problems,
                           "merged_files": merged_files, "num_experts": num_experts,
                           "size_bytes": size_bytes, "reclaimable_bytes": reclaimable_bytes,
                           "facts": {} if facts is None else facts})
    return rec


@dataclass(frozen=True)
class Run:
    root: str
    path: str
    checkpoints: tuple[Checkpoint, ...]

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
        return {
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "totals": {
                "checkpoints": len(self.checkpoints),
                "runs": len(self.runs),
                "by_status": self.by_status(),
                "size_bytes": self.size_bytes,
                "reclaimable_bytes": self.reclaimable_bytes,
            },
            "problems": [p.to_dict() for p in self.problems],
        }
