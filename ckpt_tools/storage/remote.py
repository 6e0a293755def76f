"""One scan's reads from object storage, through fsspec: a listing per root, ranged reads,
and the count of requests and bytes they cost.

A root is listed once (``fs.find(detail=True)``: S3 answers 1,000 keys a page, each with its
size and LastModified), and everything the scan asks about directories afterwards is answered
from that listing. Files are read by byte ranges (``fs.cat_file(path, start, end)``: one GET
with a Range header each), never whole unless small. Keys that a directory tree cannot hold
(``..``, ``.`` or empty segments, a key that is also a prefix of others) are reported as
problems and never read. Failures of the store reach the validator as ``OSError``: an object
gone since the listing is a ``FileNotFoundError`` (``missing-file``), anything else
``unreadable``.
"""

from __future__ import annotations

import errno
import math
import posixpath
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial

from ..errors import UsageError
from ..problems import UNREADABLE, Problem
from ..records import CheckpointDir
from ..scanner import ScanError


class ListingError(ScanError):
    """A root whose objects cannot be listed at all (missing bucket, no credentials)."""


@dataclass
class StorageCounts:
    """Requests sent and bytes received by one scan (thread-safe: ``--jobs`` reads in threads).
    ``requests`` counts listing requests, ranged reads and size lookups. ``listings`` counts
    the listing requests: on S3 each page of 1,000 keys the client asks for (counted as the
    client sends it), elsewhere one per listing."""

    requests: int = 0
    listings: int = 0
    reads: int = 0
    bytes_read: int = 0
    writes: int = 0    # prune's conditional PUTs and DELETEs (lock, intent records, deletes)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, listings: int = 0, reads: int = 0, nbytes: int = 0, writes: int = 0) -> None:
        with self._lock:
            self.requests += listings + reads + writes
            self.listings += listings
            self.reads += reads
            self.bytes_read += nbytes
            self.writes += writes

    def to_dict(self) -> dict:
        return {"requests": self.requests, "listings": self.listings, "reads": self.reads,
                "bytes_read": self.bytes_read, "writes": self.writes}


class Directory:
    """A directory as a listing implies it: files by name (size, mtime in ns, a number unique
    in the scan that stands for an inode) and subdirectories by name."""

    __slots__ = ("files", "dirs")

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int, int]] = {}
        self.dirs: dict[str, Directory] = {}

    def names(self) -> set[str]:
        return self.files.keys() | self.dirs.keys()


@dataclass(frozen=True)
class ObjectStat:
    """What ``os.stat`` would say of an object, for code that asks a ``DirEntry``."""

    st_size: int
    st_mtime_ns: int
    st_ino: int
    st_dev: int = 0
    st_nlink: int = 1

    @property
    def st_blocks(self) -> int:
        return -(-self.st_size // 512)


@dataclass(frozen=True)
class ObjectEntry:
    """An ``os.DirEntry`` of the listing: a file (an object) or a directory (a prefix)."""

    name: str
    path: str
    size_mtime_ino: tuple[int, int, int] | None   # None: a directory

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return self.size_mtime_ino is None

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return self.size_mtime_ino is not None

    def is_symlink(self) -> bool:
        return False

    def stat(self, follow_symlinks: bool = True) -> ObjectStat:
        if self.size_mtime_ino is None:
            return ObjectStat(0, 0, 0)
        return ObjectStat(*self.size_mtime_ino)


class ObjectStorage:
    """Reads of one scan from one fsspec file system; owned by the caller of the scan."""

    def __init__(self, fs, protocol: str):
        self.fs = fs
        self.protocol = protocol
        self.counts = StorageCounts()
        #: (root, checkpoint path) → what judging that checkpoint cost (``judging``)
        self.by_checkpoint: dict[tuple[str, str], StorageCounts] = {}
        self._judging = threading.local()   # this thread's checkpoint's counts, while judged
        self._trees: dict[str, Directory] = {}   # root path → its listing
        #: object path → its ETag, as the latest listing of it gave it (prune's conditions)
        self.etags: dict[str, str] = {}
        self._next_ino = 0
        self._pages = 0    # listing requests the client sent (S3: one per page)
        self._pages_seen = _on_listing_pages(fs, self._page)

    def _page(self, **_) -> None:
        self._pages += 1

    def _listed(self, find) -> dict:
        """``find()``'s listing, its requests counted: the pages the client sent where it
        says (S3), else one."""
        before = self._pages
        try:
            return find()
        finally:
            self._count(listings=max(self._pages - before, 1) if self._pages_seen else 1)

    @classmethod
    def for_urls(cls, urls: list[str], options: dict) -> ObjectStorage:
        """The storage of ``urls``, which must share one protocol (one file system)."""
        try:
            from fsspec.core import split_protocol
            from fsspec.registry import filesystem
        except ImportError:
            raise UsageError(f"{urls[0]}: reading URLs needs fsspec "
                             "(pip install 'ckpt-tools[s3]')") from None
        protocols = {split_protocol(u)[0] for u in urls}
        if len(protocols) > 1:
            raise UsageError(f"{urls[-1]}: URLs of one protocol only in one run "
                             f"(found {', '.join(sorted(protocols))})")
        protocol = protocols.pop()
        try:   # a file system of its own: no listing or client shared with another scan
            fs = filesystem(protocol, skip_instance_cache=True, **_fs_options(protocol, options))
        except ImportError as exc:
            raise UsageError(f"{urls[0]}: {protocol}:// needs a package that is not installed "
                             f"({exc.name or exc}; pip install 'ckpt-tools[s3]' for s3://)") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{urls[0]}: bad --storage-option: {exc}") from None
        return cls(fs, protocol)

    # --- paths ---------------------------------------------------------------------

    def root_path(self, url: str) -> str:
        """The file system's own path of a root URL (``s3://b/runs/`` → ``b/runs``)."""
        path = self.fs._strip_protocol(url)
        return path.rstrip("/") or path

    def path_of(self, ckpt: CheckpointDir) -> str:
        """Where the files of ``ckpt`` are, as this file system names them."""
        root = self.root_path(ckpt.root)
        return root if ckpt.path == "." else f"{root}/{ckpt.path}"

    # --- listing -------------------------------------------------------------------

    def list_root(self, url: str) -> tuple[Directory, list[Problem]]:
        """The listing of ``url`` as a tree, and the keys it cannot hold as problems. Raises
        ``ListingError`` when nothing can be listed there."""
        root = self.root_path(url)
        try:
            found = self._listed(lambda: self.fs.find(root, detail=True))
        except FileNotFoundError:
            found = {}
        except Exception as exc:   # the store's own errors (credentials, endpoint, bucket)
            raise ListingError(f"{url}: cannot list: {cause_of(exc)}") from None
        if not found:
            raise ListingError(f"{url}: no such file or directory (no object under it)")
        if set(found) == {root} and found[root].get("type") != "directory":
            raise ListingError(f"{url}: not a directory (an object)")
        top, problems = self._tree(root, found)
        self._trees[root] = top
        return top, problems

    def _tree(self, root: str, found: dict) -> tuple[Directory, list[Problem]]:
        top = Directory()
        problems: list[Problem] = []
        prefix = root + "/"
        for key in sorted(found):
            info = found[key]
            if info.get("type") == "directory" or not key.startswith(prefix):
                continue
            rel = key[len(prefix):]
            parts = rel.split("/")
            if not rel or rel.endswith("/") and not info.get("size"):
                continue   # a folder marker
            if any(p in ("", ".", "..") for p in parts):
                problems.append(Problem(UNREADABLE, rel, "object key with an empty, '.' or "
                                        "'..' segment: no directory tree holds it; not read"))
                continue
            self._next_ino += 1
            if info.get("ETag"):
                self.etags[key] = info["ETag"]
            _place(top, parts, (int(info.get("size") or 0), mtime_ns(info), self._next_ino),
                   rel, problems)
        return top, problems

    def relist(self, url: str, rel: str) -> tuple[Directory, list[Problem]]:
        """The directory ``rel`` of the root ``url`` listed again, now (one listing of its
        prefix, nothing cached), put in place of what the root's listing said of it; ETags
        and sizes are then the store's of this moment. ``FileNotFoundError`` when nothing
        is left under it."""
        root = self.root_path(url)
        if root not in self._trees:
            self.list_root(url)
        path = root if rel == "." else f"{root}/{rel}"
        self.fs.invalidate_cache(path)
        try:
            found = self._listed(lambda: self.fs.find(path, detail=True))
        except FileNotFoundError:
            found = {}
        except Exception as exc:   # the store's own errors
            raise OSError(errno.EIO, cause_of(exc), path) from None
        if not found:
            raise FileNotFoundError(errno.ENOENT, "nothing is left under it", path)
        node, problems = self._tree(path, found)
        if rel == ".":
            self._trees[root] = node
        else:
            parent = self.directory(posixpath.dirname(path))
            if parent is None:
                raise FileNotFoundError(errno.ENOENT, "its parent is gone from the listing", path)
            parent.dirs[posixpath.basename(path)] = node
        return node, problems

    def directory(self, path: str) -> Directory | None:
        """The listed directory at ``path`` (a path of this file system), or None."""
        path = posixpath.normpath(path)
        for root, top in self._trees.items():
            if path == root:
                return top
            if path.startswith(root + "/"):
                node = top
                for part in path[len(root) + 1:].split("/"):
                    node = node.dirs.get(part)
                    if node is None:
                        return None
                return node
        return None

    def scandir(self, path: str) -> list[ObjectEntry]:
        """``os.scandir(path)`` from the listing; ``FileNotFoundError`` where it holds no such
        directory."""
        node = self.directory(path)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory in the listing", path)
        return ([ObjectEntry(n, f"{path}/{n}", None) for n in node.dirs]
                + [ObjectEntry(n, f"{path}/{n}", v) for n, v in node.files.items()])

    def isdir(self, path: str) -> bool:
        return self.directory(path) is not None

    @contextmanager
    def judging(self, ckpt: CheckpointDir):
        """Count the reads this thread makes meanwhile as ``ckpt``'s too (``by_checkpoint``)."""
        counts = self.by_checkpoint[ckpt.root, ckpt.path] = StorageCounts()
        self._judging.counts = counts
        try:
            yield counts
        finally:
            self._judging.counts = None

    def count_request(self, operation: str) -> None:
        """One request prune sent through ``ConditionalStore``: a PUT or DELETE is a write,
        anything else (the lock's GET, the bucket's versioning) a read of no counted bytes."""
        if operation in ("put_object", "delete_object"):
            self.counts.add(writes=1)
        else:
            self.counts.add(reads=1)

    def _count(self, *, listings: int = 0, reads: int = 0, nbytes: int = 0) -> None:
        self.counts.add(listings=listings, reads=reads, nbytes=nbytes)
        mine = getattr(self._judging, "counts", None)
        if mine is not None:
            mine.add(listings=listings, reads=reads, nbytes=nbytes)

    # --- reads ---------------------------------------------------------------------

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the object ``path`` at ``offset``: one ranged GET."""
        if length <= 0:
            return b""
        try:
            data = self.fs.cat_file(posixpath.normpath(path), start=offset, end=offset + length)
        except OSError:
            self._count(reads=1)
            raise
        except Exception as exc:   # the store's own errors: the file is unreadable, the scan goes on
            self._count(reads=1)
            raise OSError(errno.EIO, cause_of(exc), path) from None
        self._count(reads=1, nbytes=len(data))
        if len(data) > length:
            raise OSError(errno.EIO, f"the store answered {len(data)} bytes to a range of "
                                     f"{length}: it ignored the range", path)
        return data

    def reader(self, path: str, size: int | None) -> tuple[int, partial]:
        """(the object's size, a ``ReadAt`` of it): the size the listing gave, else one
        lookup (a file found by a reader outside the listing). Nothing past that size is
        asked for: the object is read as it was listed (an empty one costs no request)."""
        if size is None:
            size = self._size(path)
        return size, partial(_read_at, self, posixpath.normpath(path), size)

    def _size(self, path: str) -> int:
        try:
            info = self.fs.info(posixpath.normpath(path))
        except OSError:
            raise
        except Exception as exc:
            raise OSError(errno.EIO, cause_of(exc), path) from None
        finally:
            self._count(reads=1)
        if info.get("type") == "directory":
            raise FileNotFoundError(errno.ENOENT, "a prefix, not an object", path)
        return int(info.get("size") or 0)


def _read_at(storage: ObjectStorage, path: str, size: int, n: int, offset: int) -> bytes:
    return storage.read_range(path, offset, min(n, size - offset))


_BOTH = "an object and a prefix of other keys share this name: the object is not read"


def _place(top: Directory, parts: list[str], value: tuple[int, int, int], rel: str,
           problems: list[Problem]) -> None:
    """Put a file into the tree; a key that is both an object and a prefix of others (S3 allows
    ``a`` beside ``a/b``) keeps the prefix, and the object is a problem."""
    node = top
    for i, part in enumerate(parts[:-1]):
        if part in node.files:
            del node.files[part]
            problems.append(Problem(UNREADABLE, "/".join(parts[:i + 1]), _BOTH))
        node = node.dirs.setdefault(part, Directory())
    name = parts[-1]
    if name in node.dirs:
        problems.append(Problem(UNREADABLE, rel, _BOTH))
        return
    node.files[name] = value


_MTIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "modified", "created")


def mtime_ns(info: dict) -> int:
    """The modification time of a listed object in ns since the epoch (S3's LastModified,
    GCS's updated, ...); 0 where the listing gives none."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return int(value * 1e9)
    return 0


def _on_listing_pages(fs, callback) -> bool:
    """Have ``callback`` called on each listing request an S3 file system's client sends (s3fs
    pages a long listing 1,000 keys a request); False where the file system has no such client
    (then a listing counts as one request)."""
    if not hasattr(fs, "set_session"):
        return False
    try:
        from fsspec.asyn import sync
        client = sync(fs.loop, fs.set_session)
        client.meta.events.register("before-call.s3.ListObjectsV2", callback)
    except Exception:  # noqa: BLE001 - no client yet (bad options): the listing says why
        return False
    return True


def _fs_options(protocol: str, options: dict) -> dict:
    """s3fs takes the endpoint both as ``endpoint_url`` and in ``client_kwargs``; the latter
    is what every release honours."""
    options = dict(options)
    if protocol in ("s3", "s3a") and "endpoint_url" in options:
        client = dict(options.get("client_kwargs") or {})
        client.setdefault("endpoint_url", options.pop("endpoint_url"))
        options["client_kwargs"] = client
    return options


def cause_of(exc: BaseException) -> str:
    """The first line of what ``exc`` says, else its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["ObjectStorage", "StorageCounts", "Directory", "ObjectEntry", "ListingError", "mtime_ns"]
