"""``ckpt-tools prune``: delete the merged weights of redundant checkpoints, and apply a
retention policy (``--keep-* --strip|--delete``, ``--policy FILE``).

A thin layer: lock → scan → ``plan_prune`` (+ ``retention.plan_retention``) → show → confirm →
``execute_prune`` (+ ``retention.execute_retention``) → report. Every decision lives in the
``prune`` and ``retention`` packages; this module asks and renders.
"""

from __future__ import annotations

import os
import sys
import time

import click

from ..api import default_jobs
from ..locking import LockHeld, root_lock
from ..prune.execute import Revalidator, emit_plan, execute_prune
from ..prune.log import ActionLog, LogWriteError, RunTotals
from ..prune.plan import plan_prune
from ..prune.result import DELETE, PruneEvent, PruneResult
from ..records import REDUNDANT
from ..report import (prune_where, render_prune_outcome, render_prune_plan, render_retention_outcome,
                      render_retention_plan, size_str)
from .exits import ExitCode, exit_code_of
from ..storage import is_url
from .options import (Duration, PathArgument, command_output, output_options, storage_options,
                      walk_options)
from .output import Output
from .scanning import scan_roots


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _storage_doc(bucket) -> dict:
    """A bucket run's requests and bytes (the scan's, the re-checks' and the deletes'), as
    audit's ``storage`` gives them; nothing for local roots."""
    return {} if bucket is None else {"storage": bucket.storage.counts.to_dict()}


def _check_roots(roots: tuple[str, ...], storage_options: dict) -> None:
    """Each root an existing directory, no root inside another (a file would be counted twice)."""
    from ..scanner import ScanError
    if storage_options:
        raise click.UsageError("--storage-option applies to URLs only (s3://...)")
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


EXAMPLES = """Examples:

\b
  ckpt-tools prune --dry-run results/   # what would be deleted and freed
  ckpt-tools prune --yes results/
  ckpt-tools prune --dry-run --keep-last 1 --keep-best 1 --delete results/
  ckpt-tools prune --keep-last 2 --strip --yes results/
  ckpt-tools prune --policy retention.toml --yes /shared/results
  # nightly, from cron (--yes: there is no terminal to ask):
  ckpt-tools prune --yes -q --lock-timeout 600 --log prune.jsonl /shared/results
  # a bucket (S3: conditional deletes; docs/object-storage.md):
  ckpt-tools prune --yes -q --log prune.jsonl s3://bucket/results/
"""


@click.command(epilog=EXAMPLES)
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
              help="Append one JSON line per action (plan, delete, fail, ...) to FILE, between "
                   "a start and an end record of the run; the end record counts the checkpoints "
                   "left alone by reason.")
@click.option("--log-skips", is_flag=True,
              help="--log: also a skip line per checkpoint left alone (legacy, broken, ...), "
                   "every run.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes validating checkpoints in parallel, to plan and again "
                   "before their unlinks; 0: one per CPU (at most 8).")
@click.option("--keep-last", type=click.IntRange(1), default=None, metavar="N",
              help="Retention: keep each run's N newest complete checkpoints.")
@click.option("--keep-best", type=click.IntRange(1), default=None, metavar="N",
              help="Retention: keep each run's N best checkpoints by --metric (trainer_state.json).")
@click.option("--metric", default="eval_loss", show_default=True,
              help="The eval metric --keep-best ranks by (lower is better).")
@click.option("--higher-is-better", is_flag=True, help="--metric: higher is better.")
@click.option("--keep-every", type=click.IntRange(1), default=None, metavar="STEPS",
              help="Retention: keep checkpoints whose step is a multiple of STEPS.")
@click.option("--keep-within", type=Duration(), default=None,
              help="Retention: keep checkpoints written within DURATION of the run's newest.")
@click.option("--keep-step", "keep_steps", type=click.IntRange(0), multiple=True, metavar="STEP",
              help="Retention: pin the checkpoint of this step (repeatable).")
@click.option("--strip", "action", flag_value="strip", default=None,
              help="Retention: strip what no rule keeps of its training state (optimizer, "
                   "scheduler, scaler, RNG); weights and configs stay.")
@click.option("--delete", "action", flag_value="delete",
              help="Retention: move what no rule keeps into its run's trash, purged after "
                   "--purge-after (in a bucket, which has no trash: deleted at once).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="Retention policy file (TOML, docs/retention.md) instead of the flags.")
@click.option("--purge-after", type=Duration(), default="7d", show_default=True,
              help="Purge trash entries older than this.")
@click.option("--purge-now", is_flag=True, help="Purge the trash whatever its age.")
@walk_options
@storage_options
@output_options
@click.pass_context
def prune(ctx, roots, dry_run, yes, min_age, lock_path, lock_timeout, log_file, log_skips, jobs,
          keep_last, keep_best, metric, higher_is_better, keep_every, keep_within, keep_steps,
          action, policy_file, purge_after, purge_now, walk, storage_options, **opts):
    """Delete the merged weights of redundant checkpoints under ROOTS.

    Only checkpoints whose PEFT tree is complete and valid lose their merged weights
    (model*.safetensors, pytorch_model*.bin, index files, dylo_moe_weights.pt).
    ROOTS may be s3:// URLs: every delete there is conditional on the ETag planned.
    Each checkpoint is validated again, and each file checked unchanged, right
    before its deletion. Exit 0: all planned work done (or nothing to do);
    1: something failed or changed since the plan; 2: refused; 75: lock held.
    """
    out = command_output(ctx, **opts)
    fs = ctx.find_root().obj.fs   # the file-operations seam (None: the local file system)
    if log_skips and not log_file:
        raise click.UsageError("--log-skips writes into the log: give --log FILE too")
    # opened first: every run that got this far leaves a start and an end record, a usage error too
    log = ActionLog(log_file, dry_run=dry_run, skip_lines=log_skips) if log_file else None
    started, totals, retention, bucket = time.monotonic(), RunTotals(), None, None
    try:
        def asked() -> _Retention:
            return _Retention(_policy(keep_last, keep_best, metric, higher_is_better, keep_every,
                                      keep_within, keep_steps, action, policy_file),
                              purge_after, purge_now, purge_asked=purge_now or (
                                  ctx.get_parameter_source("purge_after")
                                  is not click.core.ParameterSource.DEFAULT))

        if any(map(is_url, roots)):
            from .bucket import open_bucket_roots
            retention = asked()
            bucket = open_bucket_roots(roots, storage_options, lock_path=lock_path)
            roots = bucket.roots
        else:
            _check_roots(roots, storage_options)
            retention = asked()
        _log_start(log, roots, retention, policy_file)
        # A run that will only plan (a dry run, or one that must refuse for want of --yes)
        # takes the lock shared and creates nothing.
        will_refuse = not dry_run and not yes and not _stdin_is_terminal()
        try:
            with (root_lock(roots, lock_timeout, lock_path=lock_path,
                            exclusive=not (dry_run or will_refuse)) if bucket is None else
                  bucket.locked(lock_timeout, exclusive=not (dry_run or will_refuse))):
                code = _prune(out, roots, dry_run, yes, min_age, jobs, log, fs, retention, totals,
                              walk, bucket)
        except LockHeld as exc:
            if log is not None:   # the log says why this run did nothing
                for r in roots:
                    log.record(PruneEvent("skip", r, ".", 0, str(exc)))
                    totals.actions["skip"] += 1
            raise
    except BaseException as exc:
        _log_end(log, roots, retention, policy_file, exit_code_of(exc), started, totals, out)
        raise
    _log_end(log, roots, retention, policy_file, code, started, totals, out)
    ctx.exit(code)


def _log_start(log, roots, retention, policy_file) -> None:
    if log is not None:
        from .. import __version__
        log.start(version=__version__, argv=sys.argv, roots=roots,
                  policy=retention.policy if retention else None,
                  policy_file=policy_file if retention and retention.policy else None)


def _log_end(log, roots, retention, policy_file, code, started, totals, out) -> None:
    """The end record (after the start, if the run failed before it), then the log closed.
    A failing end line fails a run that went well (exit 1); one that already failed says why."""
    if log is None:
        return
    try:
        if not log.failed:   # a log that failed was reported then, and takes no end
            if not log.started:
                _log_start(log, roots, retention, policy_file)
            log.end(exit_code=code, duration_s=time.monotonic() - started, totals=totals)
    except LogWriteError as exc:
        if code == ExitCode.OK:
            raise
        out.error(str(exc))   # the run's own outcome stands
    finally:
        log.close()


class _Retention:
    """The retention asked for: a policy (None: none), the trash's grace period, --purge-now."""

    def __init__(self, policy, purge_after: float, purge_now: bool, purge_asked: bool = False):
        self.policy = policy
        self.purge_after = purge_after
        self.purge_now = purge_now
        self.purge_asked = purge_asked   # --purge-after or --purge-now given


def _policy(keep_last, keep_best, metric, higher_is_better, keep_every, keep_within, keep_steps,
            action, policy_file):
    """The policy of the flags or of --policy FILE (not both); None where none is asked for."""
    if policy_file is None and not (keep_last or keep_best or keep_every or keep_within is not None
                                    or keep_steps or action):
        return None   # imports nothing of retention: prune as before
    from ..retention.policy import load_policy
    from ..retention.rules import Policy, Rules
    if policy_file is not None:
        if keep_last or keep_best or keep_every or keep_within is not None or action:
            raise click.UsageError("--policy FILE and the --keep-*, --strip and --delete flags "
                                   "say the same thing two ways: give one")
        policy = load_policy(policy_file)
        if keep_steps:
            from ..retention.policy import merge_run_policy
            policy = merge_run_policy(policy, Policy.from_flags(
                Rules(keep_last=1, keep_steps=frozenset(keep_steps)), policy.rest))
        return policy
    rules = Rules(keep_last=keep_last or 0, keep_best=keep_best or 0, metric=metric,
                  higher_is_better=higher_is_better, keep_every=keep_every,
                  keep_within=keep_within, keep_steps=frozenset(keep_steps))
    return Policy.from_flags(rules, action)


def _prune(out: Output, roots, dry_run, yes, min_age, jobs, log, fs, retention: _Retention,
           totals: RunTotals, walk, bucket=None) -> int:
    multi_root = len(roots) > 1
    if bucket is not None and retention.purge_asked:
        from .bucket import NO_TRASH
        out.say(f"{roots[0]}: {NO_TRASH}")
    if bucket is not None:   # a killed run's intent first: the scan then sees what it left
        if dry_run or not yes:   # deleting a killed run's objects is not asked about
            for line in bucket.pending_note():
                out.say(line)
        else:
            bucket.finish_interrupted(out, log, multi_root)
    scan = scan_roots(out, roots, min_age_s=min_age, jobs=jobs, walk=walk,
                      storage=bucket.storage if bucket is not None else None)
    totals.scanned(scan.checkpoints)
    if out.json or out.quiet:
        # the plan lists these on stdout, which --json and cron's -q do not show:
        # a directory that could not be read must still reach someone
        for p in scan.problems:
            if p.is_error:
                out.say(f"ckpt-tools: {p.line()}")
    from ..retention.plan import plan_retention
    now = time.time()
    kept = plan_retention(scan, retention.policy, now=now, min_age_s=min_age,
                          purge_after_s=retention.purge_after, purge_now=retention.purge_now,
                          storage=bucket.storage if bucket is not None else None)
    in_bucket = None
    if bucket is not None:   # no trash there: a delete frees its bytes now (or, versioned, none)
        from .bucket import retention_in_bucket
        in_bucket = retention_in_bucket(kept, bucket)
        kept = in_bucket.plan
    for root, run, why in kept.refused_runs:
        out.say(f"skipped: {prune_where(root, run, multi_root)}: {why}")
    # a checkpoint the policy deletes whole loses its merged weights with it
    deleting = {(i.checkpoint.dir.root, i.checkpoint.path) for i in kept.acting
                if i.decision.action.value == "delete"}
    planned = [c for c in scan.checkpoints if (c.dir.root, c.path) not in deleting]
    if bucket is None:
        plan = plan_prune(planned, jobs=jobs or default_jobs())
    else:
        from .bucket import hidden_note, plan_in_bucket
        plan = plan_in_bucket(planned, bucket)
        for line in hidden_note(plan, bucket, in_bucket):
            out.say(line)
    totals.planned(plan, kept, skip_lines=log is not None and log.skip_lines)
    emit_plan(plan, log=log)
    for s in plan.skipped:
        if s.status == REDUNDANT and not s.fresh:   # not proven by content: say so
            out.say(f"skipped: {prune_where(s.root, s.path, multi_root)}: {s.reason}")
    promised = PruneResult.from_plan(plan)
    shown_plan = render_prune_plan(plan, scan, multi_root=multi_root, verbose=out.verbose,
                                   quiet=out.quiet)
    if not out.json or not (dry_run or yes):   # the text is shown (the prompt shows it on stderr)
        shown_plan += _gap(shown_plan) + render_retention_plan(kept, multi_root=multi_root,
                                                               verbose=out.verbose, quiet=out.quiet)
    if dry_run:
        if out.json:
            out.document(promised.to_dict(dry_run=True, with_root=multi_root)
                         | {"retention": kept.to_dict()} | _storage_doc(bucket))
        else:
            out.report(shown_plan + _gap(shown_plan)
                       + [render_prune_outcome(promised, dry_run=True)]
                       + ([f"A real run would also free {size_str(kept.freed_now)} by retention now"
                           + (f" and {size_str(kept.freed_when_purged)} when the trash is purged"
                              if kept.freed_when_purged else "") + "."] if kept.has_work else []))
        return ExitCode.OK
    if not plan.deletions and not kept.has_work:
        if out.json:
            out.document(promised.to_dict(with_root=multi_root) | {"retention": kept.to_dict()}
                         | _storage_doc(bucket))
        else:
            n = len(scan.checkpoints)
            out.report(shown_plan + _gap(shown_plan)
                       + [f"Nothing to delete: no redundant checkpoint holds merged weights "
                          f"({n} checkpoint{'s' if n != 1 else ''} checked)"
                          + ("; the retention policy keeps every checkpoint." if kept.policy else ".")])
        return ExitCode.OK
    if not yes:
        if not _stdin_is_terminal():
            out.say("ckpt-tools: refusing to delete without confirmation: stdin is not a "
                    "terminal; pass --yes to prune unattended (e.g. from cron)")
            return ExitCode.USAGE
        out.report(shown_plan, err=out.json)
        if not out.ask(_question(plan, kept, trash=bucket is None)):
            out.say("Nothing deleted.")   # the user's answer, not a failure
            return ExitCode.OK
    else:
        out.report(shown_plan + [""])
    result = _execute(out, plan, min_age, jobs, log, multi_root, fs, bucket)
    if result.log_error:
        _report_log_failure(out, result)
        done = None
    elif out.stdout_closed():   # stopped at a checkpoint boundary: retention is not started
        done = None
    else:
        done = _execute_retention(out, kept, min_age, log, multi_root, fs, bucket, in_bucket)
    if out.json:
        out.document(result.to_dict(with_root=multi_root)
                     | {"retention": kept.to_dict() | ({} if done is None else done.to_dict())}
                     | _storage_doc(bucket))
    else:
        out.report(([render_prune_outcome(result, dry_run=False)] if plan.deletions else [])
                   + ([render_retention_outcome(done, dry_run=False)]
                      if done is not None and kept.has_work else []))
    totals.done(result, done)
    ok = result.ok and (done is None or done.ok)
    if ok and out.stdout_lost:
        _report_stdout_closed(out, result, log, roots, totals,
                              retention_left=done is None and kept.has_work)
        return ExitCode.STDOUT_CLOSED
    return ExitCode.OK if ok else ExitCode.PROBLEMS


def _gap(lines: list[str]) -> list[str]:
    return [""] if lines and lines[-1] else []


def _question(plan, kept, trash: bool = True) -> str:
    parts = []
    if plan.deletions:
        n = len(plan.deletions)
        parts.append(f"delete {n} merged-weight file{'s' if n != 1 else ''}")
    counts = kept.counts()
    if counts["strip"]:
        parts.append(f"strip {counts['strip']} checkpoint{'s' if counts['strip'] != 1 else ''}")
    if counts["delete"]:
        parts.append(f"{'move' if trash else 'delete'} {counts['delete']} checkpoint"
                     f"{'s' if counts['delete'] != 1 else ''}{' to the trash' if trash else ''}")
    if any(p.due for p in kept.purges):
        parts.append("purge the trash due")
    total = plan.freed_bytes + kept.freed_now
    return (", ".join(parts)).capitalize() + f", freeing {size_str(total)} now?"


def _execute_retention(out: Output, kept, min_age, log, multi_root, fs, bucket=None,
                       in_bucket=None):
    """``execute_retention`` (in a bucket: ``in_bucket``, the plan made for it) with each
    action logged, and a stderr line per skip or failure."""
    from ..retention.execute import execute_retention

    def emit(e: PruneEvent) -> None:
        if log is not None and not log.failed:
            try:
                log.record(e)
            except Exception as exc:  # noqa: BLE001 - the log's failure is reported, the run goes on
                out.error(str(exc))
        if e.action in ("skip", "fail"):
            out.say(f"{'skipped' if e.action == 'skip' else 'FAILED'}: "
                    f"{prune_where(e.root, e.path, multi_root)}: {e.reason}")
        elif out.verbose:
            out.report([f"{e.action} {prune_where(e.root, e.path, multi_root)} ({size_str(e.bytes)})"])

    if bucket is not None:
        from .bucket import execute_retention as in_the_bucket
        return in_the_bucket(bucket, in_bucket, min_age, time.time(), emit)
    return execute_retention(kept, revalidate=Revalidator(min_age_s=min_age, prove=False),
                             now=time.time(), fs=fs, emit=emit)


def _execute(out: Output, plan, min_age, jobs, log, multi_root, fs, bucket=None) -> PruneResult:
    """``execute_prune`` with a bar, a stderr line per skip or failure, and -v's deletions."""
    bar = out.bar(len(plan.deletions), "deleting", "file")

    def on_event(e: PruneEvent) -> None:
        if e.action in ("delete", "skip", "fail") and bar is not None:
            bar.update(1)
        if e.action in ("skip", "fail"):
            out.say(f"{'skipped' if e.action == 'skip' else 'FAILED'}: "
                    f"{prune_where(e.root, e.path, multi_root)}: {e.reason}")
        elif e.action == "delete" and out.verbose:
            out.report([f"deleted {prune_where(e.root, e.path, multi_root)} ({size_str(e.bytes)})"])

    def stop() -> str | None:
        return _STDOUT_CLOSED if out.stdout_closed() else None

    try:
        if bucket is not None:
            from .bucket import execute
            return execute(bucket, plan, min_age, log, on_event, stop)
        return execute_prune(plan, revalidate=Revalidator(min_age_s=min_age), log=log,
                             on_event=on_event, jobs=jobs or default_jobs(), fs=fs, stop=stop)
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


_STDOUT_CLOSED = "stdout was closed (its reader went away)"


def _report_stdout_closed(out: Output, result: PruneResult, log, roots, totals: RunTotals,
                          retention_left: bool) -> None:
    """A closed stdout ended the run at a checkpoint boundary (or only cut its report short):
    one line on stderr and one in the log per root saying what was left undone."""
    n = len(result.stopped)
    if n or retention_left:
        undone = ([f"{n} planned file{'s' if n != 1 else ''} not deleted"] if n else []) \
            + (["retention not started"] if retention_left else [])
        why = (f"<stdout>: {_STDOUT_CLOSED}: stopped at a checkpoint boundary; "
               + ", ".join(undone) + "; run it again to finish")
    else:
        why = f"<stdout>: {_STDOUT_CLOSED}: all planned work done, its report cut short"
    out.error(why)
    if log is not None and not log.failed:
        for r in roots:
            try:
                log.record(PruneEvent("skip", r, ".", 0, why))
            except LogWriteError as exc:
                out.error(str(exc))
                break
            totals.actions["skip"] += 1
