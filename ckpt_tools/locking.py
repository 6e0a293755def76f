"""The advisory lock that every mutating ckpt-tools command takes on its roots.

One ``fcntl.flock`` on a lock file: by default ``ROOT/.ckpt-tools.lock`` in each root,
or one file the user names (``--lock PATH``) for all of them. A second run waits up to
a timeout and then gives up with ``LockHeld`` (the CLI turns it into exit 75).

Mutating commands (``prune``, ``migrate``) take it exclusive and create the lock file
when it is missing: that file is the one write they make besides their real work.
Read-only runs (``prune --dry-run``) take it shared, and only when the file already
exists, so that they change nothing on disk and work on read-only storage; a shared
lock still waits for a running prune, so a dry run never reports a half-pruned tree.

flock locks belong to an open file description: they are released when the process
exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterable, Iterator

from . import layout

LOCK_NAME = layout.LOCK_FILE
_POLL_S = 0.05


class LockError(Exception):
    """A lock file that cannot be created or opened (permissions, a symlink, not a file)."""


class LockHeld(Exception):
    """Another run holds the lock and did not let go within the timeout."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        waited = f" (waited {timeout:g} s)" if timeout else ""
        super().__init__(f"another ckpt-tools run holds the lock {path}{waited}")


def lock_path_for(root: str) -> str:
    """The default lock file of a root."""
    return os.path.join(os.path.abspath(root), LOCK_NAME)


def _open(path: str, exclusive: bool, follow: bool) -> int | None:
    """An fd of the lock file, or None when a shared lock finds no file (nobody ever locked)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
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
        raise LockError(f"cannot {'create' if exclusive else 'open'} lock file {path}: "
                        f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"lock file {path} is not a regular file")
    return fd


def _acquire(fd: int, path: str, exclusive: bool, deadline: float, timeout: float) -> None:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise LockError(f"cannot lock {path}: {exc.strerror or exc}") from None
        now = time.monotonic()
        if now >= deadline:
            raise LockHeld(path, timeout)
        time.sleep(min(_POLL_S, deadline - now))


@contextlib.contextmanager
def root_lock(roots: Iterable[str], timeout: float = 0.0, *, lock_path: str | None = None,
              exclusive: bool = True) -> Iterator[tuple[str, ...]]:
    """Hold the ckpt-tools lock of every root (or the one ``lock_path``) for the block.

    Yields the lock files actually held. ``timeout`` is the total time to wait, in
    seconds, for all of them together; then ``LockHeld`` is raised and nothing is held.
    ``exclusive=False`` takes shared locks, on lock files that already exist only.
    Default lock files are opened without following symlinks, so a planted link can
    never make a run create or touch a file outside its root. Locks are taken in a
    fixed order (by device and inode) and each file once, so two runs over
    overlapping roots cannot deadlock and one run never blocks on itself.
    """
    paths = [lock_path] if lock_path is not None else [lock_path_for(r) for r in roots]
    deadline = time.monotonic() + max(timeout, 0.0)
    opened: dict[tuple[int, int], tuple[int, str]] = {}
    try:
        for path in dict.fromkeys(paths):
            fd = _open(path, exclusive, follow=lock_path is not None)
            if fd is None:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in opened:
                os.close(fd)
                continue
            opened[(st.st_dev, st.st_ino)] = (fd, path)
        for key in sorted(opened):
            fd, path = opened[key]
            _acquire(fd, path, exclusive, deadline, timeout)
        yield tuple(path for _, path in opened.values())
    finally:
        for fd, _ in opened.values():
            os.close(fd)   # closing the last fd of the description releases its flock
