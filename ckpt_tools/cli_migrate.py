"""``ckpt-tools migrate SRC DST``: convert checkpoints to the canonical layout.

A thin layer: plan (``converter.plan_migrate``) → show → execute (``converter.execute_migrate``)
→ report. Every decision lives in the converter.
"""

from __future__ import annotations

import contextlib
import os

import click

from typing import TYPE_CHECKING

from .names import shown, shown_lines

if TYPE_CHECKING:  # the converter is imported when migrate runs, not when the CLI starts
    from .converter import MigrateEvent, MigratePlan, MigrateResult


def _where(root: str, rel: str) -> str:
    """A source or target as the user reads it: control characters made visible."""
    return shown(root if rel == "." else os.path.join(root, rel))


def render_plan(plan: MigratePlan, *, verbose: bool = False, quiet: bool = False) -> str:
    from .converter import ACTION_DONE, ACTION_MIGRATE, ACTION_SKIP
    todo = [i for i in plan.items if i.action == ACTION_MIGRATE]
    done = [i for i in plan.items if i.action == ACTION_DONE]
    skip = [i for i in plan.items if i.action == ACTION_SKIP]
    by_method: dict[str, int] = {}
    for i in todo:
        by_method[i.method] = by_method.get(i.method, 0) + 1
    methods = ", ".join(f"{n} {m}" for m, n in sorted(by_method.items()))
    lines = [f"Plan: migrate {len(todo)} checkpoint{'s' if len(todo) != 1 else ''}"
             + (f" ({methods})" if methods else "")
             + f" from {plan.src} to {plan.dst}; {len(done)} already migrated, {len(skip)} skipped."]
    if quiet:
        return shown_lines(lines)
    if todo:
        sources = [shown(i.source) for i in todo]   # escaped before the widths are measured
        w0 = max(map(len, sources))
        w1 = max(len(i.layout) for i in todo)
        for i, source in zip(todo, sources):
            experts = f"{i.experts} expert{'s' if i.experts != 1 else ''}" if i.experts else ""
            lines.append(f"  {source.ljust(w0)}  {i.layout.ljust(w1)}  {i.method:<5}  {experts}")
            for n in i.notes:
                lines.append(f"      note: {n}")
    if done and verbose:
        lines.append("Already migrated (checked again before being skipped):")
        lines.extend(f"  {i.source}" for i in done)
    if skip:
        lines.append("Skipped:")
        for i in skip:
            lines.append(f"  {i.source}: {i.reason}")
    for p in plan.problems:
        lines.append(f"{p['severity']}: {p['path']}: {p['code']}: {p['message']}")
    return shown_lines(lines)


def render_result(result: MigrateResult, plan: MigratePlan, *, verbose: bool = False,
                  quiet: bool = False) -> str:
    lines = []
    if not quiet:
        for o in result.migrated:
            experts = f"{o.experts} expert{'s' if o.experts != 1 else ''}"
            head = (f"migrated  {_where(plan.src, o.source)} -> {_where(plan.dst, o.target)}  "
                    f"({o.method}, {experts}")
            if o.method == "svd" and o.max_rel_error is not None:
                head += f", worst relative error {o.max_rel_error:.3g}"
            lines.append(head + ")")
            if o.module_errors and (verbose or o.method == "svd"):
                width = max(len(shown(m)) for m in o.module_errors)
                worst = max(o.module_errors, key=o.module_errors.get)
                for m, e in sorted(o.module_errors.items()):
                    lines.append(f"      {shown(m).ljust(width)}  {e:.3g}"
                                 + ("  (worst)" if m == worst else ""))
            if o.verify:
                v = o.verify
                lines.append(f"      verify: max |Δlogits| {v['max_abs_diff']:.3g}, relative "
                             f"{v['max_rel_diff']:.3g} (tolerance {v['tolerance']:g}): "
                             f"{'passed' if v['passed'] else 'FAILED'}")
            for w in o.warnings:
                if verbose or w.startswith("warning"):
                    lines.append(f"      {w}")
        for o in result.skipped:
            if verbose or o.reason == "already migrated":
                lines.append(f"skipped   {_where(plan.src, o.source)}: {o.reason}")
    for o in result.failed:
        lines.append(f"failed    {_where(plan.src, o.source)}: {o.reason}")
        if verbose and o.over_bound:
            width = max(len(b["module"]) for b in o.over_bound)
            for b in o.over_bound:
                need = b["needed_rank"] if b["needed_rank"] is not None else "none"
                lines.append(f"      {b['module'].ljust(width)}  {b['error']:.3g} at rank "
                             f"{b['rank']} (bound {b['bound']:.3g}; rank needed: {need} of "
                             f"{b['full_rank']})")
        if verbose and o.verify:
            lines.append(f"      verify: {o.verify}")
        if verbose and o.detail:
            lines.extend("      " + line for line in o.detail.rstrip().splitlines())
    lines.append(f"Done: {len(result.migrated)} migrated, {len(result.skipped)} skipped, "
                 f"{len(result.failed)} failed.")
    return shown_lines(lines)


def dry_run_doc(plan: MigratePlan) -> dict:
    from .converter import ACTION_MIGRATE
    def item(i):
        d = {"source": i.source, "target": i.target, "layout": i.layout, "method": i.method,
             "experts": i.experts}
        if i.notes:
            d["notes"] = list(i.notes)
        return d
    return {"dry_run": True,
            "planned": [item(i) for i in plan.items if i.action == ACTION_MIGRATE],
            "migrated": [],
            "skipped": [{"source": i.source, "target": i.target, "method": i.method,
                         "reason": i.reason} for i in plan.items if i.action != ACTION_MIGRATE],
            "failed": []}


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


def _finite(ctx, param, value):
    """FloatRange lets nan and inf through; a bound must be a number."""
    import math
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def register(cli: click.Group) -> None:
    """Add ``migrate`` to the ``ckpt-tools`` group (called by ``cli._register_optional_commands``)."""
    from .cli import (EXIT_LOCKED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Duration, PathArgument,
                      _merge, output_options)

    @cli.command()
    @click.argument("src", type=PathArgument())
    @click.argument("dst", type=PathArgument())
    @click.option("--dry-run", is_flag=True, help="Show what would be done; write nothing.")
    @click.option("--link", is_flag=True,
                  help="Hard-link files carried byte for byte (canonical checkpoints, trainer "
                       "state) instead of copying them.")
    @click.option("--base-model", metavar="PATH_OR_ID",
                  help="Base model: a local model directory or a hub id in the local Hugging "
                       "Face cache (truly merged checkpoints; --verify).")
    @click.option("--rank", type=click.IntRange(1), help="LoRA rank of a low-rank extraction.")
    @click.option("--energy", type=click.FloatRange(0, 1, min_open=True),
                  help="Smallest rank keeping this share of each delta's squared singular values.")
    @click.option("--max-error", type=click.FloatRange(0, min_open=True), default=None,
                  callback=_finite, metavar="E",
                  help="Largest relative error of any module of a low-rank extraction; a "
                       "checkpoint above it fails, naming the rank that would meet it "
                       "[default: 0.01].")
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
    @output_options
    @click.pass_context
    def migrate(ctx, src, dst, dry_run, link, base_model, rank, energy, max_error, device,
                lora_alpha, verify, verify_tol, jobs, min_age, lock_path, lock_timeout, **opts):
        """Convert every non-canonical checkpoint under SRC into the canonical layout under DST.

        Relative paths are mirrored; canonical checkpoints are copied (or hard-linked with
        --link); broken and in-progress ones are skipped. Each target is written under a
        temporary name, verified, then renamed into place: a re-run after a crash finishes
        the job. Exit 0 when all was done, 1 when any checkpoint failed.
        """
        # no network, ever: hub ids resolve from the local cache only
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from .converter import (ACTION_SKIP, MigrateError, MigrateOptions, execute_migrate,
                                plan_migrate)
        from .locking import LockError, LockHeld
        out = _merge(ctx, **opts)
        bound = {} if max_error is None else {"max_error": max_error}
        options = MigrateOptions(link=link, base_model=base_model, rank=rank, energy=energy,
                                 device=device, lora_alpha=lora_alpha, verify=verify,
                                 verify_tol=verify_tol, min_age_s=min_age, **bound)
        try:
            plan = plan_migrate(src, dst, options, jobs=jobs)
        except MigrateError as exc:
            click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
            ctx.exit(EXIT_USAGE)
        if dry_run:
            if out.json:
                out.document(dry_run_doc(plan))
            else:
                click.echo(render_plan(plan, verbose=out.verbose, quiet=out.quiet))
                click.echo("Dry run: nothing written.")
            ctx.exit(EXIT_OK)
        if not out.json and not out.quiet:
            click.echo(render_plan(plan, verbose=out.verbose, quiet=True))
        work = sum(1 for i in plan.items if i.action != ACTION_SKIP)
        bar = out.bar(work, "migrating")

        def on_event(e: MigrateEvent) -> None:
            if e.kind == "done":
                if bar is not None:
                    bar.update(1)
                elif out.verbose and e.outcome is not None and not out.json:
                    out.note(f"{e.outcome.outcome}: {e.item.source}")

        try:
            with quiet_libraries(out.verbose):
                result = execute_migrate(plan, jobs=jobs, on_event=on_event,
                                         lock_timeout=lock_timeout, lock_path=lock_path, fs=out.fs)
        except LockHeld as exc:
            click.echo(shown(f"ckpt-tools: {exc}"), err=True)
            ctx.exit(EXIT_LOCKED)
        except LockError as exc:
            click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
            ctx.exit(EXIT_USAGE)
        finally:
            if bar is not None:
                bar.close()
        if out.json:
            out.document({"dry_run": False} | result.to_dict())
        else:
            click.echo(render_result(result, plan, verbose=out.verbose, quiet=out.quiet))
        # a directory of SRC that could not be listed: whatever it holds was not migrated
        unread = [p for p in plan.problems if p.get("severity") == "error"]
        for p in unread:
            click.echo(f"ckpt-tools: error: {_where(plan.src, p['path'])}: {p['code']}: "
                       f"{shown(p['message'])}; nothing under it was migrated", err=True)
        ctx.exit(EXIT_PROBLEMS if result.failed or unread else EXIT_OK)
