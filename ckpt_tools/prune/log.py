"""``prune --log FILE``: the action log, one JSON line per event, and the errors of opening and
writing it."""

from __future__ import annotations

import datetime as _dt
import errno
import json
import mmap
import os
import stat
import struct
from collections.abc import Callable

from ..errors import ProblemsError, UsageError
from ..names import json_text
from .result import PruneEvent

class LogWriteError(ProblemsError):
    """A line of ``--log`` could not be written whole; the log takes no more lines."""

    def __init__(self, path: str, cause: str):
        self.path = path
        self.cause = cause
        super().__init__(f"cannot write log {path}: {cause}")


class LogOpenError(UsageError):
    """``--log FILE`` cannot be opened, or is not a regular file (a FIFO would block)."""


_SHORT = -1   # the failure code of a short write whose cause the filesystem did not say


class ActionLog:
    """``--log FILE``: one JSON object per line, appended and written through per line.

    Each line is one ``write(2)`` on an ``O_APPEND`` fd, so lines of concurrent runs
    never interleave and a crash loses at most the action in flight. A write that fails
    or comes back short is taken back (the file truncated to where the line began, when
    no other writer appended since) and raises ``LogWriteError``; from then on, in this
    process and in every worker forked from it, the log takes no more lines (``failed``).
    ``write`` is ``os.write`` unless a test passes a failing one.
    """

    def __init__(self, path: str, *, dry_run: bool = False,
                 write: Callable[[int, bytes], int] = os.write):
        self.path = path
        self.dry_run = dry_run
        self._write = write
        self._fd = _open_log(path)
        # shared with forked workers: a failure in one stops the others at their next checkpoint
        self._failure = mmap.mmap(-1, _FAILURE.size)

    def record(self, event: PruneEvent) -> None:
        self._append(log_line(event, dry_run=self.dry_run))

    @property
    def failed(self) -> bool:
        return _FAILURE.unpack_from(self._failure)[0] != 0

    def error(self) -> LogWriteError | None:
        """Why the log takes no more lines, or None."""
        (code,) = _FAILURE.unpack_from(self._failure)
        if code == 0:
            return None
        cause = os.strerror(code) if code > 0 else "the filesystem took only part of a line"
        return LogWriteError(self.path, cause)

    def _fail(self, code: int) -> LogWriteError:
        _FAILURE.pack_into(self._failure, 0, code)
        return self.error()

    def _append(self, data: bytes) -> None:
        if self.failed:
            raise self.error()
        try:
            n = self._write(self._fd, data)
        except OSError as exc:
            raise self._fail(exc.errno or errno.EIO) from None
        if n != len(data):
            raise self._fail(self._take_back(n, len(data)))

    def _take_back(self, written: int, wanted: int) -> int:
        """Truncate a short write away, unless another writer appended after it; the cause."""
        try:
            vfs = os.fstatvfs(self._fd)   # before the truncation gives blocks back
            end = os.lseek(self._fd, 0, os.SEEK_CUR)   # O_APPEND: the end of our write
            if os.fstat(self._fd).st_size == end:
                os.ftruncate(self._fd, end - written)
        except OSError:
            return _SHORT
        return errno.ENOSPC if vfs.f_bavail * vfs.f_frsize < wanted - written else _SHORT

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ActionLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_line(event: PruneEvent, *, dry_run: bool, now: _dt.datetime | None = None) -> bytes:
    """``event`` as one ``--log`` line: a JSON object in UTF-8, ending in a newline.

    A name that is not UTF-8 is written as ``names.json_safe`` says (U+FFFD, and its exact
    bytes in ``path_bytes_b64``): the line is always one a strict parser accepts."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    doc = {"time": stamp, "action": event.action, "path": event.abspath, "bytes": event.bytes,
           "reason": event.reason, "dry_run": dry_run}
    return (json_text(_log_json, doc) + "\n").encode("utf-8")


def _log_json(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False)


_FAILURE = struct.Struct("i")   # 0, an errno, or _SHORT


def _open_log(path: str) -> int:
    """The log's fd: a regular file, opened without blocking (a FIFO or a device never is)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise LogOpenError(f"cannot open log file {path}: {exc.strerror or exc}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise LogOpenError(f"log file {path} is not a regular file")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):   # a FIFO or socket swapped in since the stat
            raise LogOpenError(f"log file {path} is not a regular file") from None
        raise LogOpenError(f"cannot open log file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogOpenError(f"log file {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd
