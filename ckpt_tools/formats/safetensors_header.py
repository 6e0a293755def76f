"""Read and validate a safetensors header without any framework.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``, padded with
spaces), then the data section. Every way the header can lie has its own message; the
rules are those of ``safetensors/src/tensor.rs`` plus two it leaves out (duplicate keys
and unknown entry fields are rejected here).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import reprlib
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ckpt_tools.problems import BAD_HEADER, DTYPE_UNKNOWN, TRUNCATED, FormatError

MAX_HEADER_BYTES = 100_000_000
#: The most tensors a header may list. The largest real single-file checkpoints hold some
#: 10^5; the bound keeps what a header of up to MAX_HEADER_BYTES costs to judge in
#: proportion (the entries are parsed and checked one at a time, so a header of junk stops
#: at its first bad entry, whatever its length).
MAX_TENSORS = 250_000
FIRST_READ_BYTES = 64 * 1024
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))
_U64 = 1 << 64
_U64_LE = struct.Struct("<Q")

#: ``read_at(n, offset)``: up to ``n`` bytes at ``offset`` of one file, fewer only at its end
#: (``pread_full`` of an open descriptor, or a ranged GET of an object in a bucket).
ReadAt = Callable[[int, int], bytes]

#: Bits per element of every dtype safetensors 0.8 knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


_DTYPE_NAMES = {name: name for name in DTYPE_BITS}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the header. ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.numel * DTYPE_BITS[self.dtype] + 7) // 8


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: its tensors in header order and the optional metadata."""

    header_len: int
    file_size: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def get(self, name: str) -> TensorEntry | None:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        return None


def _bad(message: str) -> FormatError:
    return FormatError(BAD_HEADER, message)


_repr = reprlib.Repr()
_repr.maxstring = 160  # tensor names are long; whole ones read better in messages


def _show(value: object) -> str:
    """A short rendering of a JSON value for a one-line message."""
    return _repr.repr(value)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _bad(f"duplicate key {_show(key)} in header JSON")
        result[key] = value
    return result


def _reject_constant(name: str):
    raise _bad(f"header JSON contains {name}, which is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _members(text: str, limit: int):
    """(name, value) of each member of the JSON object ``text``, one at a time, with no dict
    of them all: what ``json.loads`` would parse, in the same C scanner, raising
    ``json.JSONDecodeError`` where it would. Past ``limit`` members, ``_bad``."""
    skip = _WHITESPACE.match
    scan_name = json.decoder.scanstring
    scan_value = _DECODER.scan_once
    pos = 1  # text[0] is '{'
    if text[pos:pos + 1] != '"':
        pos = skip(text, pos).end()
        if text[pos:pos + 1] == "}":
            pos = skip(text, pos + 1).end()
            if pos != len(text):
                raise json.JSONDecodeError("Extra data", text, pos)
            return
    count = 0
    while True:
        # safetensors writes no whitespace: the expected character is tried first
        if text[pos:pos + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                       text, pos)
        name, pos = scan_name(text, pos + 1)
        if text[pos:pos + 1] != ":":
            pos = skip(text, pos).end()
            if text[pos:pos + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos += 1
        try:
            value, pos = scan_value(text, pos)
        except StopIteration:
            pos = skip(text, pos).end()
            try:
                value, pos = scan_value(text, pos)
            except StopIteration as stop:
                raise json.JSONDecodeError("Expecting value", text, stop.value) from None
        count += 1
        if count > limit:
            raise _bad(f"header lists more than {limit} tensors")
        yield name, value
        c = text[pos:pos + 1]
        if c != "," and c != "}":
            pos = skip(text, pos).end()
            c = text[pos:pos + 1]
        if c == ",":
            pos += 1
            if text[pos:pos + 1] != '"':
                pos = skip(text, pos).end()
        elif c == "}":
            pos = skip(text, pos + 1).end()
            if pos != len(text):
                raise json.JSONDecodeError("Extra data", text, pos)
            return
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _where(name: str) -> str:
    return f"tensor {_show(name)}"


def _parse_entry(name: str, entry: object) -> TensorEntry:
    # Every message, and the reprlib rendering of the name in it, is built only on failure:
    # a valid entry costs its checks and nothing else.
    if not isinstance(entry, dict):
        raise _bad(f"{_where(name)}: entry is {type(entry).__name__}, not an object")
    if entry.keys() != _ENTRY_FIELDS:
        missing = sorted(_ENTRY_FIELDS - entry.keys())
        extra = sorted(entry.keys() - _ENTRY_FIELDS)
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra)}" if extra else "") if part)
        raise _bad(f"{_where(name)}: entry must have exactly dtype, shape, data_offsets "
                   f"({detail})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _bad(f"{_where(name)}: dtype is {type(dtype).__name__}, not a string")
    dtype_bits = DTYPE_BITS.get(dtype)
    if dtype_bits is None:
        raise FormatError(DTYPE_UNKNOWN, f"{_where(name)}: unknown dtype {_show(dtype)}")
    dtype = _DTYPE_NAMES[dtype]  # one string object per dtype, not one per tensor
    if not isinstance(shape, list):
        raise _bad(f"{_where(name)}: shape must be a list of integers, got {_show(shape)}")
    for dim in shape:
        if type(dim) is not int:  # JSON true/false arrive as bool, a subclass of int
            raise _bad(f"{_where(name)}: shape must be a list of integers, got {_show(shape)}")
    for dim in shape:
        if dim < 0 or dim >= _U64:
            raise _bad(f"{_where(name)}: dimension out of range in shape {_show(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and type(offsets[0]) is int and type(offsets[1]) is int):  # not bools either
        raise _bad(f"{_where(name)}: data_offsets must be two integers, got {_show(offsets)}")
    begin, end = offsets
    if begin < 0 or end >= _U64:
        raise _bad(f"{_where(name)}: data_offsets {offsets} out of range")
    if begin > end:
        raise _bad(f"{_where(name)}: data_offsets begin {begin} > end {end}")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _U64:  # the reference reader computes in u64 and would overflow
            raise _bad(f"{_where(name)}: shape {shape} overflows 64 bits")
    bits = numel * dtype_bits
    if bits >= _U64:
        raise _bad(f"{_where(name)}: shape {shape} of {dtype} overflows 64 bits")
    if bits % 8:
        raise _bad(f"{_where(name)}: {numel} elements of {dtype} do not fill a whole number "
                   "of bytes")
    if end - begin != bits // 8:
        raise _bad(f"{_where(name)}: data_offsets span {end - begin} bytes but shape {shape} "
                   f"of {dtype} needs {bits // 8}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def parse_header(prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Validate the header of a safetensors file of ``file_size`` bytes.

    ``prefix`` holds the file's first bytes, at least 8 + N of them where N is the
    header length it declares (the whole file is fine). Raises ``FormatError`` with
    ``truncated``, ``bad-header`` or ``dtype-unknown`` when the file is not valid, and
    ``ValueError`` when ``prefix`` is shorter than the caller promised.
    """
    if file_size < 8:
        what = "empty file" if file_size == 0 else f"file of {file_size} bytes"
        raise FormatError(TRUNCATED, f"{what}: no room for the 8-byte header length")
    if len(prefix) < 8:
        raise ValueError("prefix must hold at least 8 bytes")
    (header_len,) = struct.unpack_from("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise _bad(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise FormatError(TRUNCATED, f"header length {header_len} runs past the end of "
                                     f"the file ({file_size} bytes)")
    if len(prefix) < 8 + header_len:
        raise ValueError(f"prefix holds {len(prefix)} bytes, header needs {8 + header_len}")

    try:
        text = str(memoryview(prefix)[8:8 + header_len], "utf-8")  # no copy of the bytes
    except UnicodeDecodeError as exc:
        raise _bad(f"header is not valid UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise _bad("header does not start with '{'")
    # Each member is parsed and checked before the next is read: what is kept per tensor is
    # its TensorEntry, and a header of a million bad entries stops at the first.
    names: set[str] = set()
    entries: list[TensorEntry] = []
    metadata = None
    try:
        for name, value in _members(text, MAX_TENSORS):
            if name in names:
                raise _bad(f"duplicate key {_show(name)} in header JSON")
            names.add(name)
            if name == METADATA_KEY:
                metadata = value
                if metadata is not None and not (isinstance(metadata, dict)
                        and all(isinstance(v, str) for v in metadata.values())):
                    raise _bad("__metadata__ must map strings to strings")
            else:
                entries.append(_parse_entry(name, value))
    except RecursionError:
        raise _bad("header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise _bad(f"header is not valid JSON: {str(exc).splitlines()[0]}") from None
    del names
    tensors = tuple(entries)
    del entries

    # Offsets must tile the data section: sorted by position, each starts where the last ended.
    data_end = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin < data_end:
            raise _bad(f"tensor {_show(tensor.name)} at [{tensor.begin}, {tensor.end}) overlaps "
                       f"the data before offset {data_end}")
        if tensor.begin > data_end:
            raise _bad(f"gap of {tensor.begin - data_end} bytes in the data section before "
                       f"tensor {_show(tensor.name)}")
        data_end = tensor.end
    expected_size = 8 + header_len + data_end
    if expected_size < file_size:
        raise _bad(f"{file_size - expected_size} trailing bytes after the last tensor")
    if expected_size > file_size:
        raise FormatError(TRUNCATED, f"tensor data ends at byte {expected_size} but the file "
                                     f"has {file_size} bytes")
    return SafetensorsHeader(header_len, file_size, tensors, metadata)


def lenient_names(prefix: bytes, limit: int = 10_000) -> list[str]:
    """The first ``limit`` tensor names of a header that may be invalid (a file whose header
    failed ``parse_header``), to tell what the file was meant to hold; [] where even its
    first members are not JSON. ``prefix`` as for ``parse_header``. Never trust it."""
    names: list[str] = []
    if len(prefix) < 8:
        return names
    (header_len,) = _U64_LE.unpack_from(prefix)
    try:
        text = str(memoryview(prefix)[8:8 + min(header_len, MAX_HEADER_BYTES)], "utf-8")
        if text.startswith("{"):
            for name, _ in _members(text, limit):
                if name != METADATA_KEY:
                    names.append(name)
    except (ValueError, RecursionError, FormatError):
        pass  # what was read before the damage is all there is
    return names


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """``os.pread`` until ``size`` bytes or the end of the file."""
    try:
        data = os.pread(fd, size, offset)
    except BlockingIOError:
        # opened O_NONBLOCK (see open_regular) on a filesystem that honours it for files
        os.set_blocking(fd, True)
        data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    chunks = [data]
    size -= len(data)
    offset += len(data)
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# O_NONBLOCK: should a FIFO take a regular file's place after the check, its open returns
# at once, so it can be told apart and refused
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_NOATIME = getattr(os, "O_NOATIME", 0)
_S_ISREG = stat.S_ISREG
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"))


class NotRegularFile(OSError):
    """A path that leads to something other than a regular file: a FIFO, a socket, a device
    or a directory. Opening a FIFO blocks until a writer comes and reading a device like
    /dev/zero never ends, so such a path is refused, never read."""

    def __init__(self, path: str | os.PathLike, mode: int):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        self.mode = mode


def require_regular(path: str | os.PathLike) -> os.stat_result:
    """The ``stat`` of ``path`` (following symlinks, as opening it would); raises
    ``NotRegularFile`` unless it is a regular file. Nothing is opened."""
    st = os.stat(path)
    if not _S_ISREG(st.st_mode):
        raise NotRegularFile(path, st.st_mode)
    return st


def open_regular(path: str | os.PathLike, file_size: int | None = None) -> tuple[int, int]:
    """(fd, size): the regular file ``path`` opened for reading without updating its atime
    where the OS lets us, and its size from the ``fstat`` that checks what it is. Anything
    else (a FIFO, a socket, a device, a directory) raises ``NotRegularFile`` and is never
    opened (``require_regular``). Every read of a file found in a checkpoint tree goes
    through here.

    A caller whose own ``lstat`` found a regular file passes the size it saw as
    ``file_size``: then there is neither ``stat`` nor ``fstat``, and ``file_size`` is the
    size. Whatever may have taken the file's place since cannot block the open, and reads
    bounded by that size end.

    The descriptor may still be in non-blocking mode, which Linux ignores for regular
    files; read it with ``pread_full``, which switches it to blocking where a filesystem
    answers ``EAGAIN``, or use ``open_readonly``.
    """
    if file_size is None:
        require_regular(path)
    fd = -1
    if _NOATIME:
        try:
            fd = os.open(path, _OPEN_FLAGS | _NOATIME)
        except PermissionError as exc:
            # O_NOATIME is only permitted to the file's owner; anyone else just reads.
            if exc.errno != errno.EPERM:
                raise
    if fd < 0:
        fd = os.open(path, _OPEN_FLAGS)
    if file_size is not None:
        return fd, file_size
    try:
        st = os.fstat(fd)
        if not _S_ISREG(st.st_mode):   # it changed since the stat above
            raise NotRegularFile(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bounded(path: str | os.PathLike, limit: int, file_size: int | None = None,
                 read_at: ReadAt | None = None) -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``), or its first ``limit + 1``
    when it is larger than ``limit``: a caller tells "too large" by the length. With
    ``read_at`` (an object in a bucket, ``storage.remote``) the bytes come from it and
    ``file_size`` is the size its listing gave."""
    if read_at is not None:
        return _bounded(read_at, file_size, limit)
    fd, size = open_regular(path, file_size)
    try:
        return _bounded(partial(pread_full, fd), size, limit)
    finally:
        os.close(fd)


def _bounded(read_at: ReadAt, size: int, limit: int) -> bytes:
    if 0 < size <= limit:
        return read_at(size, 0)  # as big as it was found
    raw = read_at(limit + 1, 0)
    if len(raw) <= limit:
        while chunk := read_at(limit + 1 - len(raw), len(raw)):
            raw += chunk
    return raw


def open_readonly(path: str | os.PathLike) -> int:
    """Open the regular file ``path`` for reading (``open_regular``), in blocking mode."""
    fd, _ = open_regular(path)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_fadvise = getattr(os, "posix_fadvise", None)
_FADV_RANDOM = getattr(os, "POSIX_FADV_RANDOM", 0)


def no_readahead(fd: int) -> None:
    """Tell the kernel reads will be sparse: a header read of a large file then costs the bytes
    asked for, not the readahead window around them (measurable on cold network storage)."""
    if _fadvise is not None:
        try:
            _fadvise(fd, 0, 0, _FADV_RANDOM)
        except OSError:
            pass


def read_header_bytes(path: str | os.PathLike, *, file_size: int | None = None,
                      first_read: int = FIRST_READ_BYTES,
                      read_at: ReadAt | None = None) -> tuple[bytes, int]:
    """(the file's first bytes, its size): what ``read_header`` reads and then parses.

    The bytes hold the whole header (8 + N bytes, more when ``first_read`` was larger)
    whenever the file is long enough for the length it declares. ``file_size`` as for
    ``open_regular``; ``read_at`` as for ``read_bounded`` (then at most two ranged reads,
    the second bounded by MAX_HEADER_BYTES and the size listed). Raises ``FormatError``
    ``truncated`` when the file ends before that, and ``OSError`` from the OS.
    """
    if read_at is not None:
        return _header_bytes(read_at, file_size, first_read), file_size
    fd, file_size = open_regular(path, file_size)
    try:
        if file_size > first_read:
            no_readahead(fd)
        data = _header_bytes(partial(pread_full, fd), file_size, first_read)
    finally:
        os.close(fd)
    return data, file_size


def _header_bytes(read_at: ReadAt, file_size: int, first_read: int) -> bytes:
    data = read_at(min(first_read, file_size), 0)
    if len(data) >= 8:
        (header_len,) = _U64_LE.unpack_from(data)
        needed = 8 + header_len
        if len(data) < needed <= min(file_size, 8 + MAX_HEADER_BYTES):
            data += read_at(needed - len(data), len(data))
            if len(data) < needed:
                raise FormatError(TRUNCATED, f"file ended at byte {len(data)} while "
                                             f"reading a {header_len}-byte header")
    elif len(data) < min(8, file_size):
        raise FormatError(TRUNCATED, f"file ended at byte {len(data)}, "
                                     f"expected {file_size} bytes")
    return data


def read_header(path: str | os.PathLike, *, file_size: int | None = None,
                first_read: int = FIRST_READ_BYTES, memo: dict | None = None,
                read_at: ReadAt | None = None) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Reads the first ``first_read`` bytes (64 KiB) in one ``pread`` and the rest of the
    header only when it is longer; tensor data is never read. ``file_size``: the size of a
    regular file as the caller's own ``lstat`` saw it (see ``open_regular``); a caller that
    knows the header's likely size may pass it as ``first_read``. ``memo``: as for
    ``parse_cached``; ``read_at`` as for ``read_bounded``. Raises ``FormatError`` for bad data
    and ``OSError`` from the OS.
    """
    data, file_size = read_header_bytes(path, file_size=file_size, first_read=first_read,
                                        read_at=read_at)
    return parse_cached(data, file_size, memo)


_CACHE_MAX = 4096


def parse_cached(data: bytes, file_size: int, memo: dict | None = None) -> SafetensorsHeader:
    """``parse_header``, memoised in ``memo`` (a ``ReadCache.headers``; None: no memo) on the
    exact header bytes and file size.

    The checkpoints of one run hold byte-identical adapter headers; the parse is a pure
    function of these two values, and the result is immutable, so it can be shared.
    Failures are not cached: they are rare and carry their own message.
    """
    if memo is not None and len(data) >= 8:
        (n,) = _U64_LE.unpack_from(data)
        if n <= 1 << 20:
            key = (bytes(data[:8 + n]), file_size)
            hit = memo.get(key)
            if hit is not None:
                return hit
            header = parse_header(data, file_size)
            if len(memo) >= _CACHE_MAX:
                memo.clear()  # atomic under threads, unlike popping the oldest entry
            memo[key] = header
            return header
    return parse_header(data, file_size)
