"""The trash of ``prune --delete``: a checkpoint leaves its run in one rename, waits out a grace
period, then is purged; until then ``restore`` (or a plain ``mv``) brings it back.

Each run directory has its own trash, ``<run>/.ckpt-tools-trash`` (``layout.TRASH_DIR``; the
scanner never walks it), on the same file system as the run, so the move is one ``rename``:
neither the Trainer's resume nor an audit ever sees a half-deleted ``checkpoint-N``. An entry
is named ``<name>.deleted-<UTC yyyymmddThhmmssZ>`` (``-<n>`` added where that name is taken):
the name alone says what it was and when it went, so ``mv`` restores it and a purge needs no
index beside it. The trash directory is created with the run directory's permission bits and,
where the process may (as root), its owner and group: whoever could manage the run's
checkpoints can list and restore its trash, and nobody who could not read the run can read it.

A purge first renames a due entry to ``<entry>.purging``, then removes what is under it: a
purge killed halfway leaves a partly removed entry that ``restore`` refuses and the next purge
finishes whatever its age. Removal goes through directory handles opened without following
symlinks (a link is removed itself, never its target), and every rename, unlink and rmdir
through the ``fs.FileOps`` seam. The caller holds the root's lock (``locking.root_lock``).

Bytes are allocated bytes, hard links counted once: ``allocated_bytes`` is what an entry holds,
``frees_bytes`` what purging it alone frees (a file also linked from outside it frees nothing).
"""

from __future__ import annotations

import calendar
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import layout, scanner
from ..errors import ProblemsError, UsageError
from ..fs import FileOps, SyncError, fsync, local_or
from ..records import Checkpoint, CheckpointDir, FileRecord

# A week: long enough to span a weekend or a holiday during which nobody reads the nightly
# cron's mail, short enough that deleted checkpoints do not hold the disk for long.
DEFAULT_PURGE_AFTER_S = 7 * 86400

PURGING_SUFFIX = ".purging"
_STAMP = "%Y%m%dT%H%M%SZ"
_ENTRY_RE = re.compile(r"(?P<original>.+)\.deleted-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>[1-9]\d{0,5}))?"
                       r"(?P<purging>\.purging)?", re.DOTALL)
_MAX_SAME_NAME = 1000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class MoveSkipped(Exception):
    """The checkpoint is not what the plan saw (or is a symlink): nothing was touched.
    ``str()`` is the reason."""


class MoveFailed(Exception):
    """Storage refused the move or what follows it. ``entry`` is where the checkpoint is now
    when it did reach the trash (a sync or a timestamp failed after the rename), else None:
    it is still in place."""

    def __init__(self, reason: str, entry: TrashEntry | None = None):
        super().__init__(reason)
        self.entry = entry


class NotATrashEntry(UsageError):
    """A path ``restore`` was given that is no entry of a run's trash (exit 2)."""


class RestoreFailed(ProblemsError):
    """An entry that could not be put back: its name is taken, or the rename failed (exit 1)."""


@dataclass(frozen=True)
class TrashEntry:
    """One entry of a run's trash. ``original_name`` and ``deleted_at`` (epoch seconds, UTC)
    come from its name; both are None where the name is not one the trash gives."""

    run_dir: str
    name: str
    original_name: str | None
    deleted_at: float | None
    allocated_bytes: int
    frees_bytes: int
    purging: bool = False          # a purge began on it: partly removed, never restored

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, layout.TRASH_DIR, self.name)

    @property
    def original_path(self) -> str | None:
        return None if self.original_name is None else os.path.join(self.run_dir, self.original_name)

    def to_dict(self) -> dict:
        return {"path": self.path, "original_name": self.original_name,
                "deleted_at": _iso(self.deleted_at), "allocated_bytes": self.allocated_bytes,
                "frees_bytes": self.frees_bytes, "purging": self.purging}


@dataclass(frozen=True)
class PurgeResult:
    """What one purge of a run's trash did: entries ``purged`` with the bytes each freed,
    entries ``waiting`` for their grace period, ``failed`` (path, reason) pairs (such an entry
    stays, marked purging, for the next purge), and ``warnings`` (entries left alone)."""

    purged: tuple[tuple[TrashEntry, int], ...] = ()
    waiting: tuple[TrashEntry, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(freed for _, freed in self.purged)

    @property
    def waiting_bytes(self) -> int:
        """What purging the entries still waiting would free."""
        return sum(e.frees_bytes for e in self.waiting)

    @property
    def ok(self) -> bool:
        return not self.failed


def trash_dir(run_dir: str) -> str:
    return os.path.join(run_dir, layout.TRASH_DIR)


def parse_entry_name(name: str) -> tuple[str, float, bool] | None:
    """``(original name, deleted at, purging)`` of a trash entry's name; None where the name is
    not one the trash gives (or names no entry of a directory)."""
    m = _ENTRY_RE.fullmatch(name)
    if m is None or m["original"] in (".", "..") or "/" in m["original"]:
        return None
    try:
        deleted_at = float(calendar.timegm(time.strptime(m["stamp"], _STAMP)))
    except (ValueError, OverflowError):
        return None
    return m["original"], deleted_at, bool(m["purging"])


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- move ------------------------------------------------------------------------------------

def move_to_trash(fs: FileOps | None, root: str, checkpoint: Checkpoint | CheckpointDir, *,
                  now: float, check: Callable[[CheckpointDir], str | None] | None = None) -> TrashEntry:
    """Move ``checkpoint`` (as planned, under ``root``) into its run's trash in one rename.

    Right before it, the checkpoint is re-scanned: its directory must be the one planned
    (device and inode; no symlink on the way from ``root``, nor the checkpoint itself a
    symlink) and every file's identity (device, inode, size, mtime) the plan's, or, where
    ``check`` is given, ``check(rescanned)`` must return None instead (else its reason).
    After it, the trash and the run directory are fsynced (where ``fs.durable_fsync``) and
    the run directory's timestamps set back (the Trainer's rotation sorts by mtime).

    Raises ``MoveSkipped`` (nothing touched) or ``MoveFailed``; returns the entry made.
    """
    fs = local_or(fs)
    planned = checkpoint.dir if isinstance(checkpoint, Checkpoint) else checkpoint
    if not fs.atomic_rename:
        raise MoveFailed("not moved: this storage cannot rename a directory at once, and a "
                         "checkpoint moved file by file would be seen half-deleted")
    if planned.path == ".":
        raise MoveSkipped("the root itself is this checkpoint: its run's trash would lie outside the root")
    root_abs = os.path.abspath(root)
    parts = planned.path.split("/")
    path = os.path.join(root_abs, *parts)
    run_dir = os.path.dirname(path)
    st = _planned_directory(root_abs, parts, planned)
    fresh = _rescanned(root, planned)
    reason = check(fresh) if check is not None else _files_changed(planned, fresh)
    if reason:
        raise MoveSkipped(reason)
    try:
        run_st = os.lstat(run_dir)
    except OSError as exc:
        raise MoveSkipped(f"cannot look at its run directory: {exc.strerror or exc}") from None
    run_times = (run_st.st_atime_ns, run_st.st_mtime_ns)
    try:
        os.utime(run_dir, ns=run_times, follow_symlinks=False)   # only its owner (or root) may
    except OSError as exc:
        raise MoveFailed(f"not moved: the run directory's modification time could not be kept "
                         f"({exc.strerror or exc})") from None
    trash = _ensure_trash(fs, run_dir, run_st)
    dest = _free_name(trash, planned.name, now)
    try:
        fs.rename(path, dest)
    except OSError as exc:
        _set_times(run_dir, run_times)
        raise MoveFailed(f"not moved: cannot rename it into {trash}: {exc.strerror or exc}") from None
    try:
        moved = _moved_is_planned(fs, path, dest, planned)
    except (MoveSkipped, MoveFailed):
        _set_times(run_dir, run_times)
        raise
    entry = _entry_of(run_dir, os.path.basename(dest), fresh.files)
    problems = []
    if moved.st_mtime_ns != st.st_mtime_ns and not _set_times(dest, (st.st_atime_ns, st.st_mtime_ns)):
        problems.append("its own modification time could not be set back")
    if fs.durable_fsync:
        for d in (trash, run_dir):
            try:
                fsync(d, fs, directory=True)
            except SyncError as exc:
                problems.append(f"syncing the directory {d} failed: {exc.strerror or exc}")
    if not _set_times(run_dir, run_times):
        problems.append("the run directory's modification time could not be set back")
    if problems:
        raise MoveFailed(f"moved to {dest}, but " + "; ".join(problems), entry)
    return entry


def _planned_directory(root_abs: str, parts: list[str], planned: CheckpointDir) -> os.stat_result:
    """The checkpoint's lstat, after checking each directory below the root on the way to it
    (none a symlink) and that it is the directory planned."""
    here = root_abs
    for i, part in enumerate(parts):
        if part in ("", ".", ".."):
            raise MoveSkipped(f"unexpected path component {part!r}")
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise MoveSkipped(f"{part!r} vanished since the plan") from None
        except OSError as exc:
            raise MoveSkipped(f"cannot look at {part!r}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            what = "the checkpoint" if i == len(parts) - 1 else repr(part)
            raise MoveSkipped(f"{what} is a symlink: neither it nor its target is moved")
        if not stat.S_ISDIR(st.st_mode):
            raise MoveSkipped(f"{part!r} is no longer a directory")
    if not planned.ino or (st.st_dev, st.st_ino) != (planned.dev, planned.ino):
        raise MoveSkipped("the checkpoint directory was replaced since the plan")
    return st


def _rescanned(root: str, planned: CheckpointDir) -> CheckpointDir:
    try:
        fresh = scanner.rescan_checkpoint(root, planned.path)
    except OSError as exc:
        raise MoveSkipped(f"cannot re-scan the checkpoint: {exc.strerror or exc}") from None
    if (fresh.dev, fresh.ino) != (planned.dev, planned.ino):
        raise MoveSkipped("the checkpoint directory was replaced since the plan")
    if fresh.unreadable:
        raise MoveSkipped(f"cannot read {fresh.unreadable[0]!r} in it: what cannot be checked is not moved")
    return fresh


def _files_changed(planned: CheckpointDir, fresh: CheckpointDir) -> str | None:
    """Why the files of ``fresh`` are not those of ``planned``; None when they are."""
    before = {f.relpath: f.identity for f in planned.files}
    after = {f.relpath: f.identity for f in fresh.files}
    if before == after:
        return None
    added = sorted(after.keys() - before.keys())
    gone = sorted(before.keys() - after.keys())
    changed = sorted(r for r in before.keys() & after.keys() if before[r] != after[r])
    for what, names in (("added", added), ("vanished", gone), ("modified", changed)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            return f"changed since the plan: {names[0]!r}{more} {what}"
    return "changed since the plan"


def _ensure_trash(fs: FileOps, run_dir: str, run_st: os.stat_result) -> str:
    trash = trash_dir(run_dir)
    try:
        st = os.lstat(trash)
    except FileNotFoundError:
        try:
            fs.mkdir(trash)
        except OSError as exc:
            raise MoveFailed(f"not moved: cannot create {trash}: {exc.strerror or exc}") from None
        _like_run_dir(trash, run_st)
        return trash
    if not stat.S_ISDIR(st.st_mode):
        raise MoveFailed(f"not moved: {trash} is not a directory (a symlink or a file); "
                         "nothing is moved into it")
    return trash


def _like_run_dir(trash: str, run_st: os.stat_result) -> None:
    """The run directory's permission bits and, where allowed, its owner and group."""
    try:
        fd = os.open(trash, _DIR_FLAGS)
    except OSError:
        return
    try:
        os.fchmod(fd, stat.S_IMODE(run_st.st_mode))
        if os.geteuid() == 0:
            os.fchown(fd, run_st.st_uid, run_st.st_gid)
    except OSError:
        pass   # the umask's mode and our own owner: still a working trash
    finally:
        os.close(fd)


def _free_name(trash: str, name: str, now: float) -> str:
    base = f"{name}.deleted-{time.strftime(_STAMP, time.gmtime(now))}"
    for n in range(_MAX_SAME_NAME):
        candidate = os.path.join(trash, base if n == 0 else f"{base}-{n}")
        # a rename onto an empty directory would replace it: every name taken counts
        if not any(os.path.lexists(c) for c in (candidate, candidate + PURGING_SUFFIX)):
            return candidate
    raise MoveFailed(f"not moved: {_MAX_SAME_NAME} entries named {base} already in {trash}")


def _moved_is_planned(fs: FileOps, path: str, dest: str, planned: CheckpointDir) -> os.stat_result:
    """The lstat of what was moved, if it is the directory planned; a directory swapped in
    between the checks and the rename is put back, and skipped."""
    try:
        st = os.lstat(dest)
    except OSError as exc:
        raise MoveFailed(f"moved to {dest}, but it cannot be looked at there: {exc.strerror or exc}") from None
    if (st.st_dev, st.st_ino) == (planned.dev, planned.ino):
        return st
    try:
        fs.rename(dest, path)
    except OSError as exc:
        raise MoveFailed(f"another directory took its place just before the move and went to "
                         f"{dest}; putting it back failed: {exc.strerror or exc}") from None
    raise MoveSkipped("the checkpoint directory was replaced just before the move; put back")


def _set_times(path: str, times: tuple[int, int]) -> bool:
    try:
        os.utime(path, ns=times, follow_symlinks=False)
    except OSError:
        return False
    return True


# --- list ------------------------------------------------------------------------------------

def _tally(records: Iterable[tuple[int, int, int, int]]) -> tuple[int, int]:
    """(allocated, freed by removing all of these) of (dev, ino, nlink, allocated) rows, each
    file once however many of its links are among them."""
    seen: dict[tuple[int, int], list[int]] = {}
    for dev, ino, nlink, allocated in records:
        row = seen.setdefault((dev, ino), [0, nlink, allocated])
        row[0] += 1
    allocated = sum(a for _, _, a in seen.values())
    frees = sum(a for links, nlink, a in seen.values() if links >= nlink)
    return allocated, frees


def _entry_of(run_dir: str, name: str, files: Iterable[FileRecord] | None = None) -> TrashEntry:
    """The entry ``name`` of the run's trash; its bytes from ``files`` (a scan of it) or a walk."""
    if files is not None:
        rows = [(f.dev, f.ino, 1 if f.is_symlink else f.nlink, f.allocated) for f in files]
    else:
        rows = list(_walk_rows(os.path.join(trash_dir(run_dir), name)))
    allocated, frees = _tally(rows)
    parsed = parse_entry_name(name)
    original, deleted_at, purging = parsed if parsed is not None else (None, None, False)
    return TrashEntry(run_dir, name, original, deleted_at, allocated, frees, purging)


def _walk_rows(top: str):
    """(dev, ino, nlink, allocated) of every file under ``top``, symlinks not followed."""
    try:
        st = os.lstat(top)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield st.st_dev, st.st_ino, 1 if stat.S_ISLNK(st.st_mode) else st.st_nlink, st.st_blocks * 512
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                s = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            nlink = 1 if stat.S_ISLNK(s.st_mode) else s.st_nlink
            yield s.st_dev, s.st_ino, nlink, s.st_blocks * 512


def list_trash(run_dir: str) -> list[TrashEntry]:
    """The entries of the run's trash, by name (ckpt-tools' own lock file left out); empty
    when it has none, or when its trash is not a directory (a symlink is never followed)."""
    trash = trash_dir(run_dir)
    try:
        if not stat.S_ISDIR(os.lstat(trash).st_mode):
            return []
        names = sorted(os.listdir(trash))
    except OSError:
        return []
    return [_entry_of(run_dir, n) for n in names if not layout.is_own_bookkeeping(n)]


# --- purge -----------------------------------------------------------------------------------

def purge(fs: FileOps | None, run_dir: str, *, older_than_s: float, now: float,
          purge_now: bool = False) -> PurgeResult:
    """Remove the entries of the run's trash deleted more than ``older_than_s`` before ``now``
    (all of them with ``purge_now``), and any a killed purge left partly removed. An entry
    whose name does not parse is left alone with a warning. An emptied trash is removed and
    the run directory's timestamps set back."""
    fs = local_or(fs)
    trash = trash_dir(run_dir)
    try:
        if stat.S_ISLNK(os.lstat(trash).st_mode):
            return PurgeResult(warnings=(f"{trash}: a symlink, not a trash: left alone",))
    except FileNotFoundError:
        return PurgeResult()
    purged, waiting, failed, warnings = [], [], [], []
    for entry in list_trash(run_dir):
        if entry.deleted_at is None:
            warnings.append(f"{entry.path}: not a name ckpt-tools gives its trash "
                            "(<name>.deleted-<UTC time>): left alone")
        elif entry.purging or purge_now or now - entry.deleted_at >= older_than_s:
            error, freed = _purge_entry(fs, entry)
            if error is None:
                purged.append((entry, freed))
            else:
                failed.append((entry.path, error))
        else:
            waiting.append(entry)
    if purged and not failed and not warnings and not waiting:
        _remove_empty_trash(fs, run_dir)
    return PurgeResult(tuple(purged), tuple(waiting), tuple(failed), tuple(warnings))


def _purge_entry(fs: FileOps, entry: TrashEntry) -> tuple[str | None, int]:
    """(None or why it failed, bytes freed): marked purging first, so that what a kill leaves
    is never restored and is finished by the next purge."""
    path = entry.path
    if not entry.purging:
        marked = path + PURGING_SUFFIX
        try:
            fs.rename(path, marked)
            if fs.durable_fsync:
                fsync(os.path.dirname(path), fs, directory=True)
        except OSError as exc:
            return f"cannot mark it purging: {exc.strerror or exc}", 0
        path = marked
    removal = _Removal(fs)
    removal.remove(path)
    if removal.error is not None:
        exc = removal.error
        return (f"partly removed, left as {path} for the next purge: "
                f"{exc.filename or path}: {exc.strerror or exc}"), removal.freed
    return None, removal.freed


class _Removal:
    """Remove a tree through directory handles opened without following symlinks, going on
    past errors (the first kept), counting the bytes each unlink frees. Not ``fs.remove_tree``:
    that one walks by path and cannot say what each unlink frees."""

    def __init__(self, fs: FileOps):
        self.fs = fs
        self.freed = 0
        self.error: OSError | None = None

    def _failed(self, exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            self.error = self.error or exc

    def remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._failed(exc)
            return
        if not stat.S_ISDIR(st.st_mode):
            self._unlink(path, None, st)
            return
        self._directory(path, None, os.path.basename(path))

    def _directory(self, path: str, parent_fd: int | None, name: str) -> None:
        try:
            fd = os.open(name if parent_fd is not None else path, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            self._failed(exc)
            return
        try:
            with os.scandir(fd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in children:
                if is_dir:
                    self._directory(os.path.join(path, child), fd, child)
                else:
                    try:
                        st = self.fs.lstat(child, dir_fd=fd)
                    except OSError as exc:
                        self._failed(exc)
                        continue
                    self._unlink(child, fd, st, shown=os.path.join(path, child))
        except OSError as exc:
            self._failed(exc)
        finally:
            os.close(fd)
        try:
            self.fs.rmdir(path)
        except OSError as exc:
            self._failed(exc)

    def _unlink(self, name: str, dir_fd: int | None, st: os.stat_result, shown: str | None = None) -> None:
        try:
            self.fs.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = shown or name
            self._failed(exc)
            return
        if stat.S_ISLNK(st.st_mode) or st.st_nlink <= 1:   # its last link: the blocks go
            self.freed += st.st_blocks * 512


def _remove_empty_trash(fs: FileOps, run_dir: str) -> None:
    trash = trash_dir(run_dir)
    try:
        st = os.lstat(run_dir)
        fs.rmdir(trash)        # fails, harmlessly, where anything (a lock file) is left
    except OSError:
        return
    _set_times(run_dir, (st.st_atime_ns, st.st_mtime_ns))


# --- restore ---------------------------------------------------------------------------------

def restore(fs: FileOps | None, trash_path: str) -> str:
    """Rename the trash entry ``trash_path`` back to its original name in its run; returns
    that path. Raises ``NotATrashEntry`` (not an entry, or one a purge began on) or
    ``RestoreFailed`` (the original name is taken, or the rename failed)."""
    fs = local_or(fs)
    path = os.path.abspath(trash_path)
    entry = trash_entry_at(path)
    target = entry.original_path
    if os.path.lexists(target):
        raise RestoreFailed(f"cannot restore {path}: {target} already exists; move one of them "
                            "aside first")
    try:
        run_st, st = os.lstat(entry.run_dir), os.lstat(path)
    except OSError as exc:
        raise RestoreFailed(f"cannot restore {path}: {exc.filename}: {exc.strerror or exc}") from None
    try:
        fs.rename(path, target)
    except OSError as exc:
        raise RestoreFailed(f"cannot restore {path} to {target}: {exc.strerror or exc}") from None
    moved = os.lstat(target)
    if moved.st_mtime_ns != st.st_mtime_ns:
        _set_times(target, (st.st_atime_ns, st.st_mtime_ns))
    try:
        if fs.durable_fsync:
            fsync(entry.run_dir, fs, directory=True)
            fsync(trash_dir(entry.run_dir), fs, directory=True)
    except SyncError as exc:
        raise RestoreFailed(f"restored {target}, but syncing the directory {exc.filename} "
                            f"failed: {exc.strerror or exc}") from None
    finally:
        _set_times(entry.run_dir, (run_st.st_atime_ns, run_st.st_mtime_ns))
    return target


def trash_entry_at(path: str) -> TrashEntry:
    """The entry at ``path`` (absolute) if it is a restorable entry of a run's trash, the
    trash a real directory; else ``NotATrashEntry`` saying why."""
    parent, name = os.path.split(path.rstrip(os.sep))
    run_dir, trash_name = os.path.split(parent)
    if trash_name != layout.TRASH_DIR:
        raise NotATrashEntry(f"{path}: not in a run's trash ({layout.TRASH_DIR}/<name>.deleted-<UTC time>)")
    parsed = parse_entry_name(name)
    if parsed is None:
        raise NotATrashEntry(f"{path}: not a name ckpt-tools gives its trash (<name>.deleted-<UTC time>)")
    try:
        trash_st, st = os.lstat(parent), os.lstat(path)
    except OSError as exc:
        raise NotATrashEntry(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(trash_st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotATrashEntry(f"{path}: not a directory in a run's trash (a symlink is never followed)")
    if parsed[2]:
        raise NotATrashEntry(f"{path}: a purge began removing it; what is left cannot be restored")
    return TrashEntry(run_dir, name, parsed[0], parsed[1], 0, 0)


__all__ = ["DEFAULT_PURGE_AFTER_S", "PURGING_SUFFIX", "TrashEntry", "PurgeResult", "MoveSkipped",
           "MoveFailed", "NotATrashEntry", "RestoreFailed", "move_to_trash", "list_trash", "purge",
           "restore", "trash_dir", "trash_entry_at", "parse_entry_name"]
