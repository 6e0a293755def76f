"""Carrying out a ``MigratePlan``: DST's lock, stale temporaries, then each checkpoint
re-checked against its source as it now is and written (``write``), in threads.

Each target is built under ``<parent>/.ckpt-tools-tmp-<name>-<pid>`` inside DST, every file
and directory fsynced, validated (it must classify ``healthy`` with no error) and its
tensors re-read and compared with what was extracted; only then is it renamed into place
and the parent directory fsynced. The marker file ``.ckpt-tools-migrated.json``, written
last, records the identity of every input file: a re-run skips targets whose marker
matches their source and redoes the rest. The source is only ever read.

A disk that fills up or fails (ENOSPC, EIO, ...) while a target is written or synced fails
that checkpoint alone, with one line naming the condition and the file as it would have been
named under DST; the others go on. Its temporary directory is removed (retried past a failed
unlink; where the file system refuses even that, it stays, hidden, and the next migrate of
that DST removes it), and so are the run directories made for it alone. A failed fsync of the
parent after the rename takes the rename back: a target reported failed is never left in place.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .. import commit, scanner
from ..errors import Wording, message_of
from ..formats import safetensors_header as st
from ..fs import FileOps, local_or
from ..records import BROKEN, IN_PROGRESS, Checkpoint
from .errors import CheckpointFailure, NothingToMigrate, discard_temporary, storage_error
from .extract import MigrateSource, open_source
from .plan import (ACTION_DONE, ACTION_MIGRATE, ACTION_SKIP, MigrateItem, MigratePlan, digest_of,
                   input_files, is_inside, method_for, skip_reason, target_state)
from .result import MigrateEvent, MigrateOutcome, MigrateResult
from .write import (MigrateContext, SourceChanged, TargetJob, VerifyFailed, clean_stale,
                    write_target)


def _refuse_unsafe_links(src: MigrateSource, root: str, shown: str) -> None:
    """Migrate reads the files it carries by path: none may be a symlink leading out of
    ``root`` (SRC; symlinks are never followed out of a root), nor a FIFO or a device
    (reading one blocks, or never ends), nor a symlink to a directory or a loop (a directory
    has no bytes to carry). ``shown`` names the checkpoint under SRC."""
    root_real = os.path.realpath(root)
    real = os.path.realpath(src.abspath)
    if not is_inside(real, root_real):
        raise CheckpointFailure(f"{shown}: now leads to {real}, outside {root} (a directory was "
                                "replaced by a symlink); migrate never follows a symlink out of SRC")
    for f in src.ckpt.files:
        path = src.abs(f.relpath)
        where = f.relpath if shown == "." else f"{shown}/{f.relpath}"
        if f.is_symlink:
            real = os.path.realpath(path)
            if not is_inside(real, root_real):
                raise CheckpointFailure(f"{where}: a symlink to {real}, outside {root}; "
                                        "migrate never follows a symlink out of SRC")
        try:
            st.require_regular(path)
        except st.NotRegularFile as exc:
            raise CheckpointFailure(f"{where}: {exc.strerror}; not reading it") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointFailure(f"{where}: a symlink loop; not following it") from None
            continue    # a dangling link: the reader that needs it says so


def _target_abs(plan: MigratePlan, item: MigrateItem) -> str:
    return os.path.abspath(plan.dst if item.target == "." else
                           os.path.join(plan.dst, *item.target.split("/")))


def _shown_target(plan: MigratePlan, item: MigrateItem) -> str:
    """The target as the user named it (DST as given, then the relative path)."""
    return plan.dst if item.target == "." else os.path.join(plan.dst, *item.target.split("/"))


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(dirs: list[str], fs: FileOps) -> None:
    """Remove the directories made for a target that failed, deepest first, while empty."""
    for d in dirs:
        try:
            fs.rmdir(d)
        except OSError:
            return


_SOURCE_ATTEMPTS = 3


def _migrate_fresh(ctx: MigrateContext, item: MigrateItem) -> MigrateOutcome:
    """``_migrate_one``, begun again from the source as it now is when it changed while read."""
    changed: list[str] = []
    for _ in range(_SOURCE_ATTEMPTS):
        try:
            out = _migrate_one(ctx, item)
        except SourceChanged as exc:
            changed.append(str(exc))
            continue
        if changed and out.outcome != "failed":
            out = dataclasses.replace(out, warnings=out.warnings + (
                f"note: the source changed while it was read ({changed[-1]}); done again from "
                "the source as it now is",))
        return out
    raise CheckpointFailure(f"the source kept changing while it was read: {changed[-1]}")


def _migrate_one(ctx: MigrateContext, item: MigrateItem) -> MigrateOutcome:
    t0 = time.monotonic()
    plan, opts = ctx.plan, ctx.plan.options
    src_abs = os.path.abspath(plan.src if item.source == "." else
                              os.path.join(plan.src, *item.source.split("/")))
    target = _target_abs(plan, item)

    def outcome(kind: str, **kw) -> MigrateOutcome:
        return MigrateOutcome(item.source, item.target, kind, seconds=time.monotonic() - t0, **kw)

    # the source as it is now, not as it was planned
    try:
        src = open_source(src_abs, min_age_s=opts.min_age_s)
    except scanner.ScanError as exc:
        raise CheckpointFailure(str(exc)) from None
    v = src.verdict
    if v.status in (BROKEN, IN_PROGRESS) or v.fresh:
        probe = Checkpoint.from_verdict(src.ckpt, v)
        return outcome("skipped", method=item.method, reason=skip_reason(probe) + " (since the plan)")
    method, why_not = method_for(Checkpoint.from_verdict(src.ckpt, v),
                                 base_model_given=bool(opts.base_model))
    if method is None:
        return outcome("skipped", reason=why_not)
    _refuse_unsafe_links(src, plan.src, item.source)
    digest = digest_of(input_files(src.ckpt, v.facts))

    state, detail = target_state(target, digest)
    if state == "finished":
        return outcome("skipped", method=method, reason="already migrated")
    if state == "foreign":
        raise CheckpointFailure(f"target {target} exists: {detail}")

    staging = commit.RenameCommit(target, ctx.fs, replace=state == "stale")
    tmp = staging.tmp
    shown = _shown_target(plan, item)
    new_dirs = _missing_dirs(os.path.dirname(target))
    job = TargetJob(src, method, digest, item, shown, outcome)
    try:
        result = write_target(ctx, job, staging)
    except VerifyFailed as exc:
        result = exc.outcome
    except BaseException as exc:
        left = discard_temporary(tmp, ctx.fs,
                                 os.path.join(os.path.dirname(shown), os.path.basename(tmp)))
        _remove_empty(new_dirs, ctx.fs)
        if isinstance(exc, NothingToMigrate):
            # what reading it showed (a full fine-tune): skipped, nothing of it left in DST
            return outcome("skipped", method=method, reason=_and_left(message_of(exc), left),
                           **exc.fields)
        reason = message_of(exc) if isinstance(exc, CheckpointFailure) else None
        # only an OSError of its own here (mkdir, rename, a read): the writer names the file
        # of a failed write itself, and other exceptions go up as they are
        why = storage_error(exc) if reason is None and isinstance(exc, OSError) else None
        if why is not None:
            where = getattr(exc, "filename", None)
            if isinstance(where, str) and is_inside(where, tmp):
                where = shown + where[len(tmp):]
            reason = f"{why}: {where}" if isinstance(where, str) else f"{why} migrating to {shown}"
        if reason is None:
            raise       # a bug: execute_migrate reports it (its traceback with -v)
        raise CheckpointFailure(_and_left(reason, left),
                                fields=getattr(exc, "fields", None)) from None
    if result.outcome == "failed":     # --verify refused it: rolled back like any failure
        left = discard_temporary(tmp, ctx.fs, tmp)
        _remove_empty(new_dirs, ctx.fs)
    else:
        left = discard_temporary(staging.parked, ctx.fs, staging.parked) if staging.parked else None
    if left:
        result = dataclasses.replace(result, warnings=result.warnings + (f"warning: {left}",))
    return result


def _and_left(reason: str, left: str | None) -> str:
    """Why a checkpoint failed, and what of it stays behind (a temporary directory)."""
    return Wording("{reason}; {left}", reason=reason, left=left) if left else reason


def _ordered(items: list[MigrateItem]) -> tuple[list[MigrateItem], list[MigrateItem]]:
    """Items whose target holds another target must be done first, one at a time."""
    targets = [i.target for i in items]

    def holds_other(t: str) -> bool:
        return any(o != t and (t == "." or o.startswith(t + "/")) for o in targets)

    first = sorted((i for i in items if holds_other(i.target)), key=lambda i: i.target.count("/"))
    rest = [i for i in items if not holds_other(i.target)]
    return first, rest


def lock_dir_for(plan: MigratePlan) -> str:
    """Where DST's lock file lives: DST itself, or its parent when DST is a target itself."""
    dst = os.path.abspath(plan.dst)
    if any(i.target == "." for i in plan.items):
        return os.path.dirname(dst)
    return dst


def execute_migrate(plan: MigratePlan, *, jobs: int = 1,
                    on_event: Callable[[MigrateEvent], None] | None = None,
                    lock: bool = True, lock_timeout: float = 0.0,
                    lock_path: str | None = None, fs: FileOps | None = None) -> MigrateResult:
    """Carry out ``plan``: every item is re-checked against the source as it is now.

    Takes DST's tree lock exclusively and SRC's shared (and their lock files: SRC's where
    it has one; or ``lock_path`` instead) unless ``lock`` is False; raises
    ``locking.LockHeld`` when another run holds it. ``fs``: the file operations every
    write, fsync, rename and removal of DST goes through (None: the local file system).
    """
    from contextlib import ExitStack
    ctx = MigrateContext(plan, local_or(fs))
    migrated: list[MigrateOutcome] = []
    skipped: list[MigrateOutcome] = []
    failed: list[MigrateOutcome] = []
    results_lock = threading.Lock()

    for i in plan.items:
        if i.action == ACTION_SKIP:
            skipped.append(MigrateOutcome(i.source, i.target, "skipped", method=i.method,
                                          reason=i.reason))
    work = [i for i in plan.items if i.action in (ACTION_MIGRATE, ACTION_DONE)]

    with ExitStack() as stack:
        dst = os.path.abspath(plan.dst)
        ldir = lock_dir_for(plan)
        os.makedirs(ldir, exist_ok=True)
        if lock:
            from ..locking import root_lock
            # one call: DST's tree may lie above SRC (a lock taken twice would block itself)
            stack.enter_context(root_lock([ldir], lock_timeout, lock_path=lock_path,
                                          shared_roots=[plan.src]))
        for parent in sorted({os.path.dirname(_target_abs(plan, i)) for i in work}):
            if parent == os.path.dirname(dst) or is_inside(parent, dst):
                clean_stale(parent, ctx.fs)

        def run(item: MigrateItem) -> None:
            if on_event:
                on_event(MigrateEvent("start", item))
            try:
                out = _migrate_fresh(ctx, item)
            except CheckpointFailure as exc:
                out = MigrateOutcome(item.source, item.target, "failed", method=item.method,
                                     reason=message_of(exc), **exc.fields)
            except Exception as exc:  # noqa: BLE001 - one checkpoint never stops the others
                import traceback
                msg = str(exc).splitlines()[0] if str(exc) else ""
                out = MigrateOutcome(item.source, item.target, "failed", method=item.method,
                                     reason=f"{type(exc).__name__}: {msg}",
                                     detail=traceback.format_exc())
            with results_lock:
                {"migrated": migrated, "skipped": skipped, "failed": failed}[out.outcome].append(out)
            if on_event:
                on_event(MigrateEvent("done", item, out))

        first, rest = _ordered(work)
        for item in first:
            run(item)
        if jobs > 1 and len(rest) > 1:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(run, rest))
        else:
            for item in rest:
                run(item)

    def key(o: MigrateOutcome):
        return o.source
    return MigrateResult(tuple(sorted(migrated, key=key)), tuple(sorted(skipped, key=key)),
                         tuple(sorted(failed, key=key)))
