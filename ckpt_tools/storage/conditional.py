"""Conditional writes and deletes in a bucket: what prune needs of object storage to keep its
promises, and the one refusal where a store does not offer them.

A bucket has no rename, no directory and no ``flock``; what it can promise is a condition on
each request, checked by the store itself: a PUT that creates only where nothing is
(``If-None-Match: *``), a PUT or a DELETE that acts only on the object whose ETag it names
(``If-Match``). S3 offers both (through the s3fs client: ``fs.call_s3``, since s3fs's own
``rm`` and ``pipe`` send no condition); other fsspec stores are refused for prune.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import UsageError

#: fsspec protocols whose store takes a condition on PUT and DELETE
CONDITIONAL_PROTOCOLS = ("s3", "s3a")
_CHANGED_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = "NoSuchBucket"


class ConditionsIgnored(UsageError):
    """The store carried out a request whose condition did not hold: it ignores conditions
    (older MinIO and Ceph releases do), so prune cannot keep its promises there (exit 2)."""


class PreconditionFailed(Exception):
    """The store refused a conditional request: the object is not the one named (its ETag
    differs: it changed), or one exists where a create wanted none."""


def refuse_unless_conditional(protocol: str, url: str) -> None:
    """Raise ``UsageError`` (exit 2) unless ``url``'s store offers conditional deletes."""
    if protocol not in CONDITIONAL_PROTOCOLS:
        raise UsageError(f"{url}: prune needs conditional deletes, which this storage does "
                         "not offer")


def split_key(path: str) -> tuple[str, str]:
    """(bucket, key) of an s3fs path (``bucket/runs/a`` → ``bucket``, ``runs/a``)."""
    bucket, _, key = path.partition("/")
    return bucket, key


class ConditionalStore:
    """Conditional requests on one S3 file system (an ``s3fs.S3FileSystem``). Paths are the
    file system's own (``bucket/key``). Failures: ``PreconditionFailed`` (the condition did
    not hold), ``FileNotFoundError`` (no such object), ``OSError`` (anything else, its cause
    in one line)."""

    def __init__(self, fs, counted: Callable[[str], None] | None = None):
        self.fs = fs
        self.counted = counted   # called with the operation of each request sent (the run's counts)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        bucket, key = split_key(path)
        if self.counted is not None:
            self.counted(method)
        try:
            return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except Exception as exc:  # noqa: BLE001 - s3fs translates some errors, not all
            raise _translated(exc, path) from None

    def create(self, path: str, body: bytes) -> str:
        """Write ``body`` at ``path`` only where no object is; its ETag."""
        return self._call("put_object", path, Body=body, IfNoneMatch="*")["ETag"]

    def replace(self, path: str, body: bytes, etag: str) -> str:
        """Overwrite the object at ``path`` only while its ETag is ``etag``; the new ETag."""
        return self._call("put_object", path, Body=body, IfMatch=etag)["ETag"]

    def put(self, path: str, body: bytes) -> str:
        """Write ``body`` at ``path`` whatever is there (a run's own object, such as a strip
        marker); its ETag."""
        return self._call("put_object", path, Body=body)["ETag"]

    def delete(self, path: str, etag: str) -> None:
        """Delete the object at ``path`` only while its ETag is ``etag``."""
        self._call("delete_object", path, IfMatch=etag)

    def get(self, path: str) -> tuple[bytes, str, float]:
        """(the object's bytes, its ETag, its LastModified in seconds since the epoch)."""
        from fsspec.asyn import sync
        answer = self._call("get_object", path)
        try:
            data = sync(self.fs.loop, answer["Body"].read)   # aiobotocore's body, on s3fs's loop
        except Exception as exc:  # noqa: BLE001
            raise _translated(exc, path) from None
        modified = answer.get("LastModified")
        return data, answer["ETag"], modified.timestamp() if modified is not None else 0.0

    def versioning(self, bucket: str) -> str:
        """The bucket's versioning status: ``Enabled``, ``Suspended`` or "" (never enabled)."""
        if self.counted is not None:
            self.counted("get_bucket_versioning")
        try:
            answer = self.fs.call_s3("get_bucket_versioning", Bucket=bucket)
        except Exception as exc:  # noqa: BLE001
            raise _translated(exc, bucket) from None
        return answer.get("Status", "")


def _code(exc: BaseException) -> str:
    """The S3 error code (or HTTP status) behind ``exc`` or its causes, "" if none."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            code = str(error.get("Code") or "")
            if code in _CHANGED_CODES or code in _MISSING_CODES or code == _NO_BUCKET:
                return code
            return str(status or code)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return ""


def _translated(exc: BaseException, path: str) -> Exception:
    code = _code(exc)
    if code in _CHANGED_CODES:
        return PreconditionFailed(f"{path}: changed (the store refused the condition)")
    if code == _NO_BUCKET:
        return FileNotFoundError(errno.ENOENT, "no such bucket", path)
    if code in _MISSING_CODES or isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, "no such object", path)
    text = str(exc).strip().splitlines()
    return OSError(errno.EIO, text[0] if text else type(exc).__name__, path)


__all__ = ["ConditionalStore", "PreconditionFailed", "CONDITIONAL_PROTOCOLS",
           "refuse_unless_conditional", "split_key"]
