"""The library's front door: scan roots into records (SPEC §7)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable

from . import scanner
from .pruner import plan_prune
from .records import Checkpoint, CheckpointDir, Run, ScanResult
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


def _size(files, seen: set) -> int:
    total = 0
    for f in files:
        key = (f.dev, f.ino)
        if key in seen:
            continue
        seen.add(key)
        total += f.allocated
    return total


def classify(ckpt: CheckpointDir, *, level: str = HEADERS, min_age_s: float = DEFAULT_MIN_AGE_S,
             now: float | None = None) -> Checkpoint:
    """Validate one scanned checkpoint directory and return its verdict as a record."""
    v = validate_checkpoint(ckpt, level=level, min_age_s=min_age_s, now=now)
    return Checkpoint(dir=ckpt, status=v.status, layout=v.layout, problems=tuple(v.problems),
                      merged_files=v.merged_files, num_experts=v.num_experts,
                      size_bytes=_size(ckpt.files, set()), facts=v.facts)


def scan(*roots: str, level: str = HEADERS, min_age_s: float = DEFAULT_MIN_AGE_S,
         now: float | None = None, jobs: int = 1,
         progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Find, validate and classify every checkpoint under ``roots``.

    ``now`` and ``min_age_s`` decide what counts as in progress; pass them in tests.
    ``jobs`` worker processes validate in parallel (0: one per CPU, at most 8); small
    scans stay in this process.
    Raises ``scanner.ScanError`` when a root cannot be scanned at all.
    """
    now = time.time() if now is None else now
    found: list[CheckpointDir] = []
    problems = []
    for root in scanner.iter_roots(roots):
        dirs, probs = scanner.find_checkpoints(root)
        found.extend(dirs)
        problems.extend(probs)

    if jobs == 0:
        jobs = default_jobs()
    jobs = min(jobs, max(1, len(found) // _MIN_PER_PROCESS))
    checkpoints: list[Checkpoint] = []
    if jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        checkpoints = _classify_in_processes(found, jobs, level, min_age_s, now, progress)
    else:
        for i, d in enumerate(found, 1):
            checkpoints.append(classify(d, level=level, min_age_s=min_age_s, now=now))
            if progress:
                progress(i, len(found))
    return assemble(tuple(scanner.iter_roots(roots)), checkpoints, problems)


# The work of forked validators: inherited from the parent at fork time, never pickled.
_WORK: tuple = ()


def _classify_one(i: int):
    found, level, min_age_s, now = _WORK
    v = validate_checkpoint(found[i], level=level, min_age_s=min_age_s, now=now)
    return (v.status, v.layout, tuple(v.problems), v.merged_files, v.num_experts, v.facts)


def _classify_in_processes(found, jobs, level, min_age_s, now, progress) -> list[Checkpoint]:
    """Validate in forked worker processes: validation is CPU-bound Python, so threads would
    share one core. Workers inherit the scanned records and send back only the verdicts."""
    global _WORK
    _WORK = (found, level, min_age_s, now)
    out: list[Checkpoint] = []
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            chunk = max(8, min(256, len(found) // (jobs * 8) or 1))
            for i, (status, lay, probs, merged, n, facts) in enumerate(
                    pool.imap(_classify_one, range(len(found)), chunksize=chunk)):
                d = found[i]
                out.append(Checkpoint(dir=d, status=status, layout=lay, problems=probs,
                                      merged_files=merged, num_experts=n,
                                      size_bytes=_size(d.files, set()), facts=facts))
                if progress:
                    progress(i + 1, len(found))
    finally:
        _WORK = ()
    return out


def assemble(roots: tuple[str, ...], checkpoints: Iterable[Checkpoint], problems=()) -> ScanResult:
    """Group checkpoints into runs and fill in what prune could reclaim from each."""
    checkpoints = list(checkpoints)
    plan = plan_prune(checkpoints)
    freed = plan.by_checkpoint()
    runs: dict[tuple[str, str], list[Checkpoint]] = {}
    for c in checkpoints:
        rec = freed.get((c.dir.root, c.path), 0)
        if rec:
            c = Checkpoint(dir=c.dir, status=c.status, layout=c.layout, problems=c.problems,
                           merged_files=c.merged_files, num_experts=c.num_experts,
                           size_bytes=c.size_bytes, reclaimable_bytes=rec, facts=c.facts)
        runs.setdefault((c.dir.root, c.run), []).append(c)
    run_records = tuple(Run(root, path, tuple(cs)) for (root, path), cs in runs.items())
    seen: set = set()
    total = sum(_size(c.dir.files, seen) for r in run_records for c in r.checkpoints)
    return ScanResult(roots=roots, runs=run_records, problems=tuple(problems),
                      total_size_bytes=total)
