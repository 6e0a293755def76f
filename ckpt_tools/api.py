"""The library's front door: scan roots into records (SPEC §7)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from . import scanner
from .pruner import plan_prune
from .records import Checkpoint, CheckpointDir, Run, ScanResult
from .validator import HEADERS, validate_checkpoint

DEFAULT_MIN_AGE_S = 3600.0


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
    Raises ``scanner.ScanError`` when a root cannot be scanned at all.
    """
    now = time.time() if now is None else now
    found: list[CheckpointDir] = []
    problems = []
    for root in scanner.iter_roots(roots):
        dirs, probs = scanner.find_checkpoints(root)
        found.extend(dirs)
        problems.extend(probs)

    def one(d: CheckpointDir) -> Checkpoint:
        return classify(d, level=level, min_age_s=min_age_s, now=now)

    checkpoints: list[Checkpoint] = []
    if jobs > 1 and len(found) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for i, c in enumerate(pool.map(one, found), 1):
                checkpoints.append(c)
                if progress:
                    progress(i, len(found))
    else:
        for i, d in enumerate(found, 1):
            checkpoints.append(one(d))
            if progress:
                progress(i, len(found))
    return assemble(tuple(scanner.iter_roots(roots)), checkpoints, problems)


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
