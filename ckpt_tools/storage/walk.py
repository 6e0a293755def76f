"""Checkpoints under a root in a bucket, found in its listing by the scanner's rules.

The same decisions as ``scanner.walk`` and ``scanner.collect_rows`` (which directories are
checkpoints, which subdirectories belong to one, what is a nested checkpoint, what is
ckpt-tools' own bookkeeping), made on the tree ``ObjectStorage.list_root`` built from one
listing instead of on ``os.scandir``. Objects have no links, owners or blocks: a file's
allocated size is its size, its owner unknown, its inode a number unique in the scan.
"""

from __future__ import annotations

import posixpath
from sys import intern
from typing import NamedTuple

from .. import layout
from ..problems import Problem
from ..records import CheckpointDir
from ..scanner import WalkOptions, checkpoint_order
from .remote import Directory, ObjectStorage


class _Entry(NamedTuple):
    """What ``WalkOptions.admits`` asks of a directory entry."""

    name: str
    path: str


def find_checkpoints(storage: ObjectStorage, root: str, options: WalkOptions = WalkOptions()
                     ) -> tuple[list[CheckpointDir], list[Problem]]:
    """``scanner.find_checkpoints`` of a root URL: one listing, no object read. ``options``:
    its ``exclude`` patterns apply; ``one_file_system`` has nothing to leave out in a bucket.
    Raises ``remote.ListingError`` when the root cannot be listed."""
    top, problems = storage.list_root(root)
    root_path = storage.root_path(root)
    admits = WalkOptions(exclude=options.exclude).admits(root_path)

    def admitted(rel: str, name: str) -> bool:
        return admits is None or admits(_Entry(name, f"{root_path}/{rel}"))

    checkpoints: list[CheckpointDir] = []
    stack: list[tuple[str, Directory]] = [(".", top)]
    while stack:
        rel, node = stack.pop()
        name = posixpath.basename(root_path) if rel == "." else posixpath.basename(rel)
        if ((layout.is_checkpoint_name(name) or layout.marks_checkpoint(node.names()))
                and name not in layout.CHECKPOINT_SUBDIRS):
            values, nested = _collect(root, rel, name, node, admitted)
            checkpoints.append(CheckpointDir.from_values(values))
            stack.extend(reversed(nested))
            continue
        subdirs = [(_join(rel, n), d) for n, d in node.dirs.items()
                   if n not in (layout.TRASH_DIR, layout.INTENT_DIR) and admitted(_join(rel, n), n)]
        stack.extend(sorted(subdirs, key=lambda s: s[0], reverse=True))
    checkpoints.sort(key=checkpoint_order)
    return checkpoints, problems


def rescan_checkpoint(storage: ObjectStorage, root: str, rel: str) -> CheckpointDir:
    """``scanner.rescan_checkpoint`` in a bucket: the checkpoint ``rel`` of the root URL
    ``root`` as a new listing of its prefix finds it now (``ObjectStorage.relist``)."""
    node, _ = storage.relist(root, rel)
    name = posixpath.basename(storage.root_path(root)) if rel == "." else posixpath.basename(rel)
    values, _ = _collect(root, rel, name, node, lambda _rel, _name: True)
    return CheckpointDir.from_values(values)


def _join(rel: str, name: str) -> str:
    return name if rel == "." else f"{rel}/{name}"


def _collect(root: str, rel: str, name: str, node: Directory, admitted
             ) -> tuple[tuple, list[tuple[str, Directory]]]:
    """``scanner.collect_rows`` of a listed checkpoint directory: its CheckpointDir's values,
    and the nested directories that are checkpoints of their own."""
    rows: list[tuple] = []
    nested: list[tuple[str, Directory]] = []
    newest = 0
    own = layout.is_own_bookkeeping
    holds_adapter = layout.ADAPTER_CONFIG in node.names()
    pending: list[tuple[str, Directory]] = [("", node)]
    while pending:
        prefix, here = pending.pop()
        for dname, sub in here.dirs.items():
            if own(dname):
                continue
            if (not prefix and not layout.belongs_to_checkpoint(dname)
                    and not (holds_adapter and _named_adapter(dname, sub))):
                # e.g. a Trainer output_dir that holds a final model and checkpoint-*/
                if dname != layout.TRASH_DIR and admitted(_join(rel, dname), dname):
                    nested.append((_join(rel, dname), sub))
                continue
            pending.append((f"{prefix}{dname}/", sub))
        for fname, (size, mtime, ino) in here.files.items():
            if own(fname):
                continue
            rows.append((intern(prefix + fname), size, size, 0, ino, 1, mtime, False, None,
                         False, None, True, None))
            # the strip marker is written after the Trainer is done: it never makes a checkpoint young
            if mtime > newest and (prefix or not layout.is_strip_bookkeeping(fname)):
                newest = mtime
    rows.sort()
    run = "." if rel == "." else (posixpath.dirname(rel) or ".")
    if any(layout.is_checkpoint_name(posixpath.basename(p)) for p, _ in nested):
        run = rel  # a save_model output at a run's root, beside the run's checkpoints
    values = (root, rel, run, name, layout.checkpoint_step(name), tuple(rows), newest,
              layout.is_tmp_checkpoint_name(name), (), 0, 0)
    return values, nested


def _named_adapter(name: str, sub: Directory) -> bool:
    """``scanner._named_adapter``: a subdirectory holding one of the adapter's named siblings."""
    if layout.is_checkpoint_name(name):
        return False
    names = sub.names()
    return layout.ADAPTER_CONFIG in names and layout.TRAINER_STATE_JSON not in names


__all__ = ["find_checkpoints", "rescan_checkpoint"]
