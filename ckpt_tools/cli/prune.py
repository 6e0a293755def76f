"""``ckpt-tools prune``: delete the merged weights of redundant checkpoints.

A thin layer: lock → scan → ``plan_prune`` → show → confirm → ``execute_prune`` → report.
Every decision lives in the ``prune`` package; this module asks and renders.
"""

from __future__ import annotations

import os
import sys

import click

from ..api import default_jobs
from ..locking import LockHeld, root_lock
from ..prune.execute import Revalidator, emit_plan, execute_prune
from ..prune.log import ActionLog
from ..prune.plan import plan_prune
from ..prune.result import DELETE, PruneEvent, PruneResult
from ..records import REDUNDANT
from ..report import prune_where, render_prune_outcome, render_prune_plan, size_str
from .exits import ExitCode
from .options import Duration, PathArgument, command_output, output_options
from .output import Output
from .scanning import scan_roots


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _check_roots(roots: tuple[str, ...]) -> None:
    """Each root an existing directory, no root inside another (a file would be counted twice)."""
    from ..scanner import ScanError
    real: list[tuple[str, str]] = []
    for r in roots:
        if not os.path.lexists(r):
            raise ScanError(f"{r}: no such file or directory")
        if not os.path.isdir(r):
            raise ScanError(f"{r}: not a directory")
        real.append((r, os.path.realpath(r)))
    for a, ra in real:
        for b, rb in real:
            if a != b and ra != rb and (rb + os.sep).startswith(ra.rstrip(os.sep) + os.sep):
                raise click.UsageError(f"root {b} lies inside root {a}: give only {a}")


@click.command()
@click.argument("roots", nargs=-1, required=True, type=PathArgument())
@click.option("--dry-run", "-n", is_flag=True,
              help="Show exactly what would be deleted and freed; change nothing.")
@click.option("--yes", "-y", is_flag=True,
              help="Delete without asking (required when stdin is not a terminal, e.g. cron).")
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="Leave alone any checkpoint whose newest file is younger.")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), default=None,
              help="Lock file to use instead of ROOT/.ckpt-tools.lock in each root.")
@click.option("--lock-timeout", type=Duration(), default=0, show_default=True,
              metavar="SECONDS", help="How long to wait for a lock held by another run.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per action (plan, delete, skip, fail) to FILE.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes validating checkpoints in parallel, to plan and again "
                   "before their unlinks; 0: one per CPU (at most 8).")
@output_options
@click.pass_context
def prune(ctx, roots, dry_run, yes, min_age, lock_path, lock_timeout, log_file, jobs, **opts):
    """Delete the merged weights of redundant checkpoints under ROOTS.

    Only checkpoints whose PEFT tree is complete and valid lose their merged weights
    (model*.safetensors, pytorch_model*.bin, index files, dylo_moe_weights.pt).
    Each checkpoint is validated again, and each file checked unchanged, right
    before its deletion. Exit 0: all planned work done (or nothing to do);
    1: something failed or changed since the plan; 2: refused; 75: lock held.
    """
    out = command_output(ctx, **opts)
    fs = ctx.find_root().obj.fs   # the file-operations seam (None: the local file system)
    _check_roots(roots)
    log = ActionLog(log_file, dry_run=dry_run) if log_file else None
    # A run that will only plan (a dry run, or one that must refuse for want of --yes)
    # takes the lock shared and creates nothing.
    will_refuse = not dry_run and not yes and not _stdin_is_terminal()
    try:
        try:
            with root_lock(roots, lock_timeout, lock_path=lock_path,
                           exclusive=not (dry_run or will_refuse)):
                code = _prune(out, roots, dry_run, yes, min_age, jobs, log, fs)
        except LockHeld as exc:
            if log is not None:   # the log says why this run did nothing
                for r in roots:
                    log.record(PruneEvent("skip", r, ".", 0, str(exc)))
            raise
    finally:
        if log is not None:
            log.close()
    ctx.exit(code)


def _prune(out: Output, roots, dry_run, yes, min_age, jobs, log, fs) -> int:
    multi_root = len(roots) > 1
    scan = scan_roots(out, roots, min_age_s=min_age, jobs=jobs)
    if out.json or out.quiet:
        # the plan lists these on stdout, which --json and cron's -q do not show:
        # a directory that could not be read must still reach someone
        for p in scan.problems:
            if p.is_error:
                out.say(f"ckpt-tools: {p.line()}")
    plan = plan_prune(scan.checkpoints, jobs=jobs or default_jobs())
    emit_plan(plan, log=log)
    for s in plan.skipped:
        if s.status == REDUNDANT and not s.fresh:   # not proven by content: say so
            out.say(f"skipped: {prune_where(s.root, s.path, multi_root)}: {s.reason}")
    promised = PruneResult.from_plan(plan)
    shown_plan = render_prune_plan(plan, scan, multi_root=multi_root, verbose=out.verbose,
                                   quiet=out.quiet)
    if dry_run:
        if out.json:
            out.document(promised.to_dict(dry_run=True, with_root=multi_root))
        else:
            out.report(shown_plan + ([""] if shown_plan else [])
                       + [render_prune_outcome(promised, dry_run=True)])
        return ExitCode.OK
    if not plan.deletions:
        if out.json:
            out.document(promised.to_dict(with_root=multi_root))
        else:
            n = len(scan.checkpoints)
            out.report(shown_plan + ([""] if shown_plan else [])
                       + [f"Nothing to delete: no redundant checkpoint holds merged weights "
                          f"({n} checkpoint{'s' if n != 1 else ''} checked)."])
        return ExitCode.OK
    if not yes:
        if not _stdin_is_terminal():
            out.say("ckpt-tools: refusing to delete without confirmation: stdin is not a "
                    "terminal; pass --yes to prune unattended (e.g. from cron)")
            return ExitCode.USAGE
        out.report(shown_plan, err=out.json)
        n = len(plan.deletions)
        if not out.ask(f"Delete {n} file{'s' if n != 1 else ''} and free "
                       f"{size_str(plan.freed_bytes)}?"):
            out.say("Nothing deleted.")
            return ExitCode.USAGE
    else:
        out.report(shown_plan + [""])
    result = _execute(out, plan, min_age, jobs, log, multi_root, fs)
    if result.log_error:
        _report_log_failure(out, result)
    if out.json:
        out.document(result.to_dict(with_root=multi_root))
    else:
        out.report([render_prune_outcome(result, dry_run=False)])
    return ExitCode.OK if result.ok else ExitCode.PROBLEMS


def _execute(out: Output, plan, min_age, jobs, log, multi_root, fs) -> PruneResult:
    """``execute_prune`` with a bar, a stderr line per skip or failure, and -v's deletions."""
    bar = out.bar(len(plan.deletions), "deleting")

    def on_event(e: PruneEvent) -> None:
        if e.action in ("delete", "skip", "fail") and bar is not None:
            bar.update(1)
        if e.action in ("skip", "fail"):
            out.say(f"{'skipped' if e.action == 'skip' else 'FAILED'}: "
                    f"{prune_where(e.root, e.path, multi_root)}: {e.reason}")
        elif e.action == "delete" and out.verbose:
            out.report([f"deleted {prune_where(e.root, e.path, multi_root)} ({size_str(e.bytes)})"])

    try:
        return execute_prune(plan, revalidate=Revalidator(min_age_s=min_age), log=log,
                             on_event=on_event, jobs=jobs or default_jobs(), fs=fs)
    finally:
        if bar is not None:
            bar.close()


def _report_log_failure(out: Output, result: PruneResult) -> None:
    """The log's error, then what it lacks: each deletion it missed, the count not started."""
    out.error(str(result.log_error))
    for d in result.unlogged:
        out.say(f"deleted, not in the log: {PruneEvent(DELETE, d.root, d.path).abspath} "
                f"({size_str(d.bytes)})")
    if result.stopped:
        n = len(result.stopped)
        out.say(f"stopped: {n} planned file{'s' if n != 1 else ''} not deleted")
