"""``ckpt-tools audit``: scan → classify → narrow and order what is shown → render; exit 1 on
what needs attention among what is shown."""

from __future__ import annotations

import dataclasses
import fnmatch
import os

import click

from ..kinds import Status
from .exits import ExitCode
from .options import (Duration, PathArgument, command_output, output_options, storage_options,
                      walk_options)
from .scanning import scan_roots, storage_line, with_storage_counts

# ckpt-tools 0.1 called healthy ``peft-only`` (README, "Changes to the JSON in 0.2")
STATUS_NAMES = {**{str(s): s for s in Status}, "peft-only": Status.HEALTHY}

# --sort: the order of the checkpoints of a run, and of the runs by the same measure of their
# checkpoints; the largest first for sizes, the lowest step, the oldest first for age. The sort
# is stable: ties keep the scan's order (and --sort step keeps the runs in it).
SORTS = {
    "size": (lambda c: -c.size_bytes, lambda r: -r.size_bytes),
    "reclaimable": (lambda c: -c.reclaimable_bytes, lambda r: -r.reclaimable_bytes),
    "step": (lambda c: (c.step is None, c.step or 0), None),
    "age": (lambda c: c.dir.newest_mtime_ns,
            lambda r: min((c.dir.newest_mtime_ns for c in r.checkpoints), default=0)),
}


EXAMPLES = """Examples:

\b
  ckpt-tools audit results/
  ckpt-tools audit --strict results/    # exit 1 on legacy or redundant too
  ckpt-tools audit -q --min-age 0 results/ /shared/results
  ckpt-tools audit --json results/ > audit.json
  ckpt-tools audit --storage-option endpoint_url=http://127.0.0.1:9000 s3://bucket/results/
"""


@click.command(epilog=EXAMPLES)
@click.argument("roots", nargs=-1, required=True, type=PathArgument())
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is in progress.")
@click.option("--strict", is_flag=True, help="Also exit 1 when any checkpoint is legacy or redundant.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes validating in parallel; 0: one per CPU (at most 8). "
                   "For URLs, threads overlapping the requests; 0: 16.")
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              type=click.Choice(list(STATUS_NAMES), case_sensitive=False),
              help="Show only checkpoints of this status: healthy, redundant, legacy, broken or "
                   "in-progress (repeatable).")
@click.option("--run", "run_globs", multiple=True, metavar="GLOB",
              help="Show only runs whose path matches GLOB (fnmatch; repeatable).")
@click.option("--sort", type=click.Choice(list(SORTS)), default=None,
              help="Order checkpoints, and runs, by size or reclaimable (largest first), "
                   "step, or age (oldest first).")
@walk_options
@storage_options
@output_options
@click.pass_context
def audit(ctx, roots, min_age, strict, jobs, statuses, run_globs, sort, walk, storage_options,
          **opts):
    """Find every checkpoint under ROOTS, classify it, and show what prune could reclaim.

    ROOTS are directories, or URLs of object storage (s3://bucket/runs, gs://...)."""
    from ..records import BROKEN, LEGACY, REDUNDANT
    from ..report import render_audit
    from ..storage import open_storage
    out = command_output(ctx, **opts)
    roots, storage = open_storage(roots, storage_options)
    result = scan_roots(out, roots, min_age_s=min_age, jobs=jobs, walk=walk, storage=storage)
    result = narrowed(result, {STATUS_NAMES[s.lower()] for s in statuses}, run_globs, sort)
    if out.json:
        doc = result.to_dict()
        out.document(doc if storage is None else with_storage_counts(doc, storage))
    else:
        lines = render_audit(result, verbose=out.verbose, quiet=out.quiet, color=out.color)
        if storage is not None and out.verbose:
            lines = [*lines, storage_line(storage)]
        out.report(lines)
    counts = result.by_status()
    code = ExitCode.OK
    if counts[BROKEN] or any(p.is_error for p in result.problems):
        code = ExitCode.PROBLEMS
    if strict and (counts[LEGACY] or counts[REDUNDANT]):
        code = ExitCode.PROBLEMS
    ctx.exit(ctx.find_root().obj.finish(code))


def narrowed(result, statuses: set[Status], run_globs: tuple[str, ...], sort: str | None):
    """What audit shows of ``result``: the runs that ``run_globs`` match (all without any),
    their checkpoints of ``statuses`` (all without any; a run left without one is not shown),
    in the order ``sort`` says. The totals and the exit code are then of what is shown; the
    scan's problems tied to no checkpoint stay, whatever the filters (they may hide a
    checkpoint that was asked for)."""
    runs = [r for r in result.runs if not run_globs or _run_matches(r, run_globs)]
    if statuses:
        runs = [dataclasses.replace(r, checkpoints=tuple(c for c in r.checkpoints
                                                         if c.status in statuses))
                for r in runs]
        runs = [r for r in runs if r.checkpoints]
    if sort is not None:
        by_checkpoint, by_run = SORTS[sort]
        runs = [dataclasses.replace(r, checkpoints=tuple(sorted(r.checkpoints, key=by_checkpoint)))
                for r in runs]
        if by_run is not None:
            runs.sort(key=by_run)
    every = sum(len(r.checkpoints) for r in result.runs)
    shown = sum(len(r.checkpoints) for r in runs)
    # the scan's total counts a file hard-linked into several checkpoints once; of a part of
    # the scan, the checkpoints' own sizes are summed
    total = result.total_size_bytes if (shown, len(runs)) == (every, len(result.runs)) else None
    return dataclasses.replace(result, runs=tuple(runs), total_size_bytes=total)


def _run_matches(run, globs: tuple[str, ...]) -> bool:
    """Whether a glob matches the run's path under its root (``.`` for the root itself, as
    audit's tables name it) or the path with its root in front."""
    paths = (run.path, os.path.normpath(os.path.join(run.root, run.path)))
    return any(fnmatch.fnmatchcase(p, g) for p in paths for g in globs)
