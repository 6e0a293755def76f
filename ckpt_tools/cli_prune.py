"""``ckpt-tools prune``: delete the merged weights of redundant checkpoints.

A thin layer: lock → scan → ``plan_prune`` → show → confirm → ``execute_prune`` → report.
Every decision lives in ``pruner`` and ``prune_exec``; this module renders and asks.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import click

from .api import default_jobs
from .locking import LockError, LockHeld, root_lock
from .names import shown, shown_lines
from .prune_exec import (DELETE, ActionLog, LogOpenError, LogWriteError, PruneEvent, PruneResult, Revalidator,
                         emit_plan, execute_prune)
from .pruner import PrunePlan, plan_prune, skip_reason
from .records import REDUNDANT, ScanResult
from .report import size_str


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _check_roots(roots: tuple[str, ...]) -> None:
    """Each root an existing directory, no root inside another (a file would be counted twice)."""
    from .scanner import ScanError
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


# --- rendering -----------------------------------------------------------------------

def _where(root: str, path: str, multi_root: bool) -> str:
    """A checkpoint or file as the user reads it: control characters made visible."""
    if not multi_root:
        return shown(path)
    return shown(root if path == "." else os.path.join(root, path))


def _links(n: int) -> str:
    return f"held by {n} other link{'s' if n != 1 else ''}"


def render_plan(plan: PrunePlan, scan: ScanResult, *, multi_root: bool, verbose: bool = False,
                quiet: bool = False) -> str:
    """The plan for people: each file with the bytes it frees, a total, then what is left alone."""
    lines: list[str] = []
    n_ckpt = len({(d.root, d.checkpoint) for d in plan.deletions})
    if plan.deletions and not quiet:
        lines.append(f"Plan: delete {len(plan.deletions)} merged-weight file"
                     f"{'s' if len(plan.deletions) != 1 else ''} from {n_ckpt} redundant checkpoint"
                     f"{'s' if n_ckpt != 1 else ''}:")
        rows = [(_where(d.root, d.path, multi_root), size_str(d.frees_bytes),
                 _links(d.other_links) if d.other_links else "") for d in plan.deletions]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        for path, size, note in rows:
            lines.append(f"  {path.ljust(w0)}  {size.rjust(w1)}  {note}".rstrip())
    if plan.deletions:
        total = f"Total: {size_str(plan.freed_bytes)} to free"
        if plan.held_bytes:
            total += f" ({size_str(plan.held_bytes)} stays allocated: held by hard links outside the plan)"
        lines.append(total)
    if not quiet:
        # redundant checkpoints whose merged weights the plan could not prove redundant
        unproven = {(s.root, s.path): s.reason for s in plan.skipped if s.status == REDUNDANT}
        left = [(c, unproven.get((c.dir.root, c.path)) or skip_reason(c)) for c in scan.checkpoints
                if c.status != REDUNDANT or (c.dir.root, c.path) in unproven]
        if left:
            lines.append("")
            lines.append(f"Left alone: {len(left)} checkpoint{'s' if len(left) != 1 else ''}")
            if verbose:
                for c, reason in left:
                    lines.append(f"  {_where(c.dir.root, c.path, multi_root)}: {reason}")
            else:
                # the count per kind of reason; the details of those holding merged weights below
                kinds = Counter(reason.split(" (")[0].split(":")[0] if c.status == REDUNDANT
                                else reason.split(" (")[0] for c, reason in left)
                for reason, n in sorted(kinds.items()):
                    lines.append(f"  {n:>4}  {reason}")
                if plan.skipped:
                    lines.append("  of which hold merged weights:")
                    for s in plan.skipped:
                        lines.append(f"    {_where(s.root, s.path, multi_root)}: {s.reason}")
        for p in scan.problems:
            lines.append(p.line())
    return shown_lines(lines)


def render_outcome(result: PruneResult, *, dry_run: bool) -> str:
    if dry_run:
        return f"Dry run: nothing deleted. A real run would free {size_str(result.freed_bytes)}."
    n = len(result.deleted)
    text = f"Deleted {n} file{'s' if n != 1 else ''}, freed {size_str(result.freed_bytes)}"
    if result.held_bytes:
        text += f" ({size_str(result.held_bytes)} still held by other hard links)"
    text += "."
    if result.changed:
        text += f" Skipped {len(result.changed)} that changed since the plan."
    if result.failed:
        text += f" {len(result.failed)} failed."
    if result.stopped:
        n = len(result.stopped)
        text += f" Stopped: {n} planned file{'s' if n != 1 else ''} left, the log cannot be written."
    return text


# --- the command -----------------------------------------------------------------------

def register(cli: click.Group) -> None:
    """Add ``prune`` to the ``ckpt-tools`` group (called by ``cli._register_optional_commands``)."""
    from .cli import (EXIT_LOCKED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Duration, PathArgument,
                      _merge, _scan, output_options)

    @cli.command()
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
        out = _merge(ctx, **opts)
        multi_root = len(roots) > 1
        _check_roots(roots)
        log = None
        if log_file:
            try:
                log = ActionLog(log_file, dry_run=dry_run)
            except LogOpenError as exc:
                click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
                ctx.exit(EXIT_USAGE)
        # A run that will only plan (a dry run, or one that must refuse for want of --yes)
        # takes the lock shared and creates nothing.
        will_refuse = not dry_run and not yes and not _stdin_is_terminal()
        try:
            try:
                with root_lock(roots, lock_timeout, lock_path=lock_path,
                               exclusive=not (dry_run or will_refuse)):
                    code = _run(ctx, out, roots, dry_run, yes, min_age, jobs, log, multi_root)
            except LockHeld as exc:
                click.echo(shown(f"ckpt-tools: {exc}; nothing done. Try again later or raise "
                                 "--lock-timeout."), err=True)
                code = EXIT_LOCKED
                if log is not None:
                    for r in roots:
                        log.record(PruneEvent("skip", r, ".", 0, str(exc)))
            except LockError as exc:
                click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
                code = EXIT_USAGE
        except LogWriteError as exc:   # before any deletion: the plan's lines, or the lock's skip
            click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
            code = EXIT_PROBLEMS
        finally:
            if log is not None:
                log.close()
        ctx.exit(code)

    def _run(ctx, out, roots, dry_run, yes, min_age, jobs, log, multi_root) -> int:
        scan = _scan(out, roots, min_age_s=min_age, jobs=jobs)
        if out.json or out.quiet:
            # render_plan lists these on stdout, which --json and cron's -q do not show:
            # a directory that could not be read must still reach someone
            for p in scan.problems:
                if p.is_error:
                    click.echo(shown(f"ckpt-tools: {p.line()}"), err=True)
        plan = plan_prune(scan.checkpoints, jobs=jobs or default_jobs())
        emit_plan(plan, log=log)
        for s in plan.skipped:
            if s.status == REDUNDANT:   # structurally redundant, not proven by content: say so
                click.echo(f"skipped: {_where(s.root, s.path, multi_root)}: {s.reason}", err=True)
        promised = PruneResult.from_plan(plan)
        show = render_plan(plan, scan, multi_root=multi_root, verbose=out.verbose, quiet=out.quiet)

        if dry_run:
            if out.json:
                out.document(promised.to_dict(dry_run=True, with_root=multi_root))
            else:
                click.echo(show + ("\n\n" if show else "") + render_outcome(promised, dry_run=True))
            return EXIT_OK
        if not plan.deletions:
            if out.json:
                out.document(promised.to_dict(with_root=multi_root))
            else:
                if show:
                    click.echo(show + "\n")
                n = len(scan.checkpoints)
                click.echo(f"Nothing to delete: no redundant checkpoint holds merged weights "
                           f"({n} checkpoint{'s' if n != 1 else ''} checked).")
            return EXIT_OK
        if not yes:
            if not _stdin_is_terminal():
                click.echo("ckpt-tools: refusing to delete without confirmation: stdin is not a "
                           "terminal; pass --yes to prune unattended (e.g. from cron)", err=True)
                return EXIT_USAGE
            click.echo(show, err=out.json)
            n = len(plan.deletions)
            if not click.confirm(f"Delete {n} file{'s' if n != 1 else ''} and free "
                                 f"{size_str(plan.freed_bytes)}?", default=False, err=True):
                click.echo("Nothing deleted.", err=True)
                return EXIT_USAGE
        elif not out.json:
            click.echo(show + "\n")

        bar = out.bar(len(plan.deletions), "deleting")

        def on_event(e: PruneEvent) -> None:
            if e.action in ("delete", "skip", "fail") and bar is not None:
                bar.update(1)
            if e.action in ("skip", "fail"):
                click.echo(f"{'skipped' if e.action == 'skip' else 'FAILED'}: "
                           f"{_where(e.root, e.path, multi_root)}: {shown(e.reason)}", err=True)
            elif e.action == "delete" and out.verbose and not out.json:
                click.echo(f"deleted {_where(e.root, e.path, multi_root)} ({size_str(e.bytes)})")

        try:
            result = execute_prune(plan, revalidate=Revalidator(min_age_s=min_age), log=log,
                                   on_event=on_event, jobs=jobs or default_jobs(), fs=out.fs)
        finally:
            if bar is not None:
                bar.close()
        if result.log_error:
            _report_log_failure(result, multi_root)
        if out.json:
            out.document(result.to_dict(with_root=multi_root))
        else:
            click.echo(render_outcome(result, dry_run=False))
        return EXIT_OK if result.ok else EXIT_PROBLEMS

    def _report_log_failure(result: PruneResult, multi_root: bool) -> None:
        """The log's error, then what it lacks: each deletion it missed, the count not started."""
        click.echo(shown(f"ckpt-tools: error: {result.log_error}"), err=True)
        for d in result.unlogged:
            click.echo(shown(f"deleted, not in the log: {PruneEvent(DELETE, d.root, d.path).abspath} "
                             f"({size_str(d.bytes)})"), err=True)
        if result.stopped:
            n = len(result.stopped)
            click.echo(f"stopped: {n} planned file{'s' if n != 1 else ''} not deleted", err=True)
