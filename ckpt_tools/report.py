"""Render records and plans for people (lines of tables) and machines (JSON). Decides nothing.

Renderers return lists of lines and the CLI's output sink writes them, each through
``names.shown``; a name is escaped here too where a column's width is measured from it, so
that tables stay aligned (escaping twice changes nothing).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import TYPE_CHECKING

from .kinds import MigrateMethod
from .names import json_text, shown
from .problems import STRIP_INTERRUPTED
from .records import BROKEN, HEALTHY, IN_PROGRESS, LEGACY, REDUNDANT, Run, ScanResult
from .storage import is_url

if TYPE_CHECKING:   # the plans' modules are imported by the commands that make plans
    from .migrate import MigratePlan, MigrateResult
    from .prune.result import PruneResult
    from .prune.plan import PrunePlan


def size_str(n: int) -> str:
    import humanize  # only tables need it: not imported for --json
    return humanize.naturalsize(n)


def _refuse(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


try:
    from json.encoder import c_make_encoder as _c_make_encoder
except ImportError:  # another Python: the json module's own way
    _c_make_encoder = None
if _c_make_encoder is not None:
    # json.dumps(value, ensure_ascii=False) without building an encoder for every value
    _c_encoder = _c_make_encoder({}, _refuse, json.encoder.encode_basestring, None, ": ", ", ",
                                 False, False, True)

    def _encode(value) -> str:
        return "".join(_c_encoder(value, 0))
else:
    def _encode(value) -> str:
        return json.dumps(value, ensure_ascii=False)


def dumps(doc) -> str:
    """A JSON document with one top-level key, and one list item, per line.

    Readable and grep-able, and written by the C encoder (``indent`` would force the slow
    pure-Python one, which costs seconds on an audit of tens of thousands of checkpoints).
    Always valid UTF-8 once encoded: a name that is not UTF-8 is written as ``json_safe``
    says (U+FFFD, and its bytes in a ``<field>_bytes_b64`` field); see ``names.json_text``.
    """
    return json_text(_layout, doc)


def _layout(doc) -> str:
    if not isinstance(doc, dict):
        return _encode(doc)
    parts = []
    for key, value in doc.items():
        k = _encode(key)
        if isinstance(value, list) and value:
            items = ",\n    ".join(map(_encode, value))
            parts.append(f"  {k}: [\n    {items}\n  ]")
        else:
            parts.append(f"  {k}: {_encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def _table(rows: list[list[str]], right: set[int],
           colors: list[tuple[int, str] | None] | None = None) -> list[str]:
    """Rows of cells in aligned columns (``right``: the columns aligned right). ``colors``, one
    per row: None, or ``(column, colour)`` to give that cell a colour; such a row is a
    ``Styled`` line, its cells escaped first (idempotent: the widths are those of the plain,
    escaped cells) and the escape codes put around the cell's text after its padding was
    decided, so the columns stay aligned on the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row, color in zip(rows, colors or [None] * len(rows)):
        if color is not None:
            row = [shown(c) for c in row]
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        if color is None:
            out.append("  " + "  ".join(cells).rstrip())
            continue
        import click
        column, fg = color
        cells[column] = cells[column].replace(row[column], click.style(row[column], fg=fg), 1)
        out.append(Styled("  " + "  ".join(cells).rstrip()))
    return out


class Styled(str):
    """A line whose every cell was escaped (``names.shown``) before a colour's escape codes
    went into it: the output sink writes it as it is, where it escapes every other line."""


# The colour of each status's cell on a terminal.
STATUS_COLORS = {BROKEN: "red", LEGACY: "yellow", REDUNDANT: "yellow", IN_PROGRESS: "cyan",
                 HEALTHY: "green"}


def _run_title(root: str, run: str, multi_root: bool) -> str:
    title = run if run != "." else os.path.basename(os.path.abspath(root)) or root
    if multi_root:
        title = f"{root.rstrip('/')}/{run}" if run != "." else root
    return title


def render_audit(result: ScanResult, *, verbose: bool = False, quiet: bool = False,
                 color: bool = False) -> list[str]:
    """The tables of ``result``'s runs and the footer (``quiet``: the footer alone, with every
    status's count). ``color``: each status cell in its status's colour (``STATUS_COLORS``),
    as ``Styled`` lines."""
    lines: list[str] = []
    multi_root = len(result.roots) > 1
    if not quiet:
        from .space import scan_space
        space = scan_space(result)
        for run, run_space in zip(result.runs, space.runs):
            n = len(run.checkpoints)
            lines.append(f"{_run_title(run.root, run.path, multi_root)}  "
                         f"({n} checkpoint{'s' if n != 1 else ''}, {size_str(run.size_bytes)})")
            rows = [["CHECKPOINT", "STEP", "STATUS", "KIND", "LAYOUT", "SIZE", "RECLAIMABLE", "PROBLEMS"]]
            # a column only where the run's trainer state names a best checkpoint it holds:
            # the table of every other run stays as it was
            best_column = any(c.best_of_run for c in run.checkpoints)
            if best_column:
                rows[0].append("BEST")
            for c in run.checkpoints:
                name = c.path if c.run == "." else os.path.relpath(c.path, c.run) if c.path != "." else "."
                name = shown(name)   # before the widths are measured: the table stays aligned
                errors = [p for p in c.problems if p.is_error]
                warnings = [p for p in c.problems if not p.is_error]
                probs = ", ".join(sorted({p.code for p in errors}))
                if warnings and (verbose or not errors):
                    probs = (probs + "; " if probs else "") + \
                        ", ".join(sorted({p.code for p in warnings})) + " (warning)"
                status = _status_text(c)
                rows.append([name, "" if c.step is None else str(c.step), status, c.model_kind, c.layout,
                             size_str(c.size_bytes),
                             size_str(c.reclaimable_bytes) if c.reclaimable_bytes else "-",
                             probs or "-"])
                if best_column:
                    rows[-1].append(_best_mark(run) if c.best_of_run else "")
            colors = [None] + [(2, STATUS_COLORS[c.status]) for c in run.checkpoints] if color else None
            lines.extend(_table(rows, right={1, 5, 6}, colors=colors))
            lines.append(f"  space: {_space_text(run_space)}")
            if run.trainer is not None and run.trainer.best_missing:
                lines.append(f"    note: {_best_missing_note(run)}")
            # every problem's line, warnings too: a code alone in the table says too little
            if run.trainer is not None:
                lines.extend("    " + p.line() for p in run.trainer.problems)
            lines.extend("    " + p.line() for c in run.checkpoints for p in c.problems)
            lines.append("")
        for p in result.problems:
            lines.append(p.line())
        if result.problems:
            lines.append("")
        if result.runs:
            lines.append(f"space: {_space_text(space.total)}")
            lines.append("owners: " + ", ".join(f"{shown(name)} {size_str(n)}"
                                                for name, n in space.total.by_owner.items()))
    lines.append(footer(result, every_status=quiet))
    return lines


def _status_text(c) -> str:
    """The status, with what audit's JSON says beside it: fresh, stripped (not resumable)."""
    marks = ["fresh"] if c.fresh else []
    if c.stripped:
        marks.append("strip interrupted" if any(p.code == STRIP_INTERRUPTED for p in c.problems)
                     else "stripped")
    return f"{c.status} ({', '.join(marks)})" if marks else str(c.status)


def _space_text(space) -> str:
    """``weights 1.2 GB, adapters 30 MB, …``: the roles that hold anything, in the order of
    ``SpaceRole`` (the JSON has every role, 0 included)."""
    held = [(role, n) for role, n in space.by_role.items() if n]
    return ", ".join(f"{role.replace('_', ' ')} {size_str(n)}" for role, n in held) or "nothing"


def _metric_text(state) -> str:
    if state.best_metric is None:
        return ""
    name = f"{state.metric_for_best_model} " if state.metric_for_best_model else "metric "
    return f"{shown(name)}{state.best_metric:.6g}"


def _best_mark(run: Run) -> str:
    """The mark beside the best checkpoint of a run, with the metric that made it best."""
    metric = _metric_text(run.trainer.state)
    return f"* best ({metric})" if metric else "* best"


def _best_missing_note(run: Run) -> str:
    state = run.trainer.state
    metric = _metric_text(state)
    return (f"{run.trainer.source} names {shown(state.best_name)} as the best checkpoint"
            f"{f' ({metric})' if metric else ''}; it is no longer in this run")


def footer(result: ScanResult, *, every_status: bool = False) -> str:
    """The summary line. The statuses that need attention are named where there are any;
    ``every_status`` (``-q``, where this line is all there is) names each status's count,
    healthy and zeros included, so that a script reads them all from one line."""
    counts = result.by_status()
    n = len(result.checkpoints)
    runs = len(result.runs)
    parts = [f"{n} checkpoint{'s' if n != 1 else ''} in {runs} run{'s' if runs != 1 else ''}",
             f"{size_str(result.size_bytes)} "
             + ("stored" if any(is_url(r) for r in result.roots) else "on disk"),
             f"{size_str(result.reclaimable_bytes)} reclaimable by prune"]
    for status, label in ((BROKEN, "broken"), (LEGACY, "legacy"), (REDUNDANT, "redundant"),
                          (IN_PROGRESS, "in progress"), (HEALTHY, "healthy")):
        if counts[status] and status is not HEALTHY or every_status:
            parts.append(f"{counts[status]} {label}")
    return ", ".join(parts)


def render_validate(result: ScanResult, *, verbose: bool = False, quiet: bool = False) -> list[str]:
    lines = []

    def full(root: str, rel: str) -> str:
        return root if rel == "." else os.path.join(root, rel)

    for c in result.checkpoints:
        where = full(c.dir.root, c.path)
        errors = sum(1 for p in c.problems if p.is_error)
        warns = len(c.problems) - errors
        head = f"{where}: {_status_text(c)} ({c.model_kind}, {c.layout})"
        if errors or warns:
            head += f", {errors} error{'s' if errors != 1 else ''}"
            if warns:
                head += f", {warns} warning{'s' if warns != 1 else ''}"
        if not quiet or errors:
            lines.append(head)
        for p in c.problems:
            if p.is_error or verbose or not quiet:
                lines.append("  " + p.line(full(c.dir.root, p.path)))
        hashes = c.facts.hashes if verbose and c.facts is not None else None
        if hashes:
            for rel, digest in sorted(hashes.items()):
                lines.append(f"  sha256 {digest}  {rel}")
    for p in result.problems:
        lines.append(p.line())
    return lines


def validate_doc(result: ScanResult) -> dict:
    out = []
    for c in result.checkpoints:
        d = c.to_dict()
        d["valid"] = not c.errors
        d["num_experts"] = c.num_experts
        if c.facts is not None and c.facts.hashes is not None:   # deep mode only
            d["hashes"] = c.facts.hashes
        out.append(d)
    return {"checkpoints": out, "valid": all(not c.errors for c in result.checkpoints)
            and not any(p.is_error for p in result.problems),
            "problems": [p.to_dict() for p in result.problems]}


# --- prune -----------------------------------------------------------------------------

def prune_where(root: str, path: str, multi_root: bool) -> str:
    """A checkpoint or file as the user reads it: under its root when there are several."""
    if not multi_root:
        return shown(path)
    return shown(root if path == "." else os.path.join(root, path))


def _links(n: int) -> str:
    return f"held by {n} other link{'s' if n != 1 else ''}"


def render_prune_plan(plan: PrunePlan, scan: ScanResult, *, multi_root: bool,
                      verbose: bool = False, quiet: bool = False) -> list[str]:
    """The plan for people: each file with the bytes it frees, a total, then what is left alone."""
    from .prune.plan import skip_reason
    lines: list[str] = []
    n_ckpt = len({(d.root, d.checkpoint) for d in plan.deletions})
    if plan.deletions and not quiet:
        lines.append(f"Plan: delete {len(plan.deletions)} merged-weight file"
                     f"{'s' if len(plan.deletions) != 1 else ''} from {n_ckpt} redundant checkpoint"
                     f"{'s' if n_ckpt != 1 else ''}:")
        rows = [(prune_where(d.root, d.path, multi_root), size_str(d.frees_bytes),
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
                    lines.append(f"  {prune_where(c.dir.root, c.path, multi_root)}: {reason}")
            else:
                # the count per kind of reason; the details of those holding merged weights below
                kinds = Counter("fresh: complete, but younger than --min-age" if c.fresh
                                else reason.split(" (")[0].split(":")[0] if c.status == REDUNDANT
                                else reason.split(" (")[0] for c, reason in left)
                for reason, n in sorted(kinds.items()):
                    lines.append(f"  {n:>4}  {reason}")
                if plan.skipped:
                    lines.append("  of which hold merged weights:")
                    for s in plan.skipped:
                        lines.append(f"    {prune_where(s.root, s.path, multi_root)}: {s.reason}")
        for p in scan.problems:
            lines.append(p.line())
    return lines


def render_prune_outcome(result: PruneResult, *, dry_run: bool) -> str:
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



# --- retention (prune --keep-* --strip|--delete) ------------------------------------------

def render_retention_plan(plan, *, multi_root: bool, verbose: bool = False,
                          quiet: bool = False) -> list[str]:
    """Per run, each checkpoint's KEEP / STRIP / DELETE with its reasons and the bytes it frees;
    the trash due for purging; the totals now and when the trash is purged."""
    lines: list[str] = []
    if plan.policy is not None and not quiet:
        by_run: dict[tuple[str, str], list] = {}
        for item in plan.items:
            by_run.setdefault((item.checkpoint.dir.root, item.checkpoint.run), []).append(item)
        for (root, run), items in by_run.items():
            acting = [i for i in items if i.decision.action.value != "keep" and not i.refused]
            if not acting and not verbose:
                continue
            lines.append(f"{_run_title(root, run, multi_root)}:")
            rows = []
            for i in items:
                action = i.decision.action.value.upper()
                if i.refused:
                    action = "KEEP"
                shown_name = shown(os.path.relpath(i.checkpoint.path, run) if run != "." else i.checkpoint.path)
                why = ", ".join(i.decision.reasons) + (f" (not stripped: {i.refused})" if i.refused else "")
                size = (size_str(i.frees_now) if i.frees_now else
                        f"{size_str(i.frees_when_purged)} when purged" if i.frees_when_purged else "")
                rows.append((action, shown_name, size, why))
            w0 = max(len(r[0]) for r in rows)
            w1 = max(len(r[1]) for r in rows)
            w2 = max(len(r[2]) for r in rows)
            for action, name, size, why in rows:
                lines.append(f"  {action.ljust(w0)}  {name.ljust(w1)}  {size.rjust(w2)}  {why}".rstrip())
        for root, run, why in plan.refused_runs:
            lines.append(f"{_run_title(root, run, multi_root)}: left alone: {why}")
    for p in plan.purges:
        if p.due and not quiet:
            lines.append(f"{_run_title(p.root, p.run, multi_root)}: purge {len(p.due)} trash "
                         f"entr{'ies' if len(p.due) != 1 else 'y'}, {size_str(p.frees_bytes)}")
    if plan.has_work:
        counts = plan.counts()
        total = (f"Retention: keep {counts['keep']}, strip {counts['strip']}, delete "
                 f"{counts['delete']}: {size_str(plan.freed_now)} to free now")
        if plan.freed_when_purged:
            total += (f", {size_str(plan.freed_when_purged)} when the trash is purged (after "
                      f"{_duration_text(plan.purge_after_s)}, or --purge-now)")
        lines.append(total)
    return lines


def _duration_text(seconds: float) -> str:
    from .retention.rules import format_duration
    return format_duration(seconds)


def render_retention_outcome(result, *, dry_run: bool) -> str:
    if dry_run:
        return ""
    parts = []
    if result.stripped:
        parts.append(f"stripped {len(result.stripped)} checkpoint{'s' if len(result.stripped) != 1 else ''}")
    if result.trashed:
        parts.append(f"moved {len(result.trashed)} to the trash "
                     f"({size_str(result.freed_when_purged)} freed when purged)")
    if result.deleted:   # in a bucket: no trash
        parts.append(f"deleted {len(result.deleted)} checkpoint{'s' if len(result.deleted) != 1 else ''}")
    if result.purged:
        parts.append(f"purged {len(result.purged)} trash entr{'ies' if len(result.purged) != 1 else 'y'}")
    text = "Retention: " + (", ".join(parts) if parts else "nothing done")
    text += f"; freed {size_str(result.freed_now)} now."
    if result.skipped:
        text += f" Skipped {len(result.skipped)}."
    if result.failed:
        text += f" {len(result.failed)} failed."
    return text


# --- migrate ---------------------------------------------------------------------------

def migrate_where(root: str, rel: str) -> str:
    """A source or target as the user reads it: under SRC or DST."""
    return shown(root if rel == "." else os.path.join(root, rel))


def render_migrate_plan(plan: MigratePlan, *, verbose: bool = False,
                        quiet: bool = False) -> list[str]:
    from .migrate import ACTION_DONE, ACTION_MIGRATE, ACTION_SKIP
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
        return lines
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
        lines.append(p.line())
    return lines


def render_migrate_result(result: MigrateResult, plan: MigratePlan, *, verbose: bool = False,
                          quiet: bool = False) -> list[str]:
    lines = []
    if not quiet:
        for o in result.migrated:
            experts = f"{o.experts} expert{'s' if o.experts != 1 else ''}"
            head = (f"migrated  {migrate_where(plan.src, o.source)} -> "
                    f"{migrate_where(plan.dst, o.target)}  ({o.method}, {experts}")
            if o.method == MigrateMethod.SVD and o.max_rel_error is not None:
                head += f", worst relative error {o.max_rel_error:.3g}"
            lines.append(head + ")")
            if o.module_errors and (verbose or o.method == MigrateMethod.SVD):
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
            if verbose or o.reason == "already migrated" or o.max_error is not None:
                lines.append(f"skipped   {migrate_where(plan.src, o.source)}: {o.reason}")
    for o in result.failed:
        lines.append(f"failed    {migrate_where(plan.src, o.source)}: {o.reason}")
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
    return lines
