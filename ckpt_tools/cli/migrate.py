"""``ckpt-tools migrate SRC DST``: convert checkpoints to the canonical layout.

A thin layer: plan (``migrate.plan_migrate``) → show → execute (``migrate.execute_migrate``)
→ report. Every decision lives in ``ckpt_tools.migrate``.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import click

from ..report import migrate_where, render_migrate_plan, render_migrate_result
from .exits import ExitCode, in_flags
from .options import Duration, PathArgument, command_output, finite, output_options, walk_options

if TYPE_CHECKING:  # the migrate package is imported when migrate runs, not at start-up
    from ..migrate import MigrateEvent


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """transformers/peft progress bars and advice are noise on migrate's output (-v keeps them)."""
    if verbose:
        yield
        return
    import logging
    import warnings
    saved = {}
    try:
        from transformers.utils import logging as hf_logging
        saved["verbosity"] = hf_logging.get_verbosity()
        saved["bars"] = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    peft_logger = logging.getLogger("peft")
    level = peft_logger.level
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        peft_logger.setLevel(level)
        if saved:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity(saved["verbosity"])
            if saved["bars"]:
                hf_logging.enable_progress_bar()


EXAMPLES = """Examples:

\b
  ckpt-tools migrate --dry-run results/ results-peft/
  ckpt-tools migrate --link results/ results-peft/   # hard-link canonical ones
  ckpt-tools migrate --base-model /models/codegemma-2b --rank 16 results/ results-peft/
  ckpt-tools migrate --base-model /models/codegemma-2b --energy 0.99 --verify \\
      results/ results-peft/
"""


@click.command(epilog=EXAMPLES)
@click.argument("src", type=PathArgument())
@click.argument("dst", type=PathArgument())
@click.option("--dry-run", is_flag=True, help="Show what would be done; write nothing.")
@click.option("--link", is_flag=True,
              help="Hard-link files carried byte for byte (canonical checkpoints, trainer "
                   "state) instead of copying them.")
@click.option("--base-model", metavar="PATH_OR_ID",
              help="Base model: a local model directory or a hub id in the local Hugging "
                   "Face cache (truly merged checkpoints; --verify). Plain model directories "
                   "are then tried as LoRAs merged into it.")
@click.option("--rank", type=click.IntRange(1), help="LoRA rank of a low-rank extraction.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True),
              help="Smallest rank keeping this share of each delta's squared singular values.")
@click.option("--max-error", type=click.FloatRange(0, min_open=True), default=None,
              callback=finite, metavar="E",
              help="Largest relative error of any module of a low-rank extraction; a "
                   "DyLoRA-MoE export above it fails, naming the rank that would meet it, and "
                   "a plain model above it is skipped as a full fine-tune [default: 0.01].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the low-rank extraction runs.")
@click.option("--lora-alpha", type=float,
              help="lora_alpha when no config of the checkpoint or its run records it "
                   "(default then: 2·r, with a warning).")
@click.option("--verify", is_flag=True,
              help="Load every written expert with peft and compare logits with the source.")
@click.option("--verify-tol", type=click.FloatRange(0), default=None,
              help="Largest relative logit difference accepted "
                   "[default: 1e-4 exact/copy, 1e-2 svd].")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Checkpoints migrated in parallel.")
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is in progress: skipped.")
@click.option("--lock", "lock_path", type=click.Path(),
              help="Lock file to hold instead of DST/.ckpt-tools.lock.")
@click.option("--lock-timeout", type=Duration(), default=0.0, show_default=True,
              metavar="SECONDS", help="Seconds to wait for another run's lock.")
@walk_options
@output_options
@click.pass_context
def migrate(ctx, src, dst, dry_run, link, base_model, rank, energy, max_error, device,
            lora_alpha, verify, verify_tol, jobs, min_age, lock_path, lock_timeout, walk,
            **opts):
    """Convert every non-canonical checkpoint under SRC into the canonical layout under DST.

    Relative paths are mirrored; canonical checkpoints are copied (or hard-linked with
    --link); broken and in-progress ones are skipped. Each target is written under a
    temporary name, verified, then renamed into place: a re-run after a crash finishes
    the job. Exit 0 when all was done, 1 when any checkpoint failed, 2 on a usage
    error, 75 when the lock is held.
    """
    from ..storage import refuse_urls
    refuse_urls((src, dst), "migrate")
    # no network, ever: hub ids resolve from the local cache only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ..migrate import ACTION_SKIP, MigrateOptions, execute_migrate, plan_migrate
    out = command_output(ctx, **opts)
    fs = ctx.find_root().obj.fs   # the file-operations seam (None: the local file system)
    bound = {} if max_error is None else {"max_error": max_error}
    options = MigrateOptions(link=link, base_model=base_model, rank=rank, energy=energy,
                             device=device, lora_alpha=lora_alpha, verify=verify,
                             verify_tol=verify_tol, min_age_s=min_age, **bound)
    plan = plan_migrate(src, dst, options, jobs=jobs, walk=walk)
    if dry_run:
        if out.json:
            out.document(plan.to_dict())
        else:
            out.report(render_migrate_plan(plan, verbose=out.verbose, quiet=out.quiet)
                       + ["Dry run: nothing written."])
        ctx.exit(ExitCode.OK)
    if not out.quiet:
        out.report(render_migrate_plan(plan, verbose=out.verbose, quiet=True))
    bar = out.bar(sum(1 for i in plan.items if i.action != ACTION_SKIP), "migrating",
                  "checkpoint")

    def on_event(e: MigrateEvent) -> None:
        if e.kind == "done":
            if bar is not None:
                bar.update(1)
            elif out.verbose and e.outcome is not None and not out.json:
                out.note(f"{e.outcome.outcome}: {e.item.source}")

    try:
        with quiet_libraries(out.verbose):
            result = execute_migrate(plan, jobs=jobs, on_event=on_event,
                                     lock_timeout=lock_timeout, lock_path=lock_path, fs=fs)
    finally:
        if bar is not None:
            bar.close()
    result = result.reworded(in_flags)
    if out.json:
        out.document({"dry_run": False} | result.to_dict())
    else:
        out.report(render_migrate_result(result, plan, verbose=out.verbose, quiet=out.quiet))
    # a directory of SRC that could not be listed: whatever it holds was not migrated
    unread = [p for p in plan.problems if p.is_error]
    for p in unread:
        out.error(f"{migrate_where(plan.src, p.path)}: {p.code}: {p.message}; "
                  "nothing under it was migrated")
    ctx.exit(ExitCode.PROBLEMS if result.failed or unread else ExitCode.OK)
