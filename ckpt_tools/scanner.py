"""Find runs and checkpoints under a root, with one ``lstat`` per entry and no file opened.

The walk uses ``os.scandir``, never follows a symlink (a symlink is recorded as
what it is, with where it points), and never leaves the root.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from . import layout
from .problems import PERMISSION_DENIED, UNREADABLE, Problem
from .records import CheckpointDir, FileRecord


class ScanError(Exception):
    """A root that cannot be scanned at all (missing, not a directory, unreadable)."""


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return "." if rel == "." else rel.replace(os.sep, "/")


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def _file_record(entry: os.DirEntry, relpath: str, root_real: str) -> FileRecord:
    st = entry.stat(follow_symlinks=False)
    target = None
    escapes = False
    target_size = None
    is_link = entry.is_symlink()
    if is_link:
        resolved = os.path.realpath(entry.path)
        escapes = not _inside(resolved, root_real)
        if os.path.lexists(resolved) and os.path.exists(resolved):
            target = resolved
            if not escapes:
                try:
                    target_size = os.stat(resolved).st_size
                except OSError:
                    target_size = None
    return FileRecord(
        relpath=relpath, size=st.st_size, allocated=st.st_blocks * 512,
        dev=st.st_dev, ino=st.st_ino, nlink=st.st_nlink, mtime_ns=st.st_mtime_ns,
        is_symlink=is_link, symlink_target=target, escapes_root=escapes,
        target_size=target_size,
    )


def _list(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return list(it)


def find_checkpoints(root: str) -> tuple[list[CheckpointDir], list[Problem]]:
    """Walk ``root`` and return every checkpoint directory found, plus scan problems.

    Raises ScanError only when the root itself cannot be scanned.
    """
    root_abs = os.path.abspath(root)
    if not os.path.lexists(root_abs):
        raise ScanError(f"{root}: no such file or directory")
    if not os.path.isdir(root_abs):
        raise ScanError(f"{root}: not a directory")
    root_real = os.path.realpath(root_abs)
    checkpoints: list[CheckpointDir] = []
    problems: list[Problem] = []
    try:
        first = _list(root_abs)
    except PermissionError:
        raise ScanError(f"{root}: permission denied") from None
    except OSError as exc:
        raise ScanError(f"{root}: {exc.strerror or exc}") from None

    stack: list[tuple[str, list[os.DirEntry] | None]] = [(root_abs, first)]
    while stack:
        path, entries = stack.pop()
        if entries is None:
            try:
                entries = _list(path)
            except PermissionError:
                problems.append(Problem(PERMISSION_DENIED, _rel(path, root_abs),
                                        "cannot list directory: permission denied"))
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # vanished during the scan
                problems.append(Problem(UNREADABLE, _rel(path, root_abs),
                                        f"cannot list directory: {exc.strerror or exc}"))
                continue
        name = os.path.basename(path) if path != root_abs else os.path.basename(root_real)
        names = {e.name for e in entries}
        is_ckpt = (layout.is_checkpoint_name(name) or layout.marks_checkpoint(names)) \
            and name not in layout.CHECKPOINT_SUBDIRS
        if is_ckpt:
            ckpt, nested = _collect_checkpoint(root, root_abs, root_real, path, entries)
            checkpoints.append(ckpt)
            stack.extend((p, None) for p in reversed(nested))
            continue
        subdirs = [e.path for e in entries if _is_real_dir(e)]
        stack.extend((p, None) for p in sorted(subdirs, reverse=True))
    checkpoints.sort(key=lambda c: (c.run, c.step if c.step is not None else -1, c.path))
    return checkpoints, problems


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _collect_checkpoint(root: str, root_abs: str, root_real: str, path: str,
                        entries: list[os.DirEntry]) -> tuple[CheckpointDir, list[str]]:
    """All files of one checkpoint; directories that are checkpoints themselves are returned."""
    files: list[FileRecord] = []
    nested: list[str] = []
    unreadable: list[str] = []
    newest = 0  # files only: a directory's mtime also moves when prune unlinks from it
    pending: list[tuple[str, list[os.DirEntry]]] = [("", entries)]
    while pending:
        prefix, ents = pending.pop()
        for e in ents:
            if layout.is_own_bookkeeping(e.name):
                continue
            rel = prefix + e.name
            if _is_real_dir(e):
                if prefix == "" and e.name not in layout.CHECKPOINT_SUBDIRS:
                    # e.g. a Trainer output_dir that holds a final model and checkpoint-*/
                    nested.append(e.path)
                    continue
                try:
                    pending.append((rel + "/", _list(e.path)))
                except PermissionError:
                    unreadable.append(rel)
                except OSError:
                    unreadable.append(rel)
                continue
            try:
                rec = _file_record(e, rel, root_real)
            except FileNotFoundError:
                continue
            except OSError:
                unreadable.append(rel)
                continue
            newest = max(newest, rec.mtime_ns)
            files.append(rec)
    files.sort(key=lambda f: f.relpath)
    rel = _rel(path, root_abs)
    try:
        dst = os.stat(path, follow_symlinks=False)
        dev, ino = dst.st_dev, dst.st_ino
    except OSError:
        dev = ino = 0
    parent = os.path.dirname(path) if path != root_abs else path
    name = os.path.basename(path) if path != root_abs else os.path.basename(root_real)
    ckpt = CheckpointDir(
        root=root, path=rel, run=_rel(parent, root_abs) if path != root_abs else ".",
        name=name, step=layout.checkpoint_step(name), files=tuple(files),
        newest_mtime_ns=newest, tmp_name=layout.is_tmp_checkpoint_name(name),
        unreadable=tuple(sorted(unreadable)), dev=dev, ino=ino,
    )
    return ckpt, nested


def rescan_checkpoint(root: str, relpath: str) -> CheckpointDir:
    """Scan one checkpoint again, exactly as ``find_checkpoints`` saw it under ``root``.

    Used right before acting on a plan. Raises OSError when it cannot be listed.
    """
    root_abs = os.path.abspath(root)
    path = root_abs if relpath == "." else os.path.join(root_abs, *relpath.split("/"))
    ckpt, _ = _collect_checkpoint(root, root_abs, os.path.realpath(root_abs), path, _list(path))
    return ckpt


def iter_roots(roots) -> Iterator[str]:
    seen = set()
    for r in roots:
        real = os.path.realpath(r)
        if real in seen:
            continue
        seen.add(real)
        yield r
