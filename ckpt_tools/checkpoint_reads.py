"""The validator's reads of a checkpoint's files, through a ``ReadCache`` when one is given.

JSON configs (parsed once per distinct bytes), safetensors headers (the first read sized by
the header last read at the same relpath), torch.save files, and the content token that
stands for a torch.save file's inspection in a replay recipe (``replay``). With
``cache=None`` each is a plain read and parse. The same bytes are read either way.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .formats import safetensors_header as st
from .formats import torchsave
from .read_cache import ReadCache, bounded_put
from .records import FileRecord

if TYPE_CHECKING:
    from .storage.remote import ObjectStorage

MAX_JSON_BYTES = 16 * 1024 * 1024
_MAX_CACHED_JSON = 1 << 16
_TOKEN_MAX_NODES = 512


def parse_json(raw: bytes, cache: ReadCache | None):
    """JSON object or an error string; memoised on the bytes (configs repeat across a run)."""
    memo = None if cache is None else cache.json
    hit = None if memo is None else memo.get(raw)
    if hit is not None:
        return hit
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        value = "not UTF-8 text"
    except RecursionError:
        value = "JSON nested too deeply"
    except ValueError as exc:
        value = f"invalid JSON: {exc}"
    else:
        if not isinstance(value, dict):
            value = f"expected a JSON object, found {type(value).__name__}"
    if memo is not None and len(raw) <= _MAX_CACHED_JSON:
        bounded_put(memo, raw, value)
    return value


def read_json_bytes(path: str, file_size: int | None, storage: ObjectStorage | None = None
                    ) -> bytes:
    """The file's bytes, or its first MAX_JSON_BYTES + 1 when it is larger. ``file_size``
    as for ``st.open_regular``; ``storage``: the scan's object storage (None: a local path)."""
    if storage is None:
        return st.read_bounded(path, MAX_JSON_BYTES, file_size)
    size, read_at = storage.reader(path, file_size)
    return st.read_bounded(path, MAX_JSON_BYTES, size, read_at)


def read_header(path: str, relpath: str, file_size: int | None, cache: ReadCache | None,
                storage: ObjectStorage | None = None):
    """``st.read_header``; with a cache, the first read is sized by the header last read at
    this relpath: a run's checkpoints repeat their headers, so it takes one ``pread`` of about
    its own size rather than 64 KiB, and bytes equal to that header's (same file size) are
    that header, without hashing them for ``st.parse_cached``. ``storage`` as for
    ``read_json_bytes``."""
    read_at = None
    if storage is not None:
        file_size, read_at = storage.reader(path, file_size)
    if cache is None:
        return st.read_header(path, file_size=file_size, read_at=read_at)
    hints = cache.header_hints
    hint = hints.get(relpath)  # (first read size, header bytes, file size, header)
    first = st.FIRST_READ_BYTES if hint is None else hint[0]
    if storage is not None:
        # in a bucket a second request costs more than 64 KiB: never a first read shorter
        first = max(first, st.FIRST_READ_BYTES)
    data, size = st.read_header_bytes(path, file_size=file_size, first_read=first,
                                      read_at=read_at)
    if hint is not None and size == hint[2] and data.startswith(hint[1]):
        return hint[3]
    header = st.parse_cached(data, size, cache.headers)
    end = 8 + header.header_len
    bounded_put(hints, relpath, ((end + 4095) // 4096 * 4096, data[:end], size, header))
    return header


def inspect_torch(path: str, check_pickle, file_size: int | None, cache: ReadCache | None,
                  storage: ObjectStorage | None = None):
    """``torchsave.inspect_torch_file``, shared through the cache (never mutate the result).
    ``storage`` as for ``read_json_bytes``."""
    read_at = None
    if storage is not None:
        file_size, read_at = storage.reader(path, file_size)
    return torchsave.inspect_torch_file(path, check_pickle=check_pickle, shared=True,
                                        file_size=file_size, cache=cache, read_at=read_at)


class _NoToken(Exception):
    pass


def torch_token(info, cache: ReadCache):
    """One shared object for every ``TorchFileInfo`` of equal content (types included), or
    None for one too large or holding what this does not compare."""
    token_of = cache.token_of  # id(info) → (info, token): infos the reader shares repeat
    hit = token_of.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1]
    token = _torch_token_of(info, cache.torch_tokens)
    if token is not None:  # then info is small
        bounded_put(token_of, id(info), (info, token))  # holds info: its id stays its own
    return token


def _torch_token_of(info, tokens: dict):
    budget = [_TOKEN_MAX_NODES]
    try:
        key = (info.format, info.record_prefix, _canon(info.obj, budget),
               _canon(info.storages, budget))
    except _NoToken:
        return None
    token = tokens.get(key)
    if token is None:
        token = key
        bounded_put(tokens, key, token)
    return token


_EXACT = frozenset({str, int, bytes, type(None)})  # values of these types equal only their own type's


def _canon(x, budget: list):
    """A hashable form of an object tree in which equal means same types and same values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _NoToken
    t = type(x)
    if t in _EXACT or t is bool:
        return (t, x)
    if t is float:
        return (t, x.hex())
    if t is dict:
        return (t, tuple((_canon(k, budget), _canon(v, budget)) for k, v in x.items()))
    if t is list or t is tuple:
        if all(type(v) in _EXACT for v in x):
            budget[0] -= len(x)
            return (t, tuple(x))
        return (t, tuple(_canon(v, budget) for v in x))
    if t is torchsave.TensorRef:
        return (t, _canon(x.dtype, budget), _canon(x.shape, budget), _canon(x.stride, budget),
                _canon(x.storage_key, budget), _canon(x.storage_offset, budget))
    raise _NoToken


# Positions of FileRecord fields: the hot loops index the rows (a NamedTuple's attribute is
# a slower lookup than its index), by positions derived from the field names.
(ROW_RELPATH, ROW_SIZE, ROW_ALLOCATED, ROW_DEV, ROW_INO, ROW_IS_SYMLINK, ROW_SYMLINK_TARGET,
 ROW_ESCAPES_ROOT, ROW_IS_REGULAR) = (FileRecord._fields.index(name) for name in (
     "relpath", "size", "allocated", "dev", "ino", "is_symlink", "symlink_target",
     "escapes_root", "is_regular"))


def regular_size(row: tuple) -> int | None:
    """The size the scan's ``lstat`` found for a row that is a regular file (then opening it
    needs no second look), else None."""
    return row[ROW_SIZE] if row[ROW_IS_REGULAR] and not row[ROW_IS_SYMLINK] else None
