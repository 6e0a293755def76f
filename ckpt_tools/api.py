"""The library's front door: scan roots into records."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING

from . import scanner
from .prune.plan import plan_prune
from .problems import Problem
from .read_cache import ReadCache
from .records import Checkpoint, CheckpointDir, Run, ScanResult
from .scanner import WalkOptions
from .storage import is_url, open_storage

if TYPE_CHECKING:
    from .storage.remote import ObjectStorage
    from .validator import Verdict

DEFAULT_MIN_AGE_S = 3600.0
# Threads overlapping the round trips to object storage when the caller says 'auto' (0).
OBJECT_STORAGE_JOBS = 16
# Below this many checkpoints, starting worker processes costs more than it saves.
_MIN_PER_PROCESS = 100


def default_jobs() -> int:
    """Worker processes for validation when the caller says 'auto' (0)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_INODE = attrgetter("dev", "ino")
_DEV = attrgetter("dev")
_INO = attrgetter("ino")
_ALLOCATED = attrgetter("allocated")
_FILES = attrgetter("files")


def _total_size(dirs) -> int:
    """Allocated bytes of all the files of ``dirs``, a file hard-linked more than once into
    them counted once (with the size its first link was seen with)."""
    files = list(chain.from_iterable(map(_FILES, dirs)))
    files.reverse()  # so that the first link seen is the last one written below
    if len(set(map(_DEV, files))) <= 1:  # one filesystem: the inode number is the file
        seen = dict(zip(map(_INO, files), map(_ALLOCATED, files)))
    else:
        seen = dict(zip(map(_INODE, files), map(_ALLOCATED, files)))
    return sum(seen.values())


def _size(ckpt: CheckpointDir) -> int:
    files = ckpt.files
    if len(set(map(_INODE, files))) == len(files):  # no two links to one file
        return sum(map(_ALLOCATED, files))
    return _total_size((ckpt,))


def classify(ckpt: CheckpointDir, *, level: str = "headers", min_age_s: float = DEFAULT_MIN_AGE_S,
             now: float | None = None, cache: ReadCache | None = None,
             storage: ObjectStorage | None = None) -> Checkpoint:
    """Validate one scanned checkpoint directory and return its verdict as a record.
    ``level``: validator.HEADERS, FULL or DEEP (the validator is imported only once there is
    a checkpoint to judge); ``cache``, ``storage``: as for ``scan``."""
    from .validator import validate_checkpoint
    v = validate_checkpoint(ckpt, level=level, min_age_s=min_age_s, now=now, cache=cache,
                            storage=storage)
    return Checkpoint.from_verdict(ckpt, v, _size(ckpt))


class _NewCache:
    """``scan``'s default ``cache``: a new ``ReadCache`` for each scan."""

    def __repr__(self) -> str:
        return "NEW_CACHE"


#: ``scan(cache=NEW_CACHE)``, the default: the scan creates its own ReadCache and drops it after.
NEW_CACHE = _NewCache()


def scan(*roots: str, level: str = "headers", min_age_s: float = DEFAULT_MIN_AGE_S,
         now: float | None = None, jobs: int = 1,
         progress: Callable[[int, int], None] | None = None,
         cache: ReadCache | _NewCache | None = NEW_CACHE,
         walk: WalkOptions = WalkOptions(),
         storage: ObjectStorage | None = None) -> ScanResult:
    """Find, validate and classify every checkpoint under ``roots``.

    ``now`` and ``min_age_s`` decide what counts as in progress; pass them in tests.
    ``jobs`` worker processes scan and validate in parallel (0: one per CPU, at most 8);
    small scans stay in this process. ``cache``: by default a new ``ReadCache`` for this scan
    (the checkpoints of a run then cost their reads only; at 10,000 checkpoints a sixth of
    the time without it); a ``ReadCache`` of the caller's; or None to read and judge every
    file afresh. The result is the same for every ``jobs`` and every ``cache``. ``walk``:
    which directories are left out (``scanner.WalkOptions``: other file systems, patterns).
    Roots may be fsspec URLs (``s3://bucket/runs``), all of one file system: ``storage`` is
    then what they are read through (``storage.open_storage``; by default one with the
    environment's credentials), and ``jobs`` threads overlap its requests. Raises
    ``scanner.ScanError`` (``storage.remote.ListingError``) when a root cannot be scanned.
    """
    if storage is None and any(map(is_url, roots)):
        roots, storage = open_storage(roots)
    if cache is NEW_CACHE:
        cache = ReadCache()
    now = time.time() if now is None else now
    if jobs == 0:
        jobs = default_jobs() if storage is None else OBJECT_STORAGE_JOBS
    # A scan allocates many small objects and frees few: the cyclic collector would walk
    # the growing heap again and again (and, in forked workers, copy every page it touches).
    collecting = gc.isenabled()
    gc.disable()
    try:
        if storage is not None:
            return _scan_objects(roots, storage, jobs, level, min_age_s, now, progress, cache,
                                 walk)
        if jobs > 1:
            return _scan_in_processes(roots, jobs, level, min_age_s, now, progress, cache, walk)
        return _scan_here(roots, level, min_age_s, now, progress, cache, walk)
    finally:
        if collecting:
            gc.enable()


def _scan_here(roots, level, min_age_s, now, progress, cache, walk) -> ScanResult:
    found: list[CheckpointDir] = []
    problems = []
    for root in scanner.iter_roots(roots):
        dirs, probs = scanner.find_checkpoints(root, walk)
        found.extend(dirs)
        problems.extend(probs)
    checkpoints: list[Checkpoint] = []
    for i, d in enumerate(found, 1):
        checkpoints.append(classify(d, level=level, min_age_s=min_age_s, now=now, cache=cache))
        if progress:
            progress(i, len(found))
    return assemble(tuple(scanner.iter_roots(roots)), checkpoints, problems)


def _scan_objects(roots, storage, jobs, level, min_age_s, now, progress, cache, walk
                  ) -> ScanResult:
    """``_scan_here`` of roots in object storage: one listing per root, then the checkpoints
    judged in ``jobs`` threads (their time is the store's round trips, not the CPU)."""
    from .storage.walk import find_checkpoints
    roots = tuple(dict.fromkeys(roots))
    found: list[CheckpointDir] = []
    problems = []
    for root in roots:
        dirs, probs = find_checkpoints(storage, root, walk)
        found.extend(dirs)
        problems.extend(probs)
    def judge(ckpt: CheckpointDir) -> Checkpoint:
        with storage.judging(ckpt):
            return classify(ckpt, level=level, min_age_s=min_age_s, now=now, cache=cache,
                            storage=storage)
    checkpoints: list[Checkpoint] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, c in enumerate(pool.map(judge, found), 1):
            checkpoints.append(c)
            if progress:
                progress(i, len(found))
    return assemble(roots, checkpoints, problems, storage)


# --- scanning and validating in forked worker processes ------------------------------
#
# The parent walks each root down to the checkpoint directories without listing those
# (scanner.walk with a delegate): what is left, the subtree of each checkpoint, is a unit
# of work. Workers, forked once the units are known, inherit them; each walks its units'
# subtrees (lstat of every file), validates the checkpoints found, and sends back plain
# tuples, which the parent turns into records in the units' order. Problems of the walk
# keep their place, so the result equals that of jobs=1. The scan's ReadCache travels in
# the work too: each worker starts from a copy of the parent's cache as it was at the fork
# and adds to its own copy (see read_cache).


def _plan(roots, walk: WalkOptions) -> tuple[list, list]:
    """(walks, units): per root, (root, root_abs, root_real, items, admits) where items are what
    its walk yielded (problems, checkpoints it had to list itself, delegated paths) and admits
    what it enters (the workers walk the delegated subtrees with it); each unit is
    (root index, item) for an item that needs a worker."""
    walks = []
    units = []
    for r, root in enumerate(scanner.iter_roots(roots)):
        root_abs, root_real, first = scanner._roots(root)
        admits = walk.admits(root_abs)
        items = list(scanner.walk(root, root_abs, root_real, [(root_abs, first)],
                                  delegate=scanner.delegable, admits=admits))
        walks.append((root, root_abs, root_real, items, admits))
        units.extend((r, item) for item in items if not isinstance(item, Problem))
    return walks, units


@dataclass(frozen=True)
class _ScanWork:
    """The work of one scan's workers: its walks and units and how to judge a checkpoint.
    ``workers.Workers`` is handed the bound ``run_span``: the workers are forked once this
    object exists and inherit it with the method, so neither is ever pickled."""

    walks: list
    units: list
    level: str
    min_age_s: float
    now: float
    cache: ReadCache | None

    def judged(self, ckpt: CheckpointDir) -> tuple[Verdict, int]:
        """(verdict, size in bytes) of ``ckpt``: what ``Checkpoint.from_verdict`` needs besides
        the directory, which the parent rebuilds from the values it is sent."""
        from .validator import validate_checkpoint
        v = validate_checkpoint(ckpt, level=self.level, min_age_s=self.min_age_s, now=self.now,
                                cache=self.cache)
        return v, _size(ckpt)

    def run_unit(self, i: int) -> list:
        """Unit ``i``: [Problem | (checkpoint values, (verdict, size))] in walk order."""
        r, item = self.units[i]
        if isinstance(item, CheckpointDir):  # listed by the parent already
            return [(None, self.judged(item))]
        root, root_abs, root_real, _, admits = self.walks[r]
        out = []
        for x in scanner.walk(root, root_abs, root_real, [(item, None)], rows=True,
                              admits=admits):
            if isinstance(x, Problem):
                out.append(x)
            else:
                values, ckpt = x
                out.append((values, self.judged(ckpt)))
        return out

    def run_span(self, lo_hi: tuple[int, int]) -> list:
        return [self.run_unit(i) for i in range(*lo_hi)]


def _scan_in_processes(roots, jobs, level, min_age_s, now, progress, cache, walk) -> ScanResult:
    walks, units = _plan(roots, walk)
    if units:
        from . import validator  # noqa: F401 - imported before the fork: the workers inherit it
    jobs = min(jobs, max(1, len(units) // _MIN_PER_PROCESS))
    work = _ScanWork(walks, units, level, min_age_s, now, cache)
    if jobs > 1:   # the workers module only once there is work for them (start-up cost)
        from . import workers
        if workers.available():
            with workers.Workers(workers.spans_of(len(units), jobs), jobs, work.run_span) as w:
                return _gather(walks, units, (u for batch in w.in_order() for u in batch), progress)
    return _gather(walks, units, (work.run_unit(i) for i in range(len(units))), progress)


def _gather(walks, units, results, progress) -> ScanResult:
    """Splice the units' results into the walks' items, in order."""
    problems = []
    checkpoints: list[Checkpoint] = []
    done = 0
    total = len(units)
    u = 0
    for root, _, _, items, _ in walks:
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
                values, (verdict, size) = x
                d = unit_item if values is None else CheckpointDir.from_values(values)
                found.append(Checkpoint.from_verdict(d, verdict, size))
                done += 1
                if progress:
                    progress(done, max(total, done))
        found.sort(key=lambda c: scanner.checkpoint_order(c.dir))
        checkpoints.extend(found)
    return assemble(tuple(w[0] for w in walks), checkpoints, problems)


def _run(root: str, path: str, checkpoints: list[Checkpoint], problems: list[Problem],
         storage: ObjectStorage | None) -> Run:
    # imported once there is a run: it reads through the format readers, as the validator does
    from .trainer_state import read_run_state
    trainer = read_run_state(checkpoints, storage)
    trash: tuple = ()
    if storage is None:   # prune, the only writer of a trash, does not act on buckets yet
        trash, trash_problems = scanner.trash_files(root, path)
        problems.extend(trash_problems)
    return Run(root, path, tuple(map(trainer.annotated, checkpoints)), trainer, trash)


def assemble(roots: tuple[str, ...], checkpoints: Iterable[Checkpoint], problems=(),
             storage: ObjectStorage | None = None) -> ScanResult:
    """Group checkpoints into runs, fill in what prune could reclaim from each, read each
    run's trainer state (one trainer_state.json per run: its best checkpoint, each one's eval)
    and list the files of each run's trash (``scanner.trash_files``; none in a bucket).
    ``storage``: where the checkpoints were listed, None for local directories."""
    checkpoints = list(checkpoints)
    plan = plan_prune(checkpoints, prove=False)   # audit is structural: it reads no tensor
    freed = plan.by_checkpoint()
    runs: dict[tuple[str, str], list[Checkpoint]] = {}
    for c in checkpoints:
        d = c.dir
        rec = freed.get((d.root, d.path), 0) if freed else 0
        if rec:
            c = c.with_reclaimable(rec)
        runs.setdefault((d.root, d.run), []).append(c)
    problems = list(problems)
    run_records = tuple(_run(root, path, cs, problems, storage)
                        for (root, path), cs in runs.items())
    total = _total_size(c.dir for r in run_records for c in r.checkpoints)
    return ScanResult(roots=roots, runs=run_records, problems=tuple(problems),
                      total_size_bytes=total)
