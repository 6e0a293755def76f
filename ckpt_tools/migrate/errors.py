"""Why migrate stops: for the whole run (``MigrateError``), for one checkpoint
(``CheckpointFailure``, or ``NothingToMigrate`` where it is skipped), and what a failing disk
means, in words."""

from __future__ import annotations

import errno
import re

from .. import commit
from ..errors import UsageError
from ..fs import FileOps


class MigrateError(UsageError):
    """Migration cannot start at all (bad roots, DST inside SRC, ...)."""


class CheckpointFailure(Exception):
    """One checkpoint could not be migrated; the message is one clear line. ``fields`` are
    what its ``MigrateOutcome`` records besides (an svd extraction over --max-error: which
    modules, what would meet it)."""

    def __init__(self, message: str, *, fields: dict | None = None):
        super().__init__(message)
        self.fields = dict(fields or {})


class NothingToMigrate(CheckpointFailure):
    """What migrate found while reading a checkpoint says there is nothing to migrate (a plain
    model directory whose delta from --base-model is not low-rank: a full fine-tune): the
    checkpoint is skipped, not failed, and nothing of it is written. ``fields`` as above."""


STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EIO: "I/O error", errno.EROFS: "read-only file system",
                   errno.EFBIG: "file too large"}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def storage_error(exc: BaseException) -> str | None:
    """What a failed write or fsync means, in words ("no space left on device", "I/O error",
    ...), or None when ``exc`` is not the storage failing.

    Recognised from an ``OSError``, from safetensors' writer (a ``SafetensorError`` whose text
    ends in "(os error 28)") and from torch.save writing to a Python file (a ``RuntimeError``
    raised while the ``OSError`` was being handled).
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None and not isinstance(e, OSError):
            found = _OS_ERROR_CODE.search(str(e))
            code = int(found.group(1)) if found else None
        if code in STORAGE_ERRORS:
            return STORAGE_ERRORS[code]
        e = e.__cause__ or e.__context__
    return None


def discard_temporary(path: str, fs: FileOps, shown: str) -> str | None:
    """Remove a temporary directory (``commit.discard``); None once it is gone, else why it
    stays (the next migrate of that DST removes it: ``clean_stale``)."""
    error = commit.discard(path, fs)
    if error is None:
        return None
    why = storage_error(error) or (error.strerror or str(error)).lower()
    return (f"the temporary directory {shown} could not be removed ({why}: {error.filename}); "
            "the next migrate of this DST removes it")
