"""``ckpt-tools validate``: the full validation of the named checkpoints, problem by problem."""

from __future__ import annotations

import click

from .exits import ExitCode
from .options import (Duration, PathArgument, command_output, output_options, storage_options,
                      walk_options)
from .scanning import scan_roots, storage_line, with_storage_counts


EXAMPLES = """Examples:

\b
  ckpt-tools validate results/broken/truncated/checkpoint-100
  ckpt-tools validate results/run_trainer   # every checkpoint under it
  ckpt-tools validate --deep results/run_trainer/checkpoint-4   # reads every tensor
  ckpt-tools validate --json results/run_trainer/checkpoint-4
  ckpt-tools validate --storage-option endpoint_url=http://127.0.0.1:9000 s3://bucket/results/run/checkpoint-4
"""


@click.command(epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=PathArgument())
@click.option("--deep", is_flag=True, help="Read every tensor: NaN/Inf and a content hash per file.")
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is reported in progress.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=1, show_default=True,
              help="For URLs: threads overlapping the requests (0: 16).")
@walk_options
@storage_options
@output_options
@click.pass_context
def validate(ctx, checkpoints, deep, min_age, jobs, walk, storage_options, **opts):
    """Validate the named checkpoints (or every checkpoint under a named directory).

    Each may be a URL of object storage (s3://bucket/runs/checkpoint-4, gs://...)."""
    from ..errors import UsageError
    from ..report import render_validate, validate_doc
    from ..storage import open_storage
    from ..validator import DEEP, FULL
    out = command_output(ctx, **opts)
    checkpoints, storage = open_storage(checkpoints, storage_options)
    if deep and storage is not None:
        raise UsageError(f"{checkpoints[0]}: validate --deep on object storage is not supported "
                         "yet (it reads every tensor)")
    result = scan_roots(out, checkpoints, level=DEEP if deep else FULL, min_age_s=min_age,
                        walk=walk, storage=storage, jobs=jobs if storage is not None else 1)
    if not result.checkpoints:
        raise click.ClickException(f"no checkpoint found under {', '.join(checkpoints)}")
    if out.json:
        doc = validate_doc(result)
        out.document(doc if storage is None else with_storage_counts(doc, storage))
    else:
        lines = render_validate(result, verbose=out.verbose, quiet=out.quiet)
        if storage is not None and out.verbose:
            lines = [*lines, storage_line(storage)]
        if lines:
            out.report(lines)
    bad = any(c.errors for c in result.checkpoints) or any(p.is_error for p in result.problems)
    ctx.exit(ExitCode.PROBLEMS if bad else ExitCode.OK)
