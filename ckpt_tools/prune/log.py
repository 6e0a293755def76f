"""``prune --log FILE``: the action log, one JSON line per event between a ``start`` and an
``end`` record of the run, and the errors of opening and writing it."""

from __future__ import annotations

import datetime as _dt
import errno
import json
import mmap
import os
import stat
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from ..errors import ProblemsError, UsageError
from ..kinds import Status
from ..names import json_text
from ..storage import is_url
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

START, END = "start", "end"   # the ``action`` of a run's first and last record


@dataclass
class RunTotals:
    """What one run saw and did, for its ``end`` record, filled in as far as the run got.

    ``actions`` counts the run's lines by action as the results say them (``plan``, ``delete``,
    ``skip``, ``fail``, ``strip``, ``trash``, ``purge``): workers' lines included, which the
    parent never writes itself. The checkpoints the plan left alone are counted, not written
    line by line (a nightly log would repeat the same lines every night): ``left_alone`` by
    reason (``left_alone_reason``) and ``skipped`` by status. Their ``skip`` lines are written,
    and counted in ``actions``, only with ``--log-skips`` (``skip_lines``). Skips at execute
    time (changed since the plan, a held lock, a closed stdout) are events: always lines.
    Nothing is carried from one run to the next."""

    checkpoints: Counter = field(default_factory=Counter)   # by status
    actions: Counter = field(default_factory=Counter)
    decisions: Counter = field(default_factory=Counter)     # retention: keep, strip, delete
    skipped: Counter = field(default_factory=Counter)       # plan-time skips by status
    left_alone: Counter = field(default_factory=Counter)    # plan-time skips by reason
    planned_bytes: int = 0
    planned_bytes_when_purged: int = 0
    freed_bytes: int = 0
    freed_bytes_when_purged: int = 0

    def scanned(self, checkpoints: Iterable) -> None:
        self.checkpoints.update(str(c.status) for c in checkpoints)

    def planned(self, plan, kept=None, *, skip_lines: bool = False) -> None:
        """``plan`` a ``PrunePlan``; ``kept`` a ``RetentionPlan`` (None: no retention asked);
        ``skip_lines``: whether the plan's skips are written as lines (``ActionLog.skip_lines``)."""
        self.actions["plan"] += len(plan.deletions)
        if skip_lines:
            self.actions["skip"] += len(plan.skipped)
        self.skipped.update(s.status or "unknown" for s in plan.skipped)
        self.left_alone.update(left_alone_reason(s) for s in plan.skipped)
        self.planned_bytes += plan.freed_bytes
        if kept is not None and kept.policy is not None:
            self.decisions.update(kept.counts())
        if kept is not None:
            self.planned_bytes += kept.freed_now
            self.planned_bytes_when_purged += kept.freed_when_purged

    def done(self, result, retention=None) -> None:
        """``result`` a ``PruneResult``; ``retention`` a ``RetentionResult`` or None."""
        from .result import CHANGED
        self.actions["delete"] += len(result.deleted)
        self.actions["skip"] += sum(1 for s in result.skipped if s.status == CHANGED)
        self.actions["fail"] += len(result.failed)
        self.freed_bytes += result.freed_bytes
        if retention is not None:
            for action, rows in (("strip", retention.stripped), ("trash", retention.trashed),
                                 ("purge", retention.purged), ("skip", retention.skipped),
                                 ("fail", retention.failed),
                                 ("delete", retention.deleted)):   # in a bucket: no trash
                self.actions[action] += len(rows)
            self.freed_bytes += retention.freed_now
            self.freed_bytes_when_purged += retention.freed_when_purged

    def to_dict(self) -> dict:
        from ..kinds import PruneAction, RetentionAction
        return {"counts": {a.value: self.actions[a.value] for a in PruneAction},
                "checkpoints": dict(sorted(self.checkpoints.items())),
                "skipped": dict(sorted(self.skipped.items())),
                "left_alone": dict(sorted(self.left_alone.items())),
                "decisions": {a.value: self.decisions[a.value] for a in RetentionAction},
                "planned_bytes": self.planned_bytes,
                "planned_bytes_when_purged": self.planned_bytes_when_purged,
                "freed_bytes": self.freed_bytes,
                "freed_bytes_when_purged": self.freed_bytes_when_purged}


def left_alone_reason(skip) -> str:
    """Why the plan left a checkpoint alone (a ``plan.Skip``), as a short key that stays the
    same night after night: its status (``legacy``, ``broken``, ``in-progress``, ``healthy``:
    a merged export), ``fresh`` (complete, but younger than ``--min-age``) or ``not proven``
    (redundant by its verdict, its merged weights not proven redundant by content)."""
    if skip.fresh:
        return "fresh"
    if skip.status == Status.REDUNDANT:
        return "not proven"
    return str(skip.status) or "unknown"


class ActionLog:
    """``--log FILE``: one JSON object per line, appended and written through per line.

    Each line is one ``write(2)`` on an ``O_APPEND`` fd, so lines of concurrent runs
    never interleave and a crash loses at most the action in flight. A write that fails
    or comes back short is taken back (the file truncated to where the line began, when
    no other writer appended since) and raises ``LogWriteError``; from then on, in this
    process and in every worker forked from it, the log takes no more lines (``failed``).
    ``write`` is ``os.write`` unless a test passes a failing one.

    Every line carries ``run_id``: a uuid4 in hex unless the caller passes one. Random, so
    that runs on different hosts appending to one shared log, or a clock set back, never
    share an id (no host name, pid or time in it to collide or to leak). ``start`` and
    ``end`` write the run's first and last records; a log that failed takes no ``end``.

    ``skip_lines``: whether ``emit_plan`` writes a ``skip`` line per checkpoint the plan left
    alone (the CLI's ``--log-skips``); without them the ``end`` record counts them by reason.
    """

    def __init__(self, path: str, *, dry_run: bool = False,
                 write: Callable[[int, bytes], int] = os.write, run_id: str | None = None,
                 skip_lines: bool = True):
        self.path = path
        self.dry_run = dry_run
        self.skip_lines = skip_lines
        self.run_id = run_id or uuid.uuid4().hex
        self.started = False   # whether the start record is written
        self._write = write
        self._fd = _open_log(path)
        # shared with forked workers: a failure in one stops the others at their next checkpoint
        self._failure = mmap.mmap(-1, _FAILURE.size)

    def record(self, event: PruneEvent) -> None:
        self._append(log_line(event, dry_run=self.dry_run, run_id=self.run_id))

    def start(self, *, version: str, argv: Sequence[str], roots: Sequence[str], policy=None,
              policy_file: str | None = None, now: _dt.datetime | None = None) -> None:
        """The run's first record: who ran what on which roots under which policy
        (a retention ``Policy``, or None: merged weights only)."""
        self._append(_record_line({
            "action": START, "version": version, "argv": list(argv),
            "roots": [r if is_url(r) else os.path.abspath(r) for r in roots],
            "policy": _policy_doc(policy, policy_file)}, self, now))
        self.started = True

    def end(self, *, exit_code: int, duration_s: float, totals: RunTotals | None = None,
            now: _dt.datetime | None = None) -> None:
        """The run's last record: what it did and how it ended. Nothing when the log failed:
        the record would claim a story the log no longer holds whole."""
        if self.failed:
            return
        doc = {"action": END, "exit_code": int(exit_code), "duration_s": round(duration_s, 3)}
        self._append(_record_line(doc | (totals or RunTotals()).to_dict(), self, now))

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


def log_line(event: PruneEvent, *, dry_run: bool, now: _dt.datetime | None = None,
             run_id: str | None = None) -> bytes:
    """``event`` as one ``--log`` line: a JSON object in UTF-8, ending in a newline.

    A name that is not UTF-8 is written as ``names.json_safe`` says (U+FFFD, and its exact
    bytes in ``path_bytes_b64``): the line is always one a strict parser accepts."""
    doc = {"time": _stamp(now)} | ({"run_id": run_id} if run_id else {})
    doc |= {"action": event.action, "path": event.abspath, "bytes": event.bytes,
            "reason": event.reason, "dry_run": dry_run}
    return (json_text(_log_json, doc) + "\n").encode("utf-8")


def _record_line(fields: dict, log: ActionLog, now: _dt.datetime | None) -> bytes:
    doc = {"time": _stamp(now), "run_id": log.run_id} | fields | {"dry_run": log.dry_run}
    return (json_text(_log_json, doc) + "\n").encode("utf-8")


def _stamp(now: _dt.datetime | None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _policy_doc(policy, policy_file: str | None) -> dict | None:
    """A retention policy as JSON: its tiers and what the rest gets (and the file it came from)."""
    if policy is None:
        return None
    return ({"file": os.path.abspath(policy_file)} if policy_file else {}) | _plain(asdict(policy))


def _plain(value):
    """``asdict``'s output with its sets as sorted lists and its enums as their values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, str):
        return str(value)   # a StrEnum as its plain value
    return value


def _log_json(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False)


_FAILURE = struct.Struct("i")   # 0, an errno, or _SHORT


def _open_log(path: str) -> int:
    """The log's fd: a regular file, opened without blocking (a FIFO or a device never is).
    Its missing parent directories are created first (0o755, less what the umask takes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
        _make_parents(path)
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


def _make_parents(path: str) -> None:
    """Create the directories above ``path`` that do not exist, each 0o755 (``os.makedirs``
    would give the intermediate ones the umask's default instead)."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            pass   # another run made it since
        except OSError as exc:
            raise LogOpenError(f"cannot create the directory of log file {path}: {d}: "
                               f"{exc.strerror or exc}") from None
