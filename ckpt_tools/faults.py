"""Test-only fault injection, set by ``CKPT_TOOLS_FAULT`` (unset in real use: a no-op).

``<point>:<n>`` SIGKILLs this process the n-th time ``point`` is hit. Points: migrate's
``after_write`` (a file of a target written), ``before_rename``, ``after_rename``; prune's
``after_unlink`` (a merged file unlinked by the prune process itself, before its deletion is
logged) and ``after_unlink_in_worker`` (the same in each of its worker processes).

``<error>@<op>:<n>`` makes the n-th ``op`` fail with a real ``OSError``; ``error`` is
``enospc`` or ``eio``. Ops (migrate): ``write`` (each file of a target: it is left cut to
half its length, as a full disk leaves it; a hard link is not created), ``fsync`` (each
fsync of a target's files and directories and of its parent), ``remove`` (each unlink or
rmdir while a failed target's temporary directory is removed).

Several specs may be given, comma-separated: ``enospc@write:3,eio@remove:1``. Counts run
over one process, so with ``--jobs 1`` the same n always strikes the same file (a forked
worker counts its own hits).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

FAULT_ENV = "CKPT_TOOLS_FAULT"


class Faults:
    ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}
    OPS = ("write", "fsync", "remove")

    def __init__(self, spec: str | None):
        self.kills: dict[str, int] = {}
        self.errors: dict[str, tuple[int, int]] = {}     # op -> (errno, n)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            what, _, n = part.partition(":")
            count = int(n or 1)
            if "@" not in what:
                self.kills[what] = count
                continue
            err, _, op = what.partition("@")
            if err not in self.ERRORS or op not in self.OPS:
                raise ValueError(f"{FAULT_ENV}: {part!r}: expected <point>:<n> or "
                                 f"<{'|'.join(self.ERRORS)}>@<{'|'.join(self.OPS)}>:<n>")
            self.errors[op] = (self.ERRORS[err], count)

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV)
        return cls(spec) if spec else NO_FAULTS

    def _nth(self, key: str, n: int) -> bool:
        with self.lock:
            self.counts[key] += 1
            return self.counts[key] == n

    def hit(self, point: str) -> None:
        if point in self.kills and self._nth(point, self.kills[point]):
            os.kill(os.getpid(), signal.SIGKILL)

    def fail(self, op: str, path: str) -> None:
        """Raise the injected ``OSError`` if this is the n-th ``op``."""
        if op in self.errors:
            code, n = self.errors[op]
            if self._nth("@" + op, n):
                raise OSError(code, os.strerror(code), path)


NO_FAULTS = Faults(None)
