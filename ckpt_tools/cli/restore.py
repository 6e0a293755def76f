"""``ckpt-tools restore``: bring checkpoints that ``prune --delete`` moved into a run's trash back.

A thin layer: check every PATH is a trash entry → lock → ``retention.trash.restore`` each →
report. A plain ``mv RUN/.ckpt-tools-trash/NAME.deleted-STAMP RUN/NAME`` does the same.
"""

from __future__ import annotations

import os

import click

from ..locking import root_lock
from ..retention.trash import RestoreFailed, restore as restore_entry, trash_entry_at
from .exits import ExitCode
from .options import Duration, PathArgument, command_output, output_options


EXAMPLES = """Examples:

\b
  ckpt-tools restore results/best/.ckpt-tools-trash/checkpoint-4.deleted-20261206T175217Z
  ckpt-tools restore results/best/.ckpt-tools-trash/*.deleted-*   # a run's whole trash
  # prune ran with --lock FILE: restore takes the same lock
  ckpt-tools restore --lock /var/lock/results.lock results/best/.ckpt-tools-trash/*
"""


@click.command(epilog=EXAMPLES)
@click.argument("paths", nargs=-1, required=True, type=PathArgument())
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), default=None,
              help="Lock file to use instead of one in each trash (give prune's --lock here too).")
@click.option("--lock-timeout", type=Duration(), default=0, show_default=True,
              metavar="SECONDS", help="How long to wait for a lock held by another run.")
@output_options
@click.pass_context
def restore(ctx, paths, lock_path, lock_timeout, **opts):
    """Move checkpoints that prune --delete put in a run's trash back to their names.

    Each PATH is an entry RUN/.ckpt-tools-trash/NAME.deleted-STAMP; it goes back to RUN/NAME
    in one rename, unless that name is taken. It waits for no prune of the same tree (the
    lock) and refuses an entry a purge began removing. Exit 0: all restored; 1: one could not
    be (its name is taken, or the rename failed); 2: a PATH is no trash entry (nothing done);
    75: lock held.
    """
    out = command_output(ctx, **opts)
    fs = ctx.find_root().obj.fs
    entries = [trash_entry_at(os.path.abspath(p)) for p in paths]   # all checked before any moves
    trashes = sorted({os.path.dirname(e.path) for e in entries})
    restored: list[dict] = []
    failed = 0
    with root_lock(trashes, lock_timeout, lock_path=lock_path):
        for e in entries:
            try:
                target = restore_entry(fs, e.path)
            except RestoreFailed as exc:
                out.error(str(exc))
                failed += 1
                continue
            restored.append({"from": e.path, "to": target})
            out.report([f"restored {target} (from {e.path})"])
    if out.json:
        out.document({"restored": restored, "failed": failed})
    ctx.exit(ExitCode.PROBLEMS if failed else ExitCode.OK)
