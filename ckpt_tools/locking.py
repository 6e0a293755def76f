"""The advisory lock that every mutating ckpt-tools command takes on its roots: one lock per tree.

Two layers, both ``fcntl.flock``, taken together:

- **The tree lock**, on directories: exclusive on the root directory itself, shared on
  every directory above it up to ``/`` (its physical parents, reached through ``..`` from
  the root held open, so the spelling of the path does not matter: relative, symlinked,
  with ``.`` or ``..``). A run on ``ROOT`` and a run on ``ROOT/run`` then always meet on
  ``ROOT``: exclusive against shared, whichever started first. Runs on disjoint trees
  share only ancestors, which are only ever locked shared, so they run together.
- **The lock file**, as before: ``ROOT/.ckpt-tools.lock`` in each root, or one file the
  user names (``--lock PATH``) for all of them. It orders runs on one root where the tree
  lock cannot (directory locks are per host on NFS) and orders runs of earlier versions.

Mutating commands (``prune``, ``migrate``) take both exclusive and create the lock file
when it is missing: that file is the one write they make besides their real work.
Read-only runs (``prune --dry-run``) take both shared, the lock file only where it exists,
so that they change nothing on disk and work on read-only storage; a shared lock still
waits for a running prune of the same tree, so a dry run never reports a half-pruned one.

A second run waits up to a timeout and then gives up with ``LockHeld`` (the CLI turns it
into exit 75). flock locks belong to an open file description: they are released when the
process exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import stat
import time
from collections.abc import Iterable, Iterator

from . import layout
from .errors import TryAgain, UsageError

LOCK_NAME = layout.LOCK_FILE
_POLL_S = 0.05
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
_EXCLUSIVE, _SHARED = fcntl.LOCK_EX, fcntl.LOCK_SH


class LockError(UsageError):
    """A lock file that cannot be created or opened (permissions, a symlink, not a file)."""


class LockHeld(TryAgain):
    """Another run holds the lock and did not let go within the timeout."""

    def __init__(self, path: str, timeout: float, *, tree: bool = False):
        self.path = path
        self.timeout = timeout
        waited = f" (waited {timeout:g} s)" if timeout else ""
        what = (f"the tree lock of {path} (it works on that directory, or on one above or "
                f"below it)") if tree else f"the lock {path}"
        super().__init__(f"another ckpt-tools run holds {what}{waited}")


def lock_path_for(root: str) -> str:
    """The default lock file of a root."""
    return os.path.join(os.path.abspath(root), LOCK_NAME)


def _refuse_special(path: str, follow: bool) -> None:
    """A FIFO, socket or device named as a lock file is refused before it is ever opened:
    opening one can block, or act on a device."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return   # missing (created below) or unreadable: the open says why
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise LockError(f"lock file {path} is not a regular file")


def _open(path: str, exclusive: bool, follow: bool) -> int | None:
    """An fd of the lock file, or None when a shared lock finds no file (nobody ever locked)."""
    _refuse_special(path, follow)
    flags = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    if exclusive:
        flags |= os.O_RDWR | os.O_CREAT
    else:
        flags |= os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(path, flags, 0o666)
        except PermissionError:
            if exclusive or not flags & getattr(os, "O_NOATIME", 0):
                raise
            fd = os.open(path, flags & ~os.O_NOATIME)   # O_NOATIME needs ownership
    except FileNotFoundError:
        if exclusive:
            raise LockError(f"cannot create lock file {path}: its directory does not exist") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(f"lock file {path} is a symlink; refusing to follow it") from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):   # a socket, or a FIFO swapped in
            raise LockError(f"lock file {path} is not a regular file") from None
        raise LockError(f"cannot {'create' if exclusive else 'open'} lock file {path}: "
                        f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"lock file {path} is not a regular file")
    return fd


def _tree_dirs(root: str) -> Iterator[tuple[int | None, str, bool]]:
    """``(fd, path, is_root)`` for ``root`` and each directory above it, up to ``/``.

    Parents are reached through ``..`` from the directory held open, so they are the
    physical ones whatever the spelling of ``root``. A directory this user cannot read has
    fd None (it cannot be locked; the walk goes on through it). The caller closes the fds.
    """
    try:
        walk = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return   # a missing root: the lock file's open says why, where it matters
    path = os.path.realpath(root)
    is_root = True
    try:
        while True:
            try:
                fd = os.open(".", _DIR_FLAGS, dir_fd=walk)
            except OSError:   # unreadable (or gone): not lockable by this user
                fd = None
            yield fd, path, is_root
            try:
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=walk)
            except OSError:
                return
            here, up = os.fstat(walk), os.fstat(parent)
            os.close(walk)
            walk = parent
            if (here.st_dev, here.st_ino) == (up.st_dev, up.st_ino):
                return   # "/" is its own parent
            path, is_root = os.path.dirname(path), False
    finally:
        os.close(walk)


def _acquire(fd: int, path: str, op: int, deadline: float, timeout: float, tree: bool) -> None:
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            if tree:   # a filesystem that cannot lock a directory: the lock file still orders runs
                return
            raise LockError(f"cannot lock {path}: {exc.strerror or exc}") from None
        now = time.monotonic()
        if now >= deadline:
            raise LockHeld(path, timeout, tree=tree)
        time.sleep(min(_POLL_S, deadline - now))


@contextlib.contextmanager
def root_lock(roots: Iterable[str], timeout: float = 0.0, *, lock_path: str | None = None,
              exclusive: bool = True, shared_roots: Iterable[str] = ()) -> Iterator[tuple[str, ...]]:
    """Hold the ckpt-tools lock of every tree under ``roots`` for the block.

    ``roots`` are locked ``exclusive`` (or shared), ``shared_roots`` shared (the trees a
    run only reads, as migrate's SRC). Yields the lock files actually held: each root's
    own (or the one ``lock_path`` instead), shared ones only where they already exist.
    ``timeout`` is the total time to wait, in seconds, for all of them together; then
    ``LockHeld`` is raised and nothing is held. Default lock files are opened without
    following symlinks, so a planted link can never make a run create or touch a file
    outside its root. Every lock is taken once (by device and inode, at the strongest mode
    wanted: a run never blocks on itself) and in one fixed order (lock files, then
    directories, each by device and inode), so two runs over overlapping trees cannot
    deadlock, and two runs on one root meet first on its lock file, which ``LockHeld`` names.
    """
    if not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"lock timeout must be a finite number of seconds >= 0, not {timeout!r}")
    roots, shared_roots = list(roots), list(shared_roots)
    files = [(lock_path, exclusive)] if lock_path is not None else \
        [(lock_path_for(r), exclusive) for r in roots] + [(lock_path_for(r), False) for r in shared_roots]
    deadline = time.monotonic() + timeout
    # (dev, ino) -> [fd, path, op, is the tree lock]
    held: dict[tuple[int, int], list] = {}
    spare: list[int] = []

    def want(fd: int, path: str, op: int, tree: bool) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in held:
            spare.append(fd)
            if op == _EXCLUSIVE:
                held[key][2] = _EXCLUSIVE
            return
        held[key] = [fd, path, op, tree]

    try:
        for path, excl in dict.fromkeys(files):
            fd = _open(path, excl, follow=lock_path is not None)
            if fd is not None:
                want(fd, path, _EXCLUSIVE if excl else _SHARED, False)
        for root, excl in [(r, exclusive) for r in roots] + [(r, False) for r in shared_roots]:
            for fd, path, is_root in _tree_dirs(root):
                if fd is not None:
                    want(fd, path, _EXCLUSIVE if excl and is_root else _SHARED, True)
        # lock files before directories, each by (device, inode): one order for every run
        for key in sorted(held, key=lambda k: (held[k][3], k)):
            fd, path, op, tree = held[key]
            _acquire(fd, path, op, deadline, timeout, tree)
        yield tuple(path for _, path, _, tree in held.values() if not tree)
    finally:
        for fd in spare + [h[0] for h in held.values()]:
            os.close(fd)   # closing the last fd of the description releases its flock
