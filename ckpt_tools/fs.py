"""The file operations ckpt-tools does to storage, behind one seam (``FileOps``).

Used today by everything that changes storage: prune's unlinks (``prune.execute``), and the
writes, fsyncs, renames and removals of migrate (``migrate.write``), of the Trainer callback
(``integrations.transformers``) and of the low-rank writer (``migrate.lowrank.write_adapter``), all
three through ``commit``. Reads (scanner, validator, format readers, migrate's extraction)
do not go through it yet.

A backend says what it can do: ``atomic_rename`` (a directory renamed into place appears
whole or not at all) and ``durable_fsync`` (an fsync makes what was written survive a crash).
``commit`` consults them: object storage has neither, and commits with a marker file instead.

Every function of the library that changes storage takes ``fs=None``, meaning ``LOCAL``.
Tests pass a faulty implementation (``tests/faulty_fs.py``); nothing here reads a test hook.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from typing import Protocol


class FileOps(Protocol):
    """What the library does to storage. Paths are strings; ``dir_fd`` (where taken) is an
    open directory the path is relative to, for backends that have one (local)."""

    atomic_rename: bool
    durable_fsync: bool

    def listdir(self, path: str) -> list[str]: ...
    def lstat(self, path: str, *, dir_fd: int | None = None) -> os.stat_result: ...
    def read_range(self, path: str, offset: int, length: int) -> bytes: ...
    def mkdir(self, path: str) -> None: ...
    def makedirs(self, path: str) -> None: ...

    def write_file(self, path: str, produce: Callable[[str], None]) -> None:
        """Create the file ``path`` by ``produce(path)`` (a library's own writer: safetensors,
        torch.save, PEFT); a backend without local files stages it and uploads it."""

    def write_bytes(self, path: str, data: bytes) -> None: ...
    def copy_file(self, src: str, dst: str) -> None: ...
    def link(self, src: str, dst: str) -> None: ...
    def fsync(self, path: str, *, directory: bool = False) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str, *, dir_fd: int | None = None) -> None: ...
    def rmdir(self, path: str) -> None: ...


# errnos by which a file system says it cannot fsync a directory at all (not that it failed)
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF})


class LocalFileOps:
    """A POSIX file system, through ``os``."""

    atomic_rename = True
    durable_fsync = True

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def lstat(self, path: str, *, dir_fd: int | None = None) -> os.stat_result:
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=False)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def write_file(self, path: str, produce: Callable[[str], None]) -> None:
        produce(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        with open(path, "wb") as fh:
            fh.write(data)

    def copy_file(self, src: str, dst: str) -> None:
        shutil.copyfile(src, dst)      # follows a symlink: its content
        try:
            shutil.copystat(src, dst)  # mode and times: carried files stay byte-and-stat equal
        except OSError:
            pass

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def fsync(self, path: str, *, directory: bool = False) -> None:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        except OSError as exc:
            # some file systems cannot fsync a directory at all; a failing disk (EIO) still fails
            if not (directory and exc.errno in _DIR_FSYNC_UNSUPPORTED):
                raise
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str, *, dir_fd: int | None = None) -> None:
        os.unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)


LOCAL = LocalFileOps()


def local_or(fs: FileOps | None) -> FileOps:
    return LOCAL if fs is None else fs


def walk_bottom_up(top: str):
    """``os.walk(top, topdown=False)``, symlinks to directories listed as files."""
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        yield dirpath, [d for d in dirnames if d not in links], filenames + links


def remove_tree(path: str, fs: FileOps | None = None) -> OSError | None:
    """Remove ``path`` and everything under it, going on past errors; the first error, or
    None once it is gone. A symlink is removed itself, never followed."""
    fs = local_or(fs)
    first: OSError | None = None

    def remove(p: str, rm: Callable[[str], None]) -> None:
        nonlocal first
        try:
            rm(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            first = first or exc

    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        remove(path, fs.unlink)
        return first
    for dirpath, _dirs, files in walk_bottom_up(path):
        for name in files:
            remove(os.path.join(dirpath, name), fs.unlink)
        remove(dirpath, fs.rmdir)
    return first if os.path.lexists(path) else None


class SyncError(OSError):
    """An fsync failed: ``filename`` is what was being synced, ``directory`` whether it is a
    directory (so a caller can say "syncing the directory ...")."""

    directory: bool = False


def fsync(path: str, fs: FileOps | None = None, *, directory: bool = False) -> None:
    """``fs.fsync``, its failure a ``SyncError`` naming ``path``."""
    try:
        local_or(fs).fsync(path, directory=directory)
    except OSError as exc:
        err = SyncError(exc.errno, exc.strerror or str(exc), path)
        err.directory = directory
        raise err from exc


def fsync_tree(top: str, fs: FileOps | None = None) -> None:
    """fsync every file and directory under ``top``, each directory after what it holds
    (symlinks are not synced: their targets are not ours); a failure is a ``SyncError``."""
    for dirpath, _dirs, files in walk_bottom_up(top):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync(p, fs)
        fsync(dirpath, fs, directory=True)


__all__ = ["FileOps", "LocalFileOps", "LOCAL", "local_or", "remove_tree", "fsync", "fsync_tree",
           "SyncError", "walk_bottom_up"]
