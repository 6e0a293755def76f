"""``ckpt-tools audit``: scan → classify → render; exit 1 on what needs attention."""

from __future__ import annotations

import click

from .exits import ExitCode
from .options import Duration, PathArgument, command_output, output_options, walk_options
from .scanning import scan_roots


@click.command()
@click.argument("roots", nargs=-1, required=True, type=PathArgument())
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is in progress.")
@click.option("--strict", is_flag=True, help="Also exit 1 when any checkpoint is legacy or redundant.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes validating in parallel; 0: one per CPU (at most 8).")
@walk_options
@output_options
@click.pass_context
def audit(ctx, roots, min_age, strict, jobs, walk, **opts):
    """Find every checkpoint under ROOTS, classify it, and show what prune could reclaim."""
    from ..records import BROKEN, LEGACY, REDUNDANT
    from ..report import render_audit
    out = command_output(ctx, **opts)
    result = scan_roots(out, roots, min_age_s=min_age, jobs=jobs, walk=walk)
    if out.json:
        out.document(result.to_dict())
    else:
        out.report(render_audit(result, verbose=out.verbose, quiet=out.quiet))
    counts = result.by_status()
    code = ExitCode.OK
    if counts[BROKEN] or any(p.is_error for p in result.problems):
        code = ExitCode.PROBLEMS
    if strict and (counts[LEGACY] or counts[REDUNDANT]):
        code = ExitCode.PROBLEMS
    ctx.exit(ctx.find_root().obj.finish(code))
