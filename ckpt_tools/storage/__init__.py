"""Where a scan reads from: local paths, or objects behind an fsspec URL (``s3://``, ``gs://``,
``memory://``...).

Local paths have no storage object: the scanner walks them with ``os.scandir`` and the
readers ``pread`` them, as always (``storage=None`` everywhere means that). A URL gets one
``remote.ObjectStorage`` per scan, created by the caller and passed down explicitly as the
``ReadCache`` is: it lists each root once, reads byte ranges, and counts the requests and
bytes (``StorageCounts``). ``file://`` URLs are local paths. This module imports nothing
heavy: the command line asks it what a root is before anything else is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from .remote import ObjectStorage

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILE_URL = "file://"


def is_url(root: str) -> bool:
    """Whether ``root`` names objects through fsspec (``s3://b/runs``) rather than a local path
    (``file://`` URLs are local paths)."""
    return bool(_URL.match(root)) and not root.startswith(_FILE_URL)


def local_path(root: str) -> str:
    """``root`` with a ``file://`` prefix taken off: file URLs take the local code path."""
    return root[len(_FILE_URL):] or "/" if root.startswith(_FILE_URL) else root


def parse_storage_options(pairs: Iterable[str]) -> dict:
    """``--storage-option KEY=VALUE`` pairs as the keyword arguments of an fsspec file system:
    ``true``/``false`` become booleans and integers ints, as s3fs expects (``anon=true``); a
    dotted key nests (``client_kwargs.region_name=eu-west-1``). Raises ``ValueError`` for a
    pair without ``=``."""
    options: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        *outer, last = key.split(".")
        into = options
        for part in outer:
            into = into.setdefault(part, {})
            if not isinstance(into, dict):
                raise ValueError(f"{key!r}: {part!r} is given a value and keys at once")
        into[last] = _option_value(text)
    return options


def _option_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def open_storage(roots: Iterable[str], options: dict | None = None
                 ) -> tuple[tuple[str, ...], ObjectStorage | None]:
    """(the roots, with ``file://`` ones as local paths; the storage the scan of them reads
    through, None when they are local paths). Raises ``UsageError`` when local paths and URLs
    are mixed, when URLs of different file systems are, or when fsspec (or the package of
    the URL's protocol, such as s3fs) is missing."""
    roots = tuple(local_path(r) for r in roots)
    urls = [r for r in roots if is_url(r)]
    if not urls:
        if options:
            raise UsageError("--storage-option applies to URLs only (s3://..., gs://...)")
        return roots, None
    if len(urls) != len(roots):
        local = next(r for r in roots if not is_url(r))
        raise UsageError(f"{local}: local paths and URLs cannot be scanned in one run")
    from .remote import ObjectStorage
    return roots, ObjectStorage.for_urls(urls, options or {})


def refuse_urls(roots: Iterable[str], command: str) -> None:
    """Raise ``UsageError`` naming the first URL among ``roots``: ``command`` does not act on
    object storage (yet)."""
    for root in roots:
        if is_url(root):
            raise UsageError(f"{root}: {command} on object storage is not supported yet")


__all__ = ["is_url", "local_path", "parse_storage_options", "open_storage", "refuse_urls"]
