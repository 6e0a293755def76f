"""A ``FileOps`` that fails or dies on cue: fault injection for the crash and fault tests.

It wraps the local file operations; the library never builds one (``tests/fault_entry.py``
runs the CLI with it). A spec is a comma-separated list of:

- ``<point>:<n>`` SIGKILLs this process the n-th time ``point`` is hit: ``after_write`` (a file
  written, copied or linked), ``before_rename`` / ``after_rename`` (around a rename: migrate
  renames each target into place once), ``after_unlink`` (an unlink by the process that built
  this object, right after it, before anything is logged) and ``after_unlink_in_worker`` (the
  same in each forked worker process: the object crosses ``fork()``; a worker counts its own)
  and ``after_op`` (right after the n-th change to storage of any kind: mkdir, write, link,
  fsync, rename, unlink, rmdir; so that a test can kill a run after each of its calls in turn);
- ``<error>@<op>:<n>`` makes the n-th ``op`` fail with a real ``OSError``, ``error`` being
  ``enospc`` or ``eio``: ``write`` (a file written, then left cut to half its length as a full
  disk leaves it; a hard link fails before it is made, so a source file is never cut),
  ``fsync`` (each fsync of a file or a directory), ``remove`` (each unlink or rmdir).

Counts run over one process, so with ``--jobs 1`` the same n always strikes the same file.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

from ckpt_tools.fs import LocalFileOps

ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}
OPS = ("write", "fsync", "remove")
POINTS = ("after_write", "before_rename", "after_rename", "after_unlink", "after_unlink_in_worker",
          "after_op")


class FaultyFileOps(LocalFileOps):
    def __init__(self, spec: str):
        self.kills: dict[str, int] = {}
        self.errors: dict[str, tuple[int, int]] = {}     # op -> (errno, n)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.pid = os.getpid()     # a worker forked later has another: its unlinks are "in_worker"
        for part in filter(None, (p.strip() for p in spec.split(","))):
            what, _, n = part.partition(":")
            count = int(n or 1)
            if "@" not in what and what in POINTS:
                self.kills[what] = count
                continue
            err, _, op = what.partition("@")
            if err not in ERRORS or op not in OPS:
                raise ValueError(f"fault spec {part!r}: expected <{'|'.join(POINTS)}>:<n> or "
                                 f"<{'|'.join(ERRORS)}>@<{'|'.join(OPS)}>:<n>")
            self.errors[op] = (ERRORS[err], count)

    def _nth(self, key: str, n: int) -> bool:
        with self.lock:
            self.counts[key] += 1
            return self.counts[key] == n

    def hit(self, point: str) -> None:
        if point in self.kills and self._nth(point, self.kills[point]):
            os.kill(os.getpid(), signal.SIGKILL)

    def fail(self, op: str, path: str) -> None:
        if op in self.errors:
            code, n = self.errors[op]
            if self._nth("@" + op, n):
                raise OSError(code, os.strerror(code), path)

    def _written(self, path: str) -> None:
        try:
            self.fail("write", path)
        except OSError:
            os.truncate(path, os.path.getsize(path) // 2)
            raise
        self.hit("after_write")
        self.hit("after_op")

    # --- writes
    def write_file(self, path, produce):
        super().write_file(path, produce)
        self._written(path)

    def write_bytes(self, path, data):
        super().write_bytes(path, data)
        self._written(path)

    def copy_file(self, src, dst):
        super().copy_file(src, dst)
        self._written(dst)

    def link(self, src, dst):
        self.fail("write", dst)
        super().link(src, dst)
        self.hit("after_write")
        self.hit("after_op")

    # --- the rest
    def mkdir(self, path):
        super().mkdir(path)
        self.hit("after_op")

    def makedirs(self, path):
        super().makedirs(path)
        self.hit("after_op")

    def fsync(self, path, *, directory=False):
        self.fail("fsync", path)
        super().fsync(path, directory=directory)
        self.hit("after_op")

    def rename(self, src, dst):
        self.hit("before_rename")
        super().rename(src, dst)
        self.hit("after_rename")
        self.hit("after_op")

    def unlink(self, path, *, dir_fd=None):
        self.fail("remove", path)
        super().unlink(path, dir_fd=dir_fd)
        self.hit("after_unlink" if os.getpid() == self.pid else "after_unlink_in_worker")
        self.hit("after_op")

    def rmdir(self, path):
        self.fail("remove", path)
        super().rmdir(path)
        self.hit("after_op")
