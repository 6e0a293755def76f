"""Forked worker processes for work split into spans (scan and prune use them).

Workers take spans from one pipe (4-byte span numbers, written before they start: a read
of 4 bytes takes one whole number, so whoever is free takes the next span) and each
writes its results to a pipe of its own, a frame per span: span number, length, pickled
result. The work itself is never pickled: the workers are forked once it is known and
inherit it, with the function that does it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
from collections.abc import Callable, Iterator

_FRAME = struct.Struct("<iQ")  # span number (-1: the worker failed), payload length
_SPAN = struct.Struct("<I")
# All span numbers are written at once, before the workers start: they must fit in the
# smallest pipe buffer (one page), and one write of at most PIPE_BUF bytes is atomic.
MAX_SPANS = 1024


def available() -> bool:
    """Whether this platform can run workers (fork and poll)."""
    return hasattr(os, "fork") and hasattr(select, "poll")


def spans_of(n: int, jobs: int, *, most: int = 64) -> list[tuple[int, int]]:
    """``n`` items cut into spans small enough that ``jobs`` workers finish within a few
    items of each other, at most ``most`` items each, and no more than MAX_SPANS spans."""
    step = max(4, min(most, n // (jobs * 8) or 1), -(-n // MAX_SPANS))
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class WorkerFailed(RuntimeError):
    """A worker raised (the message holds its traceback) or ended before its work was done."""


class Workers:
    """``with Workers(spans, jobs, run) as w``: forked workers call ``run(span)`` for each
    span; ``w.in_order()`` yields the results span by span, ``w.as_they_come()`` yields
    ``(span index, result)`` as they arrive. Leaving the block ends the workers, whatever
    happened."""

    def __init__(self, spans: list[tuple[int, int]], jobs: int, run: Callable[[tuple[int, int]], object]):
        if len(spans) > MAX_SPANS:
            raise ValueError(f"{len(spans)} spans; at most {MAX_SPANS}")
        self.spans = spans
        self.jobs = jobs
        self.run = run
        self.pids: list[int] = []
        self.fds: list[int] = []

    def __enter__(self) -> Workers:
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
                    _worker_main(self.spans, self.run, tasks_r, w)
                os.close(w)
                self.pids.append(pid)
                self.fds.append(r)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            os.close(tasks_r)
        return self

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

    def as_they_come(self, failures: list[str] | None = None) -> Iterator[tuple[int, object]]:
        """``(span index, result)`` as each arrives, until every span has come or every worker
        has ended. A worker's failure report (its traceback) raises ``WorkerFailed``, or is
        appended to ``failures`` when a list is given. Spans that never came are the
        caller's to notice."""
        want = len(self.spans)
        got = 0
        readers = {fd: _FrameReader(fd) for fd in self.fds}
        poller = select.poll()  # not select(): a caller's process may hold 1024 files and more
        for fd in readers:
            poller.register(fd, select.POLLIN)
        while got < want and readers:
            for fd, _ in poller.poll():
                frames = readers[fd].read()
                if frames is None:  # end of file: the worker has exited
                    poller.unregister(fd)
                    del readers[fd]
                    continue
                for span, payload in frames:
                    if span < 0:
                        report = payload.decode(errors="replace")
                        if failures is None:
                            raise WorkerFailed(f"a worker process failed:\n{report}")
                        failures.append(report)
                        continue
                    got += 1
                    yield span, pickle.loads(payload)

    def in_order(self) -> Iterator[object]:
        """The results span by span, in span order; raises ``WorkerFailed`` when a worker
        failed or ended before its spans were done."""
        held: dict[int, object] = {}
        nxt = 0
        for span, result in self.as_they_come():
            held[span] = result
            while nxt in held:
                yield held.pop(nxt)
                nxt += 1
        if nxt < len(self.spans):
            raise WorkerFailed("a worker process ended before its work was done")


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


def _worker_main(spans, run, tasks: int, out: int) -> None:
    """A forked worker's whole life: spans from ``tasks``, frames to ``out``, then _exit."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles ^C
        while True:
            raw = os.read(tasks, _SPAN.size)
            if not raw:
                break
            (span,) = _SPAN.unpack(raw)
            payload = pickle.dumps(run(spans[span]), pickle.HIGHEST_PROTOCOL)
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
