"""``ckpt-tools validate``: the full validation of the named checkpoints, problem by problem."""

from __future__ import annotations

import click

from .exits import ExitCode
from .options import Duration, PathArgument, command_output, output_options, walk_options
from .scanning import scan_roots


EXAMPLES = """Examples:

\b
  ckpt-tools validate results/broken/truncated/checkpoint-100
  ckpt-tools validate results/run_trainer   # every checkpoint under it
  ckpt-tools validate --deep results/run_trainer/checkpoint-4   # reads every tensor
  ckpt-tools validate --json results/run_trainer/checkpoint-4
"""


@click.command(epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=PathArgument())
@click.option("--deep", is_flag=True, help="Read every tensor: NaN/Inf and a content hash per file.")
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is reported in progress.")
@walk_options
@output_options
@click.pass_context
def validate(ctx, checkpoints, deep, min_age, walk, **opts):
    """Validate the named checkpoints (or every checkpoint under a named directory)."""
    from ..report import render_validate, validate_doc
    from ..validator import DEEP, FULL
    out = command_output(ctx, **opts)
    result = scan_roots(out, checkpoints, level=DEEP if deep else FULL, min_age_s=min_age,
                        walk=walk)
    if not result.checkpoints:
        raise click.ClickException(f"no checkpoint found under {', '.join(checkpoints)}")
    if out.json:
        out.document(validate_doc(result))
    else:
        lines = render_validate(result, verbose=out.verbose, quiet=out.quiet)
        if lines:
            out.report(lines)
    bad = any(c.errors for c in result.checkpoints) or any(p.is_error for p in result.problems)
    ctx.exit(ExitCode.PROBLEMS if bad else ExitCode.OK)
