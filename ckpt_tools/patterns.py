"""PEFT's module-name patterns, matched with PEFT's meaning under a time bound.

An adapter config names the modules it adapts in ``target_modules`` and varies the rank and
alpha per module in ``rank_pattern`` / ``alpha_pattern``. PEFT reads them so:

- ``target_modules`` as a list matches a module whose name is one of its entries or ends with
  ``.<entry>``; as a string it is a regular expression the whole name must match
  (``re.fullmatch``), ``"all-linear"`` aside;
- a key of ``rank_pattern`` / ``alpha_pattern`` is a regular expression matched against the
  name or its end after a dot (``re.match(rf"(.*\\.)?({key})$", name)``); the first key
  that matches wins.

The config is a file of the checkpoint, and Python's ``re`` backtracks with no time limit:
``([a-z_.0-9]+)+X`` takes time exponential in the length of the name it fails on. So a pattern
made of name characters only (letters, digits, ``_``, ``-``, ``.``), which cannot backtrack
beyond name length × pattern length, is matched here, and any other is matched in a forked
child process that must answer within ``PATTERN_SECONDS``; past that it is killed and the
pattern is ``PatternTooCostly``. A child with a deadline bounds the time of every pattern with
PEFT's own engine and meaning; a "safe subset" of regular expressions would have to refuse
patterns people write (alternations, nested groups) and would still bound only the exponent of
the time, not the time. The fork is paid once per config holding a real regular expression
(the validator memoises its checks per parsed config).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: Seconds the child matching one config's regular expressions against a checkpoint's
#: modules has to answer.
PATTERN_SECONDS = 2.0

_PLAIN = re.compile(r"[A-Za-z0-9_.\-]*")


class PatternTooCostly(Exception):
    """A config's regular expressions could not be matched within the time bound."""

    def __init__(self, field: str, seconds: float):
        super().__init__(f"{field}: regular expression too costly to evaluate "
                         f"(no answer within {seconds:g} s)")
        self.field = field


@dataclass(frozen=True)
class ModuleMatch:
    """How a config's patterns apply to one module."""

    targeted: bool                 # among target_modules (True where there are none)
    rank_key: str | None           # the rank_pattern key that applies, if any
    alpha_key: str | None          # the alpha_pattern key that applies, if any


def _targeted(targets, module: str) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return True  # PEFT would fail on it; the config check judges it, not this
    last = module.rsplit(".", 1)[-1]
    return last in targets or any(module.endswith("." + t) or module == t for t in targets)


def _first_key(keys: Sequence[str], module: str) -> int | None:
    for i, key in enumerate(keys):
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return i
        except re.error:
            continue
    return None


def _match_all(targets, rank_keys: list[str], alpha_keys: list[str],
               modules: list[str]) -> list[list]:
    return [[_targeted(targets, m), _first_key(rank_keys, m), _first_key(alpha_keys, m)]
            for m in modules]


def _plain(pattern: str) -> bool:
    return _PLAIN.fullmatch(pattern) is not None


def _keys(patterns) -> list[str]:
    return [k for k in patterns if isinstance(k, str)] if isinstance(patterns, dict) else []


def match_modules(targets, rank_pattern, alpha_pattern, modules: Sequence[str], *,
                  seconds: float = PATTERN_SECONDS) -> dict[str, ModuleMatch]:
    """How ``target_modules`` (list, str or None), ``rank_pattern`` and ``alpha_pattern`` (dicts
    or None) apply to each of ``modules``. Raises ``PatternTooCostly`` (naming the field) when
    a regular expression among them gets no answer within ``seconds``."""
    modules = list(modules)
    rank_keys, alpha_keys = _keys(rank_pattern), _keys(alpha_pattern)
    if isinstance(targets, list):
        targets = [t for t in targets if isinstance(t, str)]
    elif not isinstance(targets, str):
        targets = None
    regexes = [("rank_pattern", k) for k in rank_keys if not _plain(k)]
    regexes += [("alpha_pattern", k) for k in alpha_keys if not _plain(k)]
    if isinstance(targets, str) and targets != "all-linear" and not _plain(targets):
        regexes.insert(0, ("target_modules", targets))
    args = (targets, rank_keys, alpha_keys, modules)
    if not regexes or not modules:
        rows = _match_all(*args)
    else:
        rows = _in_child(args, seconds)
        if rows is None:
            raise PatternTooCostly(_costly_field(regexes, modules, seconds), seconds)
    return {m: ModuleMatch(t, None if r is None else rank_keys[r],
                           None if a is None else alpha_keys[a])
            for m, (t, r, a) in zip(modules, rows)}


def _costly_field(regexes: list[tuple[str, str]], modules: list[str], seconds: float) -> str:
    """The field of the first regular expression that alone gets no answer in time, to name it
    (only after the whole config got none, and where they are of several fields: a second
    round of children, rarely paid)."""
    if len({field for field, _ in regexes}) == 1:
        return regexes[0][0]
    for field, pattern in regexes:
        if field == "target_modules":
            probe = (pattern, [], [], modules)
        elif field == "rank_pattern":
            probe = (None, [pattern], [], modules)
        else:
            probe = (None, [], [pattern], modules)
        if _in_child(probe, seconds) is None:
            return field
    return regexes[0][0]


def _in_child(args: tuple, seconds: float) -> list | None:
    """``_match_all(*args)`` computed by a forked child within ``seconds``; None when it did not
    answer in time (it is killed) or failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, write, exit; never return into the caller's code
        code = 1
        try:
            os.close(read_end)
            view = memoryview(json.dumps(_match_all(*args)).encode())
            while view:
                view = view[os.write(write_end, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks: list[bytes] = []
    try:
        poller = select.poll()  # not select(): a descriptor may be numbered past FD_SETSIZE
        poller.register(read_end, select.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                return None
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _reap(pid)
    try:
        rows = json.loads(b"".join(chunks))
    except ValueError:
        return None  # the child failed before writing all of it
    return rows if isinstance(rows, list) and len(rows) == len(args[3]) else None


def _reap(pid: int) -> None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def pattern_value(patterns: dict | None, module: str):
    """PEFT's rank_pattern / alpha_pattern lookup for one module (``match_modules``); raises
    ``PatternTooCostly`` as it does."""
    if not patterns:
        return None
    key = match_modules(None, patterns, None, [module])[module].rank_key
    return None if key is None else patterns[key]
