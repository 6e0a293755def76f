"""One protocol for writing a directory so that readers see all of it or none of it.

``commit(staging, write, validate=..., read_back=...)``: create the staging directory →
``write`` into it → fsync every file and directory in it (and its parent) → ``validate`` →
``read_back`` → finalize → on any failure before the end, roll back (the staging directory
is removed; whatever finalize had moved is put back). Three ways to stage, chosen by what the
storage can do (``fs.FileOps.atomic_rename``):

- ``RenameCommit``: a temporary sibling ``<parent>/.ckpt-tools-tmp-<name>-<pid>``, renamed
  onto the final name; a previous version is parked as ``.ckpt-tools-old-<name>-<pid>`` until
  the rename and the parent's fsync are done (migrate);
- ``EntriesCommit``: a temporary directory inside an existing directory whose named entries
  are renamed into it one by one, a previous version of each kept in the temporary directory
  until the end (the Trainer callback, the low-rank writer: they add to a directory that holds
  other files);
- ``MarkerCommit``: for storage that cannot rename, the final name is written in place and a
  marker file, written last, says it is complete; a directory without it is in progress.

The temporary names carry the writer's pid and one of ``layout``'s in-progress prefixes, so
audit, prune and the scanner treat them as in progress; ``remove_stale`` removes the ones a
killed run left (callers hold the lock that rules out a live writer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from . import layout
from .fs import FileOps, fsync, fsync_tree, local_or, remove_tree

T = TypeVar("T")

# The marker of MarkerCommit: written last, so its presence means every other file is there.
COMMIT_MARKER = ".ckpt-tools-committed"
_DISCARD_ATTEMPTS = 3


def is_temporary(name: str) -> bool:
    """A name this protocol (or a Trainer) gives a directory being written."""
    return layout.is_tmp_checkpoint_name(name)


def discard(path: str, fs: FileOps | None = None) -> OSError | None:
    """Remove a staging directory, retrying past a failed unlink; None once it is gone, else
    the last error (it then stays, hidden under its temporary name)."""
    error = None
    for _ in range(_DISCARD_ATTEMPTS):
        error = remove_tree(path, fs)
        if error is None:
            return None
    return error


def remove_stale(parent: str, prefixes: tuple[str, ...], fs: FileOps | None = None) -> list[str]:
    """Remove the directories in ``parent`` whose names start with ``prefixes``: staging
    directories of a run that died. One that cannot be removed stays (a new run's carry its
    own pid); returns the paths removed."""
    fs = local_or(fs)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(prefixes) and e.is_dir(follow_symlinks=False):
            if remove_tree(e.path, fs) is None:
                removed.append(e.path)
    if removed:
        try:
            fs.fsync(parent, directory=True)
        except OSError:
            pass    # only the removals' durability: their directories are gone either way
    return removed


@dataclass
class RenameCommit:
    """Stage ``final`` as a temporary sibling and rename it into place."""

    final: str
    fs: FileOps | None = None
    tmp_prefix: str = layout.MIGRATE_TMP_PREFIX
    park_prefix: str = layout.MIGRATE_OLD_PREFIX
    replace: bool = False          # a previous version of ``final`` may be there: park it, then swap
    parked: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.fs = local_or(self.fs)
        self.parent, name = os.path.split(os.path.abspath(self.final))
        self.tmp = os.path.join(self.parent, f"{self.tmp_prefix}{name}-{os.getpid()}")
        self._park = os.path.join(self.parent, f"{self.park_prefix}{name}-{os.getpid()}")

    def create(self) -> str:
        self.fs.makedirs(self.parent)
        _clear(self.tmp, self.fs)    # this pid's own leftover: nobody else writes under its name
        self.fs.mkdir(self.tmp)
        return self.tmp

    def sync(self) -> None:
        fsync_tree(self.tmp, self.fs)
        fsync(self.parent, self.fs, directory=True)

    def finalize(self) -> None:
        """Rename into place, then fsync the parent; a failure of either undoes the rename,
        so that a commit reported failed leaves the previous state (no target, or the old one)."""
        fs, final = self.fs, self.final
        if self.replace:
            _clear(self._park, fs)
            fs.rename(final, self._park)
            self.parked = self._park
            try:
                fs.rename(self.tmp, final)
            except BaseException:
                fs.rename(self._park, final)
                self.parked = None
                raise
        else:
            if os.path.isdir(final) and not os.path.islink(final):
                fs.rmdir(final)      # an empty directory (one that holds anything makes this fail)
            fs.rename(self.tmp, final)
        try:
            fsync(self.parent, fs, directory=True)
        except BaseException:
            fs.rename(final, self.tmp)
            if self.parked is not None:
                fs.rename(self.parked, final)
                self.parked = None
            raise

    def rollback(self) -> OSError | None:
        return discard(self.tmp, self.fs)

    def cleanup(self) -> OSError | None:
        """After a commit: remove the parked previous version."""
        return discard(self.parked, self.fs) if self.parked is not None else None


@dataclass
class EntriesCommit:
    """Stage ``entries`` of the existing ``directory`` in a temporary directory inside it, then
    rename them into it in the order given (the one that tells readers "complete" last)."""

    directory: str
    entries: tuple[str, ...]
    fs: FileOps | None = None
    tmp_prefix: str = layout.MIGRATE_TMP_PREFIX

    def __post_init__(self) -> None:
        self.fs = local_or(self.fs)
        self.tmp = os.path.join(self.directory, f"{self.tmp_prefix}{os.getpid()}")
        self._replaced = os.path.join(self.tmp, ".replaced")

    def create(self) -> str:
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory}: the directory does not exist")
        _clear(self.tmp, self.fs)
        self.fs.mkdir(self.tmp)
        return self.tmp

    def sync(self) -> None:
        fsync_tree(self.tmp, self.fs)

    def finalize(self) -> None:
        """Rename each entry into place; a previous directory of that name (or a file where a
        directory comes) is moved into the staging directory first, a file is replaced."""
        fs = self.fs
        for name in self.entries:
            src, dst = os.path.join(self.tmp, name), os.path.join(self.directory, name)
            if not os.path.lexists(src):
                continue
            if os.path.lexists(dst) and (os.path.isdir(src) or os.path.isdir(dst)):
                fs.makedirs(self._replaced)
                fs.rename(dst, os.path.join(self._replaced, name))
            fs.rename(src, dst)
        fsync(self.directory, fs, directory=True)

    def rollback(self) -> OSError | None:
        return discard(self.tmp, self.fs)

    def cleanup(self) -> OSError | None:
        """After a commit: the staging directory holds only the replaced versions."""
        return discard(self.tmp, self.fs)


@dataclass
class MarkerCommit:
    """For storage without rename: write ``final`` in place, ``COMMIT_MARKER`` last."""

    final: str
    fs: FileOps | None = None

    def __post_init__(self) -> None:
        self.fs = local_or(self.fs)
        self.tmp = self.final       # written where it stays: the marker is what commits it

    def create(self) -> str:
        fs = self.fs
        if os.path.lexists(self.final):
            if is_committed(self.final, fs):
                raise FileExistsError(f"{self.final}: already committed")
            remove_tree(self.final, fs)     # an uncommitted leftover: in progress, never read
        fs.makedirs(self.final)
        return self.final

    def sync(self) -> None:
        if self.fs.durable_fsync:
            fsync_tree(self.final, self.fs)

    def finalize(self) -> None:
        marker = os.path.join(self.final, COMMIT_MARKER)
        self.fs.write_bytes(marker, b"")
        if self.fs.durable_fsync:
            fsync(marker, self.fs)
            fsync(self.final, self.fs, directory=True)

    def rollback(self) -> OSError | None:
        return discard(self.final, self.fs)

    def cleanup(self) -> OSError | None:
        return None


def is_committed(path: str, fs: FileOps | None = None) -> bool:
    """Whether a directory written by ``MarkerCommit`` is complete (its marker is there)."""
    try:
        local_or(fs).lstat(os.path.join(path, COMMIT_MARKER))
    except OSError:
        return False
    return True


def staging_for(final: str, fs: FileOps | None = None, *, replace: bool = False):
    """The commit a storage can do for the directory ``final``: a rename where it has one,
    else a marker."""
    fs = local_or(fs)
    if fs.atomic_rename:
        return RenameCommit(final, fs, replace=replace)
    if replace:
        raise NotImplementedError("replacing a committed directory needs a rename")
    return MarkerCommit(final, fs)


def commit(staging, write: Callable[[str], T], *,
           validate: Callable[[str], None] | None = None,
           read_back: Callable[[str], None] | None = None) -> T:
    """Run the protocol: ``write(path)`` fills the staging directory; ``validate(path)`` and
    ``read_back(path)`` raise to refuse it. Returns what ``write`` returned. On any failure
    the staging directory is rolled back and the exception goes up; the caller may call
    ``staging.rollback()`` again to learn whether something stays."""
    staging.create()
    try:
        result = write(staging.tmp)
        staging.sync()
        if validate is not None:
            validate(staging.tmp)
        if read_back is not None:
            read_back(staging.tmp)
        staging.finalize()
    except BaseException:
        staging.rollback()
        raise
    return result


def _clear(path: str, fs: FileOps) -> None:
    error = remove_tree(path, fs)
    if error is not None:
        raise error


__all__ = ["commit", "RenameCommit", "EntriesCommit", "MarkerCommit", "staging_for", "is_committed",
           "is_temporary", "discard", "remove_stale", "COMMIT_MARKER"]
