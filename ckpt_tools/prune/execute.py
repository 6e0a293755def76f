"""Execute a ``PrunePlan``: re-validate, re-check, unlink.

A plan is only a promise made at scan time; between the plan and the unlink a trainer
may rewrite a checkpoint, a user may move a directory, a dedup tool may add hard links.
So, for each checkpoint of the plan (in plan order; with ``jobs``, several checkpoints at
once in worker processes, each checkpoint whole in one of them):

1. its directory is opened as an ``O_DIRECTORY`` fd, walking from the root one component
   at a time with ``O_NOFOLLOW``: a directory swapped for a symlink is refused, never
   followed, and every unlink goes through that fd (``os.unlink(name, dir_fd=fd)``), so
   nothing a path says later can redirect it out of the root;
2. the directory is re-scanned with the scanner and re-validated with the validator: it
   must still be ``redundant`` with no error, and its merged weights proven redundant by
   content again (``proof``: the LoRA and router tensors they hold equal the PEFT
   tree's, byte for byte); the path must still lead to the directory held open (checked
   before and after the re-scan, and before each unlink);
3. right before each unlink, the file's identity (device, inode, size, mtime_ns) is read
   with ``lstat`` through the fd and must equal the plan's and the re-scan's; a symlink
   is unlinked itself, never its target.

Anything that changed is skipped and said so; nothing else is touched. Bytes freed are
measured at the unlink: a file frees its blocks when its last link goes.

The checkpoint is validated once before its files go, not before each file: deleting
one shard of a sharded merged model would make the next validation see a broken index.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
import time
from collections.abc import Callable

from .. import scanner, workers
from ..api import DEFAULT_MIN_AGE_S, classify
from ..fs import FileOps, local_or
from ..records import REDUNDANT, Checkpoint
from ..validator import HEADERS
from .log import ActionLog, LogOpenError, LogWriteError, log_line
from .plan import PlannedDeletion, Prover, PrunePlan, Skip, skip_reason
from .proof import ContentProof
from .result import (CHANGED, DELETE, FAIL, PLAN, SKIP, STOPPED, Deleted, Failure, PruneEvent,
                     PruneResult)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Revalidator:
    """Re-scan one checkpoint directory with the scanner, re-run the validator on it and,
    where it is still ``redundant``, prove its merged weights redundant by content again.

    ``min_age_s`` must be the plan's: a checkpoint written to since the plan is then
    in progress again. ``clock`` gives "now" at each call. ``prove`` as for ``plan_prune``:
    a checkpoint whose proof fails now is skipped, the reason saying why.
    """

    def __init__(self, *, min_age_s: float = DEFAULT_MIN_AGE_S, level: str = HEADERS,
                 clock: Callable[[], float] = time.time, prove: bool | Prover = True):
        self.min_age_s = min_age_s
        self.level = level
        self.clock = clock
        self.prove: Prover | None = ContentProof() if prove is True else (prove or None)

    def __call__(self, root: str, checkpoint: str) -> Checkpoint:
        # with the original root: symlinks that stay inside it are judged as the plan's scan did
        ckpt = scanner.rescan_checkpoint(root, checkpoint)
        fresh = classify(ckpt, level=self.level, min_age_s=self.min_age_s, now=self.clock())
        if self.prove is not None and fresh.status == REDUNDANT and not fresh.errors:
            reason = self.prove(fresh)
            if reason is not None:
                raise _Changed(f"no longer proven redundant: {reason}")
        return fresh


def emit_plan(plan: PrunePlan, *, log: ActionLog | None = None,
              on_event: Callable[[PruneEvent], None] | None = None) -> None:
    """Report the plan as events: a ``skip`` per checkpoint left alone (in the log only when
    it takes them: ``ActionLog.skip_lines``), a ``plan`` per file."""
    skip_log = log if log is not None and log.skip_lines else None
    for s in plan.skipped:
        _emit(PruneEvent(SKIP, s.root, s.path, 0, s.reason), skip_log, on_event)
    for d in plan.deletions:
        _emit(PruneEvent(PLAN, d.root, d.path, d.frees_bytes, _plan_note(d)), log, on_event)


def _plan_note(d: PlannedDeletion) -> str:
    if d.other_links:
        return f"held by {d.other_links} other link{'s' if d.other_links != 1 else ''}"
    return ""


def _emit(event: PruneEvent, log: ActionLog | None, on_event) -> None:
    if log is not None:
        log.record(event)
    if on_event is not None:
        on_event(event)


class _Changed(Exception):
    """Something differs from the plan: skip, and say what."""


def _open_dir_nofollow(start_fd: int, parts: list[str], what: str) -> int:
    """Open ``parts`` below ``start_fd`` one component at a time, never following a symlink."""
    fd = os.dup(start_fd)
    for part in parts:
        if part in ("", ".", ".."):
            os.close(fd)
            raise _Changed(f"{what}: unexpected path component {part!r}")
        try:
            nfd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Changed(f"{what}: {part!r} was replaced by a symlink or a file "
                               "since the plan; not following it") from None
            if exc.errno == errno.ENOENT:
                raise _Changed(f"{what}: {part!r} vanished since the plan") from None
            raise
        finally:
            os.close(fd)
        fd = nfd
    return fd


def _dir_id(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _describe_change(planned: tuple[int, int, int, int], now: tuple[int, int, int, int]) -> str:
    dev, ino, size, mtime = planned
    ndev, nino, nsize, nmtime = now
    if (dev, ino) != (ndev, nino):
        return "replaced by another file since the plan"
    parts = []
    if size != nsize:
        parts.append(f"size {size} → {nsize}")
    if mtime != nmtime:
        parts.append("modified")
    return "changed since the plan (" + ", ".join(parts) + ")"


class _Accounting:
    """Bytes freed and held, measured at each unlink from the file's own lstat."""

    def __init__(self) -> None:
        self.freed = 0
        self.held: dict[tuple[int, int], int] = {}

    def unlinked(self, st: os.stat_result) -> int:
        allocated = st.st_blocks * 512
        key = (st.st_dev, st.st_ino)
        if stat.S_ISLNK(st.st_mode) or st.st_nlink <= 1:
            self.held.pop(key, None)
            self.freed += allocated
            return allocated
        self.held[key] = allocated   # another link keeps it, unless a later unlink of ours frees it
        return 0


class _Outcome:
    """What a run did, gathered as it happens: each action goes to the log (and to
    ``on_event``) the moment it is done."""

    def __init__(self, log: ActionLog | None, on_event, fs: FileOps,
                 stop: Callable[[], str | None] | None = None) -> None:
        self.log = log
        self.on_event = on_event
        self.fs = fs           # what the unlinks go through (forked workers inherit it)
        self.stop_asked = stop   # asked between checkpoints: why to start no other, or None
        self.suffix = ""   # said after each skip and failure reason
        self.deleted: list[Deleted] = []
        self.skipped: list[Skip] = []
        self.failed: list[Failure] = []
        self.unlogged: list[Deleted] = []
        self.acct = _Accounting()

    def _report(self, event: PruneEvent) -> bool:
        """To the log and ``on_event``; False when the log failed (now or before)."""
        logged = True
        if self.log is not None:
            try:
                self.log.record(event)
            except LogWriteError:
                logged = False
        if self.on_event is not None:
            self.on_event(event)
        return logged

    @property
    def log_failed(self) -> bool:
        return self.log is not None and self.log.failed

    def why_stop(self) -> str | None:
        """Why no other checkpoint may start (the log failed, or the caller asks), or None."""
        if self.log_failed:
            return str(self.log.error())
        return self.stop_asked() if self.stop_asked is not None else None

    def skip(self, d: PlannedDeletion, reason: str) -> None:
        reason += self.suffix
        self.skipped.append(Skip(d.root, d.path, reason, CHANGED))
        self._report(PruneEvent(SKIP, d.root, d.path, 0, reason))

    def fail(self, d: PlannedDeletion, reason: str) -> None:
        reason += self.suffix
        self.failed.append(Failure(d.root, d.path, reason))
        self._report(PruneEvent(FAIL, d.root, d.path, 0, reason))

    def stop(self, d: PlannedDeletion, why: str) -> None:
        """Not started (the log failed, or the caller asked to stop). Counted, not reported
        one by one (there may be many)."""
        self.skipped.append(Skip(d.root, d.path, f"not started: {why}", STOPPED))

    def unlinked(self, d: PlannedDeletion, st: os.stat_result) -> None:
        freed = self.acct.unlinked(st)
        deleted = Deleted(d.root, d.path, freed)
        self.deleted.append(deleted)
        if not self._report(PruneEvent(DELETE, d.root, d.path, freed, "")):
            self.unlogged.append(deleted)

    def part(self) -> tuple:
        """What a worker sends back: plain values, no log and no callback."""
        return self.deleted, self.skipped, self.failed, self.unlogged, self.acct.freed, self.acct.held

    def absorb(self, part: tuple) -> None:
        deleted, skipped, failed, unlogged, freed, held = part
        self.deleted.extend(deleted)
        self.skipped.extend(skipped)
        self.failed.extend(failed)
        self.unlogged.extend(unlogged)
        self.acct.freed += freed
        self.acct.held.update(held)   # units share no file (_units), so no key twice


def execute_prune(plan: PrunePlan, *, revalidate: Callable[[str, str], Checkpoint] | None = None,
                  log: ActionLog | None = None,
                  on_event: Callable[[PruneEvent], None] | None = None,
                  jobs: int = 1, fs: FileOps | None = None,
                  stop: Callable[[], str | None] | None = None) -> PruneResult:
    """Carry out ``plan``: unlink each planned file that is still what the plan saw.

    ``revalidate(root, checkpoint_path)`` must return the checkpoint as it is now;
    the default re-scans and re-validates it with a 1 h ``--min-age`` (pass a
    ``Revalidator`` with the plan's own). Each checkpoint is re-validated right before
    its own unlinks, which follow in plan order. With ``jobs`` > 1 and enough
    checkpoints, forked worker processes take whole checkpoints (re-validation and
    unlinks, each writing its actions to ``log`` as it does them); checkpoints that hold
    links to one file stay together, in plan order. The result is the same for every
    ``jobs``. Every action is reported to ``log`` and ``on_event`` as it happens (from
    workers: ``on_event`` as each batch of checkpoints comes back). Raises only on bugs;
    every filesystem failure is a ``Failure`` of the item concerned.

    When a line of ``log`` cannot be written, the checkpoints in progress finish (none is
    left with part of its merged weights) and no other is started: those are skipped with
    status ``STOPPED``; the result says why (``log_error``) and which deletions the log
    lacks (``unlogged``).

    ``stop()`` is asked at the same boundary, before each checkpoint (in workers too): a
    reason it returns stops the run there as a failed log does (the command line's: stdout
    closed), so that no checkpoint is left half done.

    ``fs``: the file operations the identity checks and unlinks go through (None: the local
    file system); the re-validation reads the disk itself.
    """
    revalidate = revalidate if revalidate is not None else Revalidator()
    groups: dict[tuple[str, str], list[PlannedDeletion]] = {}
    for d in plan.deletions:
        groups.setdefault((d.root, d.checkpoint), []).append(d)
    out = _Outcome(log, on_event, local_or(fs), stop)
    out.skipped.extend(plan.skipped)
    collecting = gc.isenabled()
    gc.disable()   # the plan's records are many and acyclic; see api.scan
    try:
        units = _units(groups)
        n_workers = min(jobs, len(units) // _MIN_PER_WORKER)
        parallel = n_workers > 1 and workers.available()
        if parallel:
            _execute_in_workers(units, groups, revalidate, out, n_workers)
        else:
            for key, items in groups.items():
                _prune_checkpoint(key, items, revalidate, out)
    finally:
        if collecting:
            gc.enable()
    if parallel:   # back into plan order, as one process would have done it
        rank = {(d.root, d.path): i for i, d in enumerate(plan.deletions)}
        n_plan = len(plan.skipped)
        out.deleted.sort(key=lambda x: rank[(x.root, x.path)])
        out.skipped[n_plan:] = sorted(out.skipped[n_plan:], key=lambda x: rank[(x.root, x.path)])
        out.failed.sort(key=lambda x: rank[(x.root, x.path)])
        out.unlogged.sort(key=lambda x: rank[(x.root, x.path)])
    log_error = log.error() if log is not None else None
    return PruneResult(tuple(out.deleted), tuple(out.skipped), tuple(out.failed), out.acct.freed,
                       sum(out.acct.held.values()), str(log_error) if log_error else "",
                       tuple(out.unlogged))


# Below this many checkpoints per worker, forking costs more than it saves.
_MIN_PER_WORKER = 50


def _units(groups: dict[tuple[str, str], list[PlannedDeletion]]) -> list[list[tuple[str, str]]]:
    """The checkpoints of the plan, in plan order, as units of work: checkpoints that hold
    links to one file form one unit (so that one process sees every unlink of that file
    and its bytes are counted where they are freed), every other checkpoint its own."""
    keys = list(groups)
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[int, int], int] = {}
    for i, key in enumerate(keys):
        for d in groups[key]:
            rec = d.record
            if rec.is_symlink or rec.nlink <= 1:
                continue
            j = owner.setdefault((rec.dev, rec.ino), i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    units: dict[int, list[tuple[str, str]]] = {}
    for i, key in enumerate(keys):
        units.setdefault(find(i), []).append(key)
    return list(units.values())


def _execute_in_workers(units, groups, revalidate, out: _Outcome, jobs: int) -> None:
    """Units in forked workers; the parent takes their results as they come. The spans a
    worker did not report (it was killed, or raised) are done again here afterwards; what
    that worker had deleted is then skipped, the reason saying why, and its log lines,
    written as it worked, say what it did."""

    def run(span: tuple[int, int]) -> list[tuple]:
        parts = []
        for unit in units[span[0]:span[1]]:
            events: list[PruneEvent] = []
            part = _Outcome(out.log, events.append, out.fs, out.stop_asked)
            for key in unit:
                _prune_checkpoint(key, groups[key], revalidate, part)
            parts.append((part.part(), events))
        return parts

    spans = workers.spans_of(len(units), jobs, most=16)
    done: set[int] = set()
    failures: list[str] = []   # a worker that raised: its spans are redone below, not raised
    with workers.Workers(spans, jobs, run) as w:
        for span, parts in w.as_they_come(failures):
            done.add(span)
            for part, events in parts:
                out.absorb(part)
                if out.on_event is not None:
                    for e in events:
                        out.on_event(e)
    missing = [span for i, span in enumerate(spans) if i not in done]
    if missing:
        out.suffix = (" (checked again here after a worker process ended without reporting: "
                      "it may have deleted this itself; see --log)")
        try:
            for lo, hi in missing:
                for unit in units[lo:hi]:
                    for key in unit:
                        _prune_checkpoint(key, groups[key], revalidate, out)
        finally:
            out.suffix = ""


def _prune_checkpoint(key: tuple[str, str], items: list[PlannedDeletion], revalidate,
                      out: _Outcome) -> None:
    root, ckpt = key
    skip, fail = out.skip, out.fail
    why = out.why_stop()
    if why is not None:   # the boundary where a failed log, or the caller, stops the run
        for d in items:
            out.stop(d, why)
        return
    root_abs = os.path.abspath(root)
    abspath = root_abs if ckpt == "." else os.path.join(root_abs, *ckpt.split("/"))
    try:
        root_fd = os.open(root_abs, _DIR_FLAGS)   # the root as named: the user chose to follow it
    except OSError as exc:
        for d in items:
            fail(d, f"cannot open the root: {exc.strerror or exc}")
        return
    try:
        fd = _open_dir_nofollow(root_fd, [] if ckpt == "." else ckpt.split("/"), "checkpoint directory")
    except _Changed as exc:
        for d in items:
            skip(d, str(exc))
        return
    except OSError as exc:
        for d in items:
            fail(d, f"cannot open the checkpoint directory: {exc.strerror or exc}")
        return
    finally:
        os.close(root_fd)
    try:
        dir_id = _dir_id(os.fstat(fd))

        def still_there() -> None:
            """The checkpoint's path still leads to the directory held open, with no symlink."""
            try:
                # the root itself may be a symlink the user named; below it, none is followed
                st = os.stat(abspath) if ckpt == "." else os.lstat(abspath)
            except OSError:
                raise _Changed("checkpoint directory moved or vanished since the plan") from None
            if not stat.S_ISDIR(st.st_mode) or _dir_id(st) != dir_id:
                raise _Changed("checkpoint directory was moved or replaced since the plan")

        try:
            still_there()
            try:
                fresh = revalidate(root, ckpt)
            except OSError as exc:
                raise _Changed(f"cannot re-scan the checkpoint: {exc.strerror or exc}") from None
            still_there()
            if fresh.status != REDUNDANT or fresh.errors or fresh.fresh:
                raise _Changed(f"no longer redundant: {skip_reason(fresh)}")
        except _Changed as exc:
            for d in items:
                skip(d, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint never stops the run (§5.4.6)
            for d in items:
                fail(d, f"re-validation failed: {type(exc).__name__}: {exc}")
            return
        for d in items:
            _unlink_one(d, fd, fresh, still_there, out)
    finally:
        os.close(fd)


def _unlink_one(d: PlannedDeletion, ckpt_fd: int, fresh: Checkpoint, still_there,
                out: _Outcome) -> None:
    skip, fail = out.skip, out.fail
    planned = d.record.identity
    if d.relpath not in fresh.merged_files:
        skip(d, "no longer a merged-weight file of a redundant checkpoint")
        return
    rec = fresh.dir.file(d.relpath)
    if rec is None:
        skip(d, "vanished since the plan")
        return
    if rec.identity != planned:
        skip(d, _describe_change(planned, rec.identity))
        return
    *subdirs, name = d.relpath.split("/")
    try:
        fd = _open_dir_nofollow(ckpt_fd, subdirs, "directory") if subdirs else ckpt_fd
    except _Changed as exc:
        skip(d, str(exc))
        return
    except OSError as exc:
        fail(d, f"cannot open its directory: {exc.strerror or exc}")
        return
    try:
        try:
            st = out.fs.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            skip(d, "vanished since the plan")
            return
        except OSError as exc:
            fail(d, f"cannot stat: {exc.strerror or exc}")
            return
        now = _identity(st)
        if now != planned:
            skip(d, _describe_change(planned, now))
            return
        if stat.S_ISDIR(st.st_mode):
            skip(d, "is a directory now")
            return
        try:
            still_there()
        except _Changed as exc:
            skip(d, str(exc))
            return
        # The Trainer's rotation sorts checkpoints by their directory's mtime, which an
        # unlink moves: set it back, and first make sure that it can be (only the owner may).
        dst = os.fstat(fd)
        times = (dst.st_atime_ns, dst.st_mtime_ns)
        try:
            os.utime(fd, ns=times)
        except OSError as exc:
            fail(d, f"not deleted: its directory's modification time could not be kept "
                    f"({exc.strerror or exc}), and the Trainer's checkpoint rotation would see "
                    "this checkpoint as its newest")
            return
        try:
            out.fs.unlink(name, dir_fd=fd)   # a symlink goes itself; its target is never touched
        except FileNotFoundError:
            skip(d, "vanished since the plan")
            return
        except OSError as exc:
            fail(d, f"cannot delete: {exc.strerror or exc}")
            return
        try:
            os.utime(fd, ns=times)
            not_restored = ""
        except OSError as exc:
            not_restored = exc.strerror or str(exc)
        out.unlinked(d, st)
        if not_restored:
            fail(d, f"deleted, but its directory's modification time could not be set back: "
                    f"{not_restored}")
    finally:
        if fd != ckpt_fd:
            os.close(fd)


__all__ = ["execute_prune", "emit_plan", "PruneResult", "PruneEvent", "Deleted", "Failure",
           "ActionLog", "log_line", "LogWriteError", "LogOpenError", "Revalidator", "CHANGED",
           "STOPPED", "PLAN", "DELETE", "SKIP", "FAIL"]
