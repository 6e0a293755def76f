"""Find runs and checkpoints under a root, with one ``lstat`` per entry and no file opened.

The walk uses ``os.scandir``, never follows a symlink (a symlink is recorded as
what it is, with where it points), and never leaves the root. ``WalkOptions`` narrow it
further: directories of other file systems (``du -x``) and directories matching a pattern
are not entered.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from sys import intern

from . import layout
from .errors import UsageError
from .problems import PERMISSION_DENIED, UNREADABLE, Problem
from .records import CheckpointDir, FileRecord


class ScanError(UsageError):
    """A root that cannot be scanned at all (missing, not a directory, unreadable)."""


#: Whether the walk may enter a directory (a DirEntry it listed); None: every one.
Admits = Callable[[os.DirEntry], bool] | None


@dataclass(frozen=True)
class WalkOptions:
    """Which directories the walk of a root leaves out.

    ``one_file_system``: a directory on another file system than its root (a mount point)
    is not entered, as ``du -x``. ``exclude``: glob patterns (``fnmatch``, case-sensitive,
    ``*`` also matching ``/``); a directory whose name or whose path relative to its root
    matches one is not entered, so nothing under it is listed, judged or touched. They apply
    to the directories the walk descends through to find checkpoints (runs, checkpoints, a
    checkpoint nested in another), never to a root itself nor to the files and folders of a
    checkpoint found: a checkpoint is judged whole or not at all.
    """

    one_file_system: bool = False
    exclude: tuple[str, ...] = ()

    def admits(self, root_abs: str) -> Admits:
        """The test of a directory entry under ``root_abs``; None when nothing is left out
        (the walk then pays for nothing)."""
        patterns = tuple(filter(None, map(_pattern, self.exclude)))
        root_dev = os.stat(root_abs).st_dev if self.one_file_system else None
        if not patterns and root_dev is None:
            return None

        def admits(entry: os.DirEntry) -> bool:
            if root_dev is not None:
                try:
                    if entry.stat(follow_symlinks=False).st_dev != root_dev:
                        return False
                except OSError:
                    pass   # listing it will say what is wrong with it
            if patterns:
                name = entry.name
                rel = _rel(entry.path, root_abs)
                return not any(fnmatchcase(name, p) or fnmatchcase(rel, p) for p in patterns)
            return True

        return admits


def _pattern(text: str) -> str:
    # "scratch/" and "./runs/a" name what "scratch" and "runs/a" do: relative paths have neither
    text = text.rstrip("/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _rel(path: str, root: str) -> str:
    # path is root or lies below it, both as built by the walk (absolute, normalised): a
    # prefix cut gives what os.path.relpath would, without its abspath calls
    if path == root:
        return "."
    prefix = root if root.endswith(os.sep) else root + os.sep
    if path.startswith(prefix):
        rel = path[len(prefix):]
    else:
        rel = os.path.relpath(path, root)
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def _symlink_row(entry: os.DirEntry, relpath: str, root_real: str, st) -> tuple:
    resolved = os.path.realpath(entry.path)
    escapes = not _inside(resolved, root_real)
    target = None
    target_size = None
    if os.path.lexists(resolved) and os.path.exists(resolved):
        target = resolved
        if not escapes:
            try:
                target_size = os.stat(resolved).st_size
            except OSError:
                target_size = None
    return (relpath, st.st_size, st.st_blocks * 512, st.st_dev, st.st_ino, st.st_nlink,
            st.st_mtime_ns, True, target, escapes, target_size, False, st.st_uid)


def _file_row(entry: os.DirEntry, relpath: str, root_real: str) -> tuple:
    """A FileRecord's field values, in declaration order, from one ``lstat``."""
    st = entry.stat(follow_symlinks=False)
    if entry.is_symlink():
        return _symlink_row(entry, relpath, root_real, st)
    return (relpath, st.st_size, st.st_blocks * 512, st.st_dev, st.st_ino, st.st_nlink,
            st.st_mtime_ns, False, None, False, None, entry.is_file(follow_symlinks=False),
            st.st_uid)


def _file_record(entry: os.DirEntry, relpath: str, root_real: str) -> FileRecord:
    return FileRecord._make(_file_row(entry, relpath, root_real))


def _list(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return list(it)


def _roots(root: str) -> tuple[str, str, list[os.DirEntry]]:
    """(absolute root, real root, its entries); raises ScanError when it cannot be scanned."""
    root_abs = os.path.abspath(root)
    if not os.path.lexists(root_abs):
        raise ScanError(f"{root}: no such file or directory")
    if not os.path.isdir(root_abs):
        raise ScanError(f"{root}: not a directory")
    root_real = os.path.realpath(root_abs)
    try:
        first = _list(root_abs)
    except PermissionError:
        raise ScanError(f"{root}: permission denied") from None
    except OSError as exc:
        raise ScanError(f"{root}: {exc.strerror or exc}") from None
    return root_abs, root_real, first


def find_checkpoints(root: str, options: WalkOptions = WalkOptions()
                     ) -> tuple[list[CheckpointDir], list[Problem]]:
    """Walk ``root`` and return every checkpoint directory found, plus scan problems.

    Raises ScanError only when the root itself cannot be scanned.
    """
    root_abs, root_real, first = _roots(root)
    checkpoints: list[CheckpointDir] = []
    problems: list[Problem] = []
    for item in walk(root, root_abs, root_real, [(root_abs, first)],
                     admits=options.admits(root_abs)):
        (problems if isinstance(item, Problem) else checkpoints).append(item)
    checkpoints.sort(key=checkpoint_order)
    return checkpoints, problems


def checkpoint_order(c: CheckpointDir):
    """The order of ``find_checkpoints``' result: by run, step, path."""
    return (c.run, c.step if c.step is not None else -1, c.path)


def delegable(path: str) -> bool:
    """Whether ``walk`` may hand the directory at ``path`` to ``delegate`` unlisted: its name
    alone makes it a checkpoint, so its subtree is one unit of work that another walk of
    ``[(path, None)]`` yields exactly as this one would have."""
    name = os.path.basename(path)
    return layout.is_checkpoint_name(name) and name not in layout.CHECKPOINT_SUBDIRS


def walk(root: str, root_abs: str, root_real: str,
         stack: list[tuple[str, list[os.DirEntry] | None]],
         delegate=None, rows: bool = False,
         admits: Admits = None) -> Iterator[CheckpointDir | Problem | str | tuple]:
    """Depth first from ``stack``, yielding checkpoints and problems in a fixed order.

    With ``delegate`` (a predicate on paths, see ``delegable``), a directory it accepts is
    yielded as its path instead of being listed: the caller walks that subtree itself,
    elsewhere, and splices what it yields in at that place. With ``rows`` a checkpoint comes
    as (its ``collect_rows`` values, the CheckpointDir). ``admits`` (``WalkOptions.admits``)
    says which directories are entered; it is asked before a directory is stacked, so a
    delegated path has passed it already.
    """
    while stack:
        path, entries = stack.pop()
        if entries is None:
            if delegate is not None and delegate(path):
                yield path
                continue
            try:
                entries = _list(path)
            except PermissionError:
                yield Problem(PERMISSION_DENIED, _rel(path, root_abs),
                              "cannot list directory: permission denied")
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # vanished during the scan
                yield Problem(UNREADABLE, _rel(path, root_abs),
                              f"cannot list directory: {exc.strerror or exc}")
                continue
        name = os.path.basename(path) if path != root_abs else os.path.basename(root_real)
        is_ckpt = (layout.is_checkpoint_name(name)
                   or layout.marks_checkpoint({e.name for e in entries})) \
            and name not in layout.CHECKPOINT_SUBDIRS
        if is_ckpt:
            values, nested = collect_rows(root, root_abs, root_real, path, entries, admits)
            ckpt = CheckpointDir.from_values(values)
            yield (values, ckpt) if rows else ckpt
            stack.extend((p, None) for p in reversed(nested))
            continue
        subdirs = [e.path for e in entries if e.name != layout.TRASH_DIR and _is_real_dir(e)
                   and (admits is None or admits(e))]
        stack.extend((p, None) for p in sorted(subdirs, reverse=True))


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _collect_checkpoint(root: str, root_abs: str, root_real: str, path: str,
                        entries: list[os.DirEntry]) -> tuple[CheckpointDir, list[str]]:
    """All files of one checkpoint; directories that are checkpoints themselves are returned."""
    ckpt, nested = collect_rows(root, root_abs, root_real, path, entries)
    return CheckpointDir.from_values(ckpt), nested


def collect_rows(root: str, root_abs: str, root_real: str, path: str,
                 entries: list[os.DirEntry], admits: Admits = None) -> tuple[tuple, list[str]]:
    """``_collect_checkpoint`` as plain values: the CheckpointDir's field values in
    declaration order, with ``files`` as FileRecord rows (see ``CheckpointDir.from_values``);
    cheap to build and to send between processes. A nested directory that ``admits``
    refuses is not returned."""
    rows: list[tuple] = []
    append = rows.append
    nested: list[str] = []
    unreadable: list[str] = []
    newest = 0  # files only: a directory's mtime also moves when prune unlinks from it
    own = layout.is_own_bookkeeping
    belongs = layout.belongs_to_checkpoint
    holds_adapter = any(e.name == layout.ADAPTER_CONFIG for e in entries)
    pending: list[tuple[str, list[os.DirEntry]]] = [("", entries)]
    while pending:
        prefix, ents = pending.pop()
        for e in ents:
            name = e.name
            if own(name):
                continue
            try:
                # no keyword arguments: the calls below follow no link, as none is one
                link = e.is_symlink()
                is_dir = not link and e.is_dir()
            except OSError:
                link, is_dir = None, False
            if is_dir:
                try:
                    if not prefix and not belongs(name):
                        listed = _named_adapter(e.path, name) if holds_adapter else None
                        if listed is None:
                            # e.g. a Trainer output_dir that holds a final model and checkpoint-*/
                            if name != layout.TRASH_DIR and (admits is None or admits(e)):
                                nested.append(e.path)
                            continue
                    else:
                        listed = _list(e.path)
                    pending.append((f"{prefix}{name}/", listed))
                except OSError:
                    unreadable.append(prefix + name)
                continue
            try:
                if link is None:  # its type could not be told above: ask again, or fail here
                    link = e.is_symlink()
                if link:
                    st = e.stat(follow_symlinks=False)
                    mtime = st.st_mtime_ns
                    append(_symlink_row(e, prefix + name, root_real, st))
                else:
                    st = e.stat()
                    mtime = st.st_mtime_ns
                    # interned: checkpoints repeat their relpaths, so records share them
                    # (and a worker's results pickle each one once)
                    append((intern(prefix + name), st.st_size, st.st_blocks * 512, st.st_dev,
                            st.st_ino, st.st_nlink, mtime, False, None, False, None,
                            e.is_file(), st.st_uid))
            except FileNotFoundError:
                continue
            except OSError:
                unreadable.append(prefix + name)
                continue
            # the strip marker is written after the Trainer is done: it never makes a checkpoint young
            if mtime > newest and (prefix or not layout.is_strip_bookkeeping(name)):
                newest = mtime
    rows.sort()  # by relpath: unique within a checkpoint, so nothing else is compared
    rel = _rel(path, root_abs)
    try:
        dst = os.lstat(path)
        dev, ino = dst.st_dev, dst.st_ino
    except OSError:
        dev = ino = 0
    if path != root_abs:
        name = os.path.basename(path)
        run = _rel(os.path.dirname(path), root_abs)
    else:
        name = os.path.basename(root_real)
        run = "."
    if any(layout.is_checkpoint_name(os.path.basename(p)) for p in nested):
        run = rel  # a save_model output at a run's root, beside the run's checkpoints
    values = (root, rel, run, name, layout.checkpoint_step(name), tuple(rows), newest,
              layout.is_tmp_checkpoint_name(name), tuple(sorted(unreadable)), dev, ino)
    return values, nested


def _named_adapter(path: str, name: str) -> list[os.DirEntry] | None:
    """The entries of ``path``, a subdirectory of a checkpoint holding a PEFT adapter at its
    root, where it is one of the adapter's named siblings (PEFT saves every adapter but
    "default" in ``<name>/``); None where it is a directory of its own (a checkpoint)."""
    if layout.is_checkpoint_name(name):
        return None
    entries = _list(path)
    names = {e.name for e in entries}
    if layout.ADAPTER_CONFIG in names and layout.TRAINER_STATE_JSON not in names:
        return entries
    return None


def rescan_checkpoint(root: str, relpath: str) -> CheckpointDir:
    """Scan one checkpoint again, exactly as ``find_checkpoints`` saw it under ``root``.

    Used right before acting on a plan. Raises OSError when it cannot be listed.
    """
    root_abs = os.path.abspath(root)
    path = root_abs if relpath == "." else os.path.join(root_abs, *relpath.split("/"))
    ckpt, _ = _collect_checkpoint(root, root_abs, os.path.realpath(root_abs), path, _list(path))
    return ckpt


def trash_files(root: str, run: str) -> tuple[tuple[FileRecord, ...], list[Problem]]:
    """Every file in the trash of the run ``run`` (relative to ``root``), with relpaths
    relative to the run (``.ckpt-tools-trash/checkpoint-1.deleted-…/optimizer.pt``), and the
    problems of listing it: one ``lstat`` per entry, no link followed (a trash that is itself
    a symlink is not entered). No trash: nothing, no problem."""
    root_abs = os.path.abspath(root)
    run_abs = root_abs if run == "." else os.path.join(root_abs, *run.split("/"))
    trash = os.path.join(run_abs, layout.TRASH_DIR)
    if not os.path.isdir(trash) or os.path.islink(trash):
        return (), []
    root_real = os.path.realpath(root_abs)
    files: list[FileRecord] = []
    problems: list[Problem] = []
    pending = [(trash, layout.TRASH_DIR + "/")]
    while pending:
        path, prefix = pending.pop()
        try:
            entries = _list(path)
        except PermissionError:
            problems.append(Problem(PERMISSION_DENIED, _rel(path, root_abs),
                                    "cannot list the trash: permission denied"))
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):   # else purged during the scan
                problems.append(Problem(UNREADABLE, _rel(path, root_abs),
                                        f"cannot list the trash: {exc.strerror or exc}"))
            continue
        for e in entries:
            try:
                if _is_real_dir(e):
                    pending.append((e.path, f"{prefix}{e.name}/"))
                else:
                    files.append(_file_record(e, prefix + e.name, root_real))
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(Problem(UNREADABLE, _rel(e.path, root_abs),
                                        f"cannot stat a file in the trash: {exc.strerror or exc}"))
    files.sort()
    return tuple(files), problems


def iter_roots(roots) -> Iterator[str]:
    seen = set()
    for r in roots:
        real = os.path.realpath(r)
        if real in seen:
            continue
        seen.add(real)
        yield r
