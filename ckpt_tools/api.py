"""The library's front door: scan roots into records."""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import struct
import time
from collections.abc import Callable, Iterable
from itertools import chain
from operator import itemgetter

from . import scanner
from .pruner import plan_prune
from .problems import Problem
from .records import Checkpoint, CheckpointDir, Run, ScanResult, checkpoint_record, file_rows
from .validator import HEADERS, validate_checkpoint

DEFAULT_MIN_AGE_S = 3600.0
# Below this many checkpoints, starting worker processes costs more than it saves.
_MIN_PER_PROCESS = 100


def default_jobs() -> int:
    """Worker processes for validation when the caller says 'auto' (0)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_INODE = itemgetter(3, 4)   # FileRecord row fields: dev, ino
_DEV = itemgetter(3)
_INO = itemgetter(4)
_ALLOCATED = itemgetter(2)


def _total_size(dirs) -> int:
    """Allocated bytes of all the files of ``dirs``, a file hard-linked more than once into
    them counted once (with the size its first link was seen with)."""
    rows = list(chain.from_iterable(map(file_rows, dirs)))
    rows.reverse()  # so that the first link seen is the last one written below
    if len(set(map(_DEV, rows))) <= 1:  # one filesystem: the inode number is the file
        seen = dict(zip(map(_INO, rows), map(_ALLOCATED, rows)))
    else:
        seen = dict(zip(map(_INODE, rows), map(_ALLOCATED, rows)))
    return sum(seen.values())


def _size(ckpt: CheckpointDir) -> int:
    rows = file_rows(ckpt)
    if len(set(map(_INODE, rows))) == len(rows):  # no two links to one file
        return sum(map(_ALLOCATED, rows))
    return _total_size((ckpt,))


def classify(ckpt: CheckpointDir, *, level: str = HEADERS, min_age_s: float = DEFAULT_MIN_AGE_S,
             now: float | None = None) -> Checkpoint:
    """Validate one scanned checkpoint directory and return its verdict as a record."""
    v = validate_checkpoint(ckpt, level=level, min_age_s=min_age_s, now=now)
    return checkpoint_record(ckpt, v.status, v.layout, tuple(v.problems), v.merged_files,
                             v.num_experts, _size(ckpt), facts=v.facts)


def scan(*roots: str, level: str = HEADERS, min_age_s: float = DEFAULT_MIN_AGE_S,
         now: float | None = None, jobs: int = 1,
         progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Find, validate and classify every checkpoint under ``roots``.

    ``now`` and ``min_age_s`` decide what counts as in progress; pass them in tests.
    ``jobs`` worker processes scan and validate in parallel (0: one per CPU, at most 8);
    small scans stay in this process. The result is the same for every ``jobs``.
    Raises ``scanner.ScanError`` when a root cannot be scanned at all.
    """
    now = time.time() if now is None else now
    if jobs == 0:
        jobs = default_jobs()
    # A scan allocates many small objects and frees few: the cyclic collector would walk
    # the growing heap again and again (and, in forked workers, copy every page it touches).
    collecting = gc.isenabled()
    gc.disable()
    try:
        if jobs > 1 and hasattr(os, "fork") and hasattr(select, "poll"):
            return _scan_in_processes(roots, jobs, level, min_age_s, now, progress)
        return _scan_here(roots, level, min_age_s, now, progress)
    finally:
        if collecting:
            gc.enable()


def _scan_here(roots, level, min_age_s, now, progress) -> ScanResult:
    found: list[CheckpointDir] = []
    problems = []
    for root in scanner.iter_roots(roots):
        dirs, probs = scanner.find_checkpoints(root)
        found.extend(dirs)
        problems.extend(probs)
    checkpoints: list[Checkpoint] = []
    for i, d in enumerate(found, 1):
        checkpoints.append(classify(d, level=level, min_age_s=min_age_s, now=now))
        if progress:
            progress(i, len(found))
    return assemble(tuple(scanner.iter_roots(roots)), checkpoints, problems)


# --- scanning and validating in forked worker processes ------------------------------
#
# The parent walks each root down to the checkpoint directories without listing those
# (scanner.walk with a delegate): what is left, the subtree of each checkpoint, is a unit
# of work. Workers, forked once the units are known, inherit them; each walks its units'
# subtrees (lstat of every file), validates the checkpoints found, and sends back plain
# tuples, which the parent turns into records in the units' order. Problems of the walk
# keep their place, so the result equals that of jobs=1.

# The work of forked workers: inherited from the parent at fork time, never pickled.
_WORK: tuple = ()


def _plan(roots) -> tuple[list, list]:
    """(walks, units): per root, (root, root_abs, root_real, items) where items are what its walk
    yielded (problems, checkpoints it had to list itself, delegated paths); each unit is
    (root index, item) for an item that needs a worker."""
    walks = []
    units = []
    for r, root in enumerate(scanner.iter_roots(roots)):
        root_abs, root_real, first = scanner._roots(root)
        items = list(scanner.walk(root, root_abs, root_real, [(root_abs, first)],
                                  delegate=scanner.delegable))
        walks.append((root, root_abs, root_real, items))
        units.extend((r, item) for item in items if not isinstance(item, Problem))
    return walks, units


def _verdict_of(ckpt: CheckpointDir, level, min_age_s, now) -> tuple:
    v = validate_checkpoint(ckpt, level=level, min_age_s=min_age_s, now=now)
    return (v.status, v.layout, tuple(v.problems), v.merged_files, v.num_experts,
            _size(ckpt), v.facts)


def _run_unit(i: int) -> list:
    """Unit ``i``: [Problem | (checkpoint values, verdict)] in walk order."""
    walks, units, level, min_age_s, now = _WORK
    r, item = units[i]
    if isinstance(item, CheckpointDir):  # listed by the parent already
        return [(None, _verdict_of(item, level, min_age_s, now))]
    root, root_abs, root_real, _ = walks[r]
    out = []
    for x in scanner.walk(root, root_abs, root_real, [(item, None)], rows=True):
        if isinstance(x, Problem):
            out.append(x)
        else:
            values, ckpt = x
            out.append((values, _verdict_of(ckpt, level, min_age_s, now)))
    return out


def _run_units(lo_hi: tuple[int, int]) -> list:
    return [_run_unit(i) for i in range(*lo_hi)]


def _checkpoint(d: CheckpointDir, verdict: tuple) -> Checkpoint:
    status, lay, probs, merged, n, size, facts = verdict
    return checkpoint_record(d, status, lay, probs, merged, n, size, facts=facts)


def _scan_in_processes(roots, jobs, level, min_age_s, now, progress) -> ScanResult:
    global _WORK
    walks, units = _plan(roots)
    jobs = min(jobs, max(1, len(units) // _MIN_PER_PROCESS))
    _WORK = (walks, units, level, min_age_s, now)
    try:
        if jobs > 1:
            # spans small enough that the workers finish within a few milliseconds of
            # each other, and few enough for the task pipe (_MAX_SPANS)
            step = max(4, min(64, len(units) // (jobs * 8) or 1),
                       -(-len(units) // _MAX_SPANS))
            spans = [(lo, min(lo + step, len(units))) for lo in range(0, len(units), step)]
            with _Workers(spans, jobs) as batches:
                return _gather(walks, units, (u for batch in batches for u in batch), progress)
        return _gather(walks, units, (_run_unit(i) for i in range(len(units))), progress)
    finally:
        _WORK = ()


# Workers take spans of units from one pipe (4-byte span numbers, written before they start:
# a read of 4 bytes takes one whole number, so whoever is free takes the next span) and
# each writes its results to a pipe of its own, a frame per span: span number, length,
# pickled list. The parent reads the frames as they come and hands them on in span order.

_FRAME = struct.Struct("<iQ")  # span number (-1: the worker failed), payload length
_SPAN = struct.Struct("<I")
# All span numbers are written at once, before the workers start: they must fit in the
# smallest pipe buffer (one page), and one write of at most PIPE_BUF bytes is atomic.
_MAX_SPANS = 1024


class _Workers:
    """``with _Workers(spans, jobs) as batches``: forked workers run ``_run_units`` on each
    span; ``batches`` yields the results span by span, in order. Leaving the block ends the
    workers, whatever happened."""

    def __init__(self, spans: list[tuple[int, int]], jobs: int):
        self.spans = spans
        self.jobs = jobs
        self.pids: list[int] = []
        self.fds: list[int] = []

    def __enter__(self):
        tasks_r, tasks_w = os.pipe()
        try:
            try:
                os.write(tasks_w, b"".join(_SPAN.pack(i) for i in range(len(self.spans))))
            finally:
                os.close(tasks_w)
            for _ in range(self.jobs):
                r, w = os.pipe()
                try:
                    pid = os.fork()
                except BaseException:
                    os.close(r)
                    os.close(w)
                    raise
                if pid == 0:  # the worker: never returns
                    os.close(r)
                    _worker_main(self.spans, tasks_r, w)
                os.close(w)
                self.pids.append(pid)
                self.fds.append(r)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            os.close(tasks_r)
        return self._batches()

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)  # done by now, or no longer wanted
            except OSError:
                pass
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.pids = []

    def _batches(self):
        want = len(self.spans)
        payloads: dict[int, bytes] = {}
        readers = {fd: _FrameReader(fd) for fd in self.fds}
        poller = select.poll()  # not select(): a caller's process may hold 1024 files and more
        for fd in readers:
            poller.register(fd, select.POLLIN)
        nxt = 0
        while nxt < want:
            while nxt in payloads:
                yield pickle.loads(payloads.pop(nxt))
                nxt += 1
            if nxt == want:
                break
            if not readers:
                raise RuntimeError("a worker process ended before its work was done")
            for fd, _ in poller.poll():
                frames = readers[fd].read()
                if frames is None:  # end of file: the worker has exited
                    poller.unregister(fd)
                    del readers[fd]
                    continue
                for span, payload in frames:
                    if span < 0:
                        raise RuntimeError(f"a worker process failed:\n{payload.decode()}")
                    payloads[span] = payload


class _FrameReader:
    """Frames from one worker's pipe, as whole frames arrive."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def read(self) -> list[tuple[int, bytes]] | None:
        chunk = os.read(self.fd, 1 << 16)  # what a pipe holds
        if not chunk:
            return None
        buf = self.buf
        buf += chunk
        frames = []
        at = 0
        while len(buf) - at >= _FRAME.size:
            span, n = _FRAME.unpack_from(buf, at)
            end = at + _FRAME.size + n
            if len(buf) < end:
                break
            frames.append((span, bytes(buf[at + _FRAME.size:end])))
            at = end
        del buf[:at]
        return frames


def _worker_main(spans, tasks: int, out: int) -> None:
    """A forked worker's whole life: spans from ``tasks``, frames to ``out``, then _exit."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles ^C
        while True:
            raw = os.read(tasks, _SPAN.size)
            if not raw:
                break
            (span,) = _SPAN.unpack(raw)
            payload = pickle.dumps(_run_units(spans[span]), pickle.HIGHEST_PROTOCOL)
            _write_all(out, _FRAME.pack(span, len(payload)) + payload)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        code = 1
        try:
            import traceback
            report = traceback.format_exc().encode()
            _write_all(out, _FRAME.pack(-1, len(report)) + report)
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _gather(walks, units, results, progress) -> ScanResult:
    """Splice the units' results into the walks' items, in order."""
    problems = []
    checkpoints: list[Checkpoint] = []
    done = 0
    total = len(units)
    u = 0
    for root, _, _, items in walks:
        found = []
        for item in items:
            if isinstance(item, Problem):
                problems.append(item)
                continue
            r, unit_item = units[u]
            u += 1
            for x in next(results):
                if isinstance(x, Problem):
                    problems.append(x)
                    continue
                values, verdict = x
                d = unit_item if values is None else scanner.checkpoint_from_rows(values)
                found.append(_checkpoint(d, verdict))
                done += 1
                if progress:
                    progress(done, max(total, done))
        found.sort(key=lambda c: scanner.checkpoint_order(c.dir))
        checkpoints.extend(found)
    return assemble(tuple(w[0] for w in walks), checkpoints, problems)


def assemble(roots: tuple[str, ...], checkpoints: Iterable[Checkpoint], problems=()) -> ScanResult:
    """Group checkpoints into runs and fill in what prune could reclaim from each."""
    checkpoints = list(checkpoints)
    plan = plan_prune(checkpoints)
    freed = plan.by_checkpoint()
    runs: dict[tuple[str, str], list[Checkpoint]] = {}
    for c in checkpoints:
        d = c.dir
        rec = freed.get((d.root, d.path), 0) if freed else 0
        if rec:
            c = checkpoint_record(d, c.status, c.layout, c.problems, c.merged_files,
                                  c.num_experts, c.size_bytes, rec, c.facts)
        runs.setdefault((d.root, d.run), []).append(c)
    run_records = tuple(Run(root, path, tuple(cs)) for (root, path), cs in runs.items())
    total = _total_size(c.dir for r in run_records for c in r.checkpoints)
    return ScanResult(roots=roots, runs=run_records, problems=tuple(problems),
                      total_size_bytes=total)
