"""The zip container of torch.save files: the file's bytes as read (``_File``), the end
record, the central directory, the records, data.pkl; and the memo of whole small archives.

**The invariant the memo and the replay rest on.** A whole small archive is memoised by every
byte but the ranges ``_unread_ranges`` proves that no check reads: an archive whose other
bytes equal a memoised one's is given that one's ``TorchFileInfo``, and a checkpoint whose
reads all return objects an earlier one's did is given that one's findings
(``ckpt_tools.replay``). So every byte range a check of this package reads must be outside
the cut: a new check that reads bytes inside a range ``_unread_ranges`` returns must take
them out of it, or two archives that differ only there share a verdict.
tests/test_read_cache_differential.py guards it: it mutates byte ranges, headers and pickles
of sibling checkpoints and requires every verdict with the cache to equal the one without.
"""

from __future__ import annotations

import struct
import zlib
from operator import itemgetter

from ckpt_tools.problems import TRUNCATED, FormatError
from ckpt_tools.read_cache import ArchiveMemo, ReadCache
from .evaluation import _evaluate_data_pkl, _fresh
from .model import TorchFileInfo, _ZIP_LOCAL, _bad, _show


_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_MAX_CENTRAL_DIRECTORY = 8 * 1024 * 1024
_MAX_RECORD_WALK = 1_000_000
_MAX_DEFLATE_RATIO = 1100  # deflate cannot do better than ~1032:1
_TAIL_READ = 16 * 1024  # larger files: the first read at the end (end records, most CDs)
_END_SEARCH = 22 + 0xFFFF + 20  # end record, the longest comment, the zip64 locator
_READ_AHEAD = 4096  # larger files: a read for a local header takes this much
_INFLATE_CHUNK = 1 << 20


class _File:
    """The bytes of one open file: all of them (small files), or the windows read so far.

    ``get(offset, n)`` answers like ``read_at(n, offset)`` (fewer bytes at the end of the
    file) from the whole file, a kept window or the last read, else reads. ``read_at``: a
    ``safetensors_header.ReadAt`` (a local descriptor's ``pread_full``, or ranged GETs).
    """

    __slots__ = ("read_at", "size", "data", "windows", "recent")

    def __init__(self, read_at, size: int, data: bytes | None = None):
        self.read_at = read_at
        self.size = size
        self.data = data
        self.windows: list[tuple[int, bytes]] = []
        self.recent: tuple[int, bytes] = (0, b"")

    def keep(self, offset: int, n: int) -> bytes:
        """Read ``n`` bytes at ``offset`` and keep them for later ``get`` calls."""
        window = self.read_at(n, offset)
        self.windows.append((offset, window))
        return window

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes of the file."""
        if self.data is not None:
            return self.data[len(self.data) - n:]
        return self.keep(self.size - n, n)

    def get(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset:offset + n]
        end = min(offset + n, self.size)
        for start, window in (*self.windows, self.recent):
            if start <= offset and end <= start + len(window):
                return window[offset - start:end - start]
        window = self.read_at(max(n, _READ_AHEAD), offset)
        self.recent = (offset, window)
        return window[:n]


# -- zip container --------------------------------------------------------------------
#
# Parsed here with ``struct`` from the bytes at hand rather than through ``zipfile``: the
# checks are those ``zipfile`` (CPython 3.11) makes on the way to reading data.pkl, plus
# the structural ones below, with the same outcomes; ``zipfile``'s leniencies that torch's
# own reader (miniz) refuses are refused (see ``_central_directory``).

# zipfile.structCentralDir ("<4s4B4HL2L5H2L", 46 bytes) less the fields nothing reads:
# signature, extract version, flags, method, CRC, compressed size, size, name / extra /
# comment lengths, local header offset.
_CD_RECORD = struct.Struct("<4s2xB1xHH4xIIIHHH8xI")
_U16_PAIR = struct.Struct("<HH")
_U16_TRIPLE = struct.Struct("<HHH")
_END_RECORD = struct.Struct("<HHHHIIH")  # after the signature
_STORED, _DEFLATED = 0, 8
_UTF8_NAME = 0x800
_MAX_EXTRACT_VERSION = 63  # zipfile.MAX_EXTRACT_VERSION


def _unreadable(detail: str) -> FormatError:
    return _bad(f"unreadable zip archive: {detail}")


def _find_end_record(tail: bytes) -> int | None:
    """Where in ``tail`` the end record is whose comment runs exactly to the end."""
    at = len(tail)
    while True:
        at = tail.rfind(_ZIP_END, 0, at)
        if at < 0:
            return None
        if len(tail) - at >= 22 and at + 22 + tail[at + 20] + (tail[at + 21] << 8) == len(tail):
            return at


def _find_central_directory(f: _File) -> tuple[int, int, int] | None:
    """(offset, size, end) of the central directory from the end records, or None."""
    size = f.size
    full = min(size, _END_SEARCH)
    tail_len = full if f.data is not None else min(full, _TAIL_READ)
    while True:
        tail = f.tail(tail_len)
        at = _find_end_record(tail)
        if at is not None or tail_len >= full:
            break
        tail_len = full  # an archive comment longer than the first read: look further
    if at is None:
        return None
    disk, cd_disk, _, entries, cd_size, cd_offset, comment_len = _END_RECORD.unpack_from(
        tail, at + 4)
    if disk or cd_disk:
        raise _bad("multi-disk zip archives are not supported")
    if comment_len and tail.find(_ZIP_END, at + 1) >= 0:
        # zipfile and miniz would take the last signature for the end record; no torch
        # archive has a comment, let alone one that makes the end record ambiguous.
        raise _bad("zip archive comment holds another end-of-central-directory signature")
    end = size - len(tail) + at
    # torch (miniz) always writes zip64 end records, large or not.
    if at >= 20 and tail.startswith(_ZIP64_LOCATOR, at - 20):
        locator_end = end
        zip64_disk, end, disks = struct.unpack_from("<IQI", tail, at - 16)
        record = f.get(end, 56) if end + 56 <= size else b""
        if record[:4] != _ZIP64_END:
            raise _bad("zip64 end-of-central-directory record is missing")
        if zip64_disk or disks > 1:
            raise _bad("multi-disk zip archives are not supported")
        if end + 56 + 20 != locator_end:
            raise _bad("zip64 end-of-central-directory record is not just before its locator")
        cd_size, cd_offset = struct.unpack_from("<QQ", record, 40)
    elif 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        raise _bad("zip64 end record locator is missing")
    return cd_offset, cd_size, end


def _diagnose_no_end_record(f: _File) -> FormatError:
    """Walk the records of a zip that lacks its end record: was it cut short?"""
    size = f.size
    truncated = FormatError(TRUNCATED, f"zip archive is truncated: it ends at byte {size} "
                                       "without its end-of-central-directory record")
    pos = 0
    for _ in range(_MAX_RECORD_WALK):
        head = f.get(pos, 46)
        if len(head) < 4:
            return truncated
        if head[:4] == _ZIP_LOCAL:
            if len(head) < 30:
                return truncated
            (flags,) = struct.unpack_from("<H", head, 6)
            (csize,) = struct.unpack_from("<I", head, 18)
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            if csize == 0xFFFFFFFF:
                csize = _zip64_compressed_size(f.get(pos + 30 + name_len, extra_len))
            if flags & 0x08 or csize is None:
                break  # sizes follow the data (torch writes them so): the walk cannot go on
            pos += 30 + name_len + extra_len + csize
        elif head[:4] == _ZIP_CENTRAL:
            if len(head) < 46:
                return truncated
            pos += 46 + sum(struct.unpack_from("<HHH", head, 28))
        elif head[:4] == _ZIP64_END:
            if len(head) < 12:
                return truncated
            pos += 12 + struct.unpack_from("<Q", head, 4)[0]
        elif head[:4] == _ZIP64_LOCATOR:
            pos += 20
        elif head[:4] == _ZIP_END:
            if len(head) < 22 or pos + 22 + struct.unpack_from("<H", head, 20)[0] > size:
                return truncated
            return _bad("zip archive has bytes after its end-of-central-directory record")
        else:
            return _bad(f"zip archive has no end record and is corrupt at byte {pos}")
    return _bad("zip archive has no end-of-central-directory record: it was probably "
                "truncated (cut short while being written or copied)")


def _zip64_compressed_size(extra: bytes) -> int | None:
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == 0x0001 and length >= 16 and at + 20 <= len(extra):
            return struct.unpack_from("<Q", extra, at + 12)[0]
        at += 4 + length
    return None


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset with the zip64 extra field applied, as ``ZipInfo._decodeExtra``."""
    at, n = 0, len(extra)
    while n - at >= 4:
        tag, length = _U16_PAIR.unpack_from(extra, at)
        if length + 4 > n - at:
            raise _unreadable(f"corrupt extra field {tag:04x} (size={length})")
        if tag == 0x0001:
            field, end = at + 4, at + 4 + length
            if usize in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
                usize, field = _zip64_value(extra, field, end, "file size"), field + 8
            if csize == 0xFFFFFFFF:
                csize, field = _zip64_value(extra, field, end, "compressed size"), field + 8
            if offset == 0xFFFFFFFF:
                offset = _zip64_value(extra, field, end, "header offset")
        at += 4 + length
    return usize, csize, offset


def _zip64_value(extra: bytes, at: int, end: int, what: str) -> int:
    if at + 8 > end:
        raise _unreadable(f"corrupt zip64 extra field: {what} not found")
    return struct.unpack_from("<Q", extra, at)[0]


def _central_directory(cd: bytes) -> list[tuple]:
    """The records of a central directory: (offset, name, raw name, flags, method, CRC,
    compressed size, size) each, ``name`` as ``ZipInfo.filename`` has it.

    ``zipfile`` checks each record's signature and length; it silently cuts a record whose
    name, extra field or comment runs past the directory's end, which miniz (torch.load)
    refuses, and so does this.
    """
    entries = []
    pos, n = 0, len(cd)
    while pos < n:
        if pos + 46 > n:
            raise _unreadable("truncated central directory")
        (sig, version, flags, method, crc, csize, usize, name_len, extra_len, comment_len,
         offset) = _CD_RECORD.unpack_from(cd, pos)
        if sig != _ZIP_CENTRAL:
            raise _unreadable("bad magic number for central directory")
        name_end = pos + 46 + name_len
        next_pos = name_end + extra_len + comment_len
        if next_pos > n:
            raise _unreadable(f"central directory record {len(entries)} runs past the "
                              "directory's end")
        raw = cd[pos + 46:name_end]
        if raw.isascii():
            name = raw.decode("ascii")
        elif flags & _UTF8_NAME:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _unreadable(str(exc)) from None
        else:
            name = raw.decode("cp437")
        if version > _MAX_EXTRACT_VERSION:  # zipfile raised NotImplementedError here
            raise _unreadable(f"zip file version {version / 10:.1f} is not supported")
        if extra_len:
            usize, csize, offset = _zip64_extra(cd[name_end:name_end + extra_len],
                                                usize, csize, offset)
        if "\0" in name:  # ZipInfo drops a name's tail from its first NUL
            name = name[:name.index("\0")]
        entries.append((offset, name, raw, flags, method, crc, csize, usize))
        pos = next_pos
    return entries


_OFFSET_OF = itemgetter(0)


def _check_records(f: _File, entries: list[tuple], cd_offset: int) -> None:
    """Every record's local header and data lie inside the file, in order, not overlapping."""
    whole = f.data
    data_end = 0
    for offset, name, raw, flags, method, _, csize, usize in sorted(entries, key=_OFFSET_OF):
        if flags & 0x01 or method != _STORED or csize != usize or offset < data_end:
            _check_record_fields(name, flags, method, csize, usize, offset, data_end)
        if whole is not None:
            buf, at = whole, offset
        else:
            buf, at = f.get(offset, 30 + len(raw)), 0
        if len(buf) - at < 30 or not buf.startswith(_ZIP_LOCAL, at):
            raise _bad(f"record {_show(name)}: no local header at byte {offset}")
        name_len, extra_len = _U16_PAIR.unpack_from(buf, at + 26)
        if name_len != len(raw) or not buf.startswith(raw, at + 30):
            local_name = f.get(offset + 30, name_len)
            if local_name != raw:  # zipfile compared the name decoded and encoded back
                raise _bad(f"record {_show(name)}: local header names {_show(local_name)}")
        data_end = offset + 30 + name_len + extra_len + csize
        if data_end > cd_offset:
            raise _bad(f"record {_show(name)} runs into the central directory")


def _check_record_fields(name: str, flags: int, method: int, csize: int, usize: int,
                         offset: int, data_end: int) -> None:
    """The checks of a record's directory fields, in order; returns for a sound one."""
    if flags & 0x01:
        raise _bad(f"record {_show(name)} is encrypted")
    if method != _STORED and method != _DEFLATED:
        raise _bad(f"record {_show(name)} uses compression method {method}, "
                   "which torch cannot read")
    if method == _STORED and csize != usize:
        raise _bad(f"stored record {_show(name)} declares {usize} bytes but "
                   f"occupies {csize}")
    if method != _STORED and usize > _MAX_DEFLATE_RATIO * max(csize, 1):
        raise _bad(f"record {_show(name)} claims {usize} bytes from "
                   f"{csize} compressed bytes (zip bomb)")
    if offset < data_end:
        raise _bad(f"record {_show(name)} overlaps the record before it")


def _read_record(f: _File, entry: tuple) -> bytes:
    """The bytes of a record ``_check_records`` passed, with ``ZipFile.open``'s checks."""
    offset, name, raw, flags, method, crc, csize, usize = entry
    what = name.rsplit("/", 1)[-1]
    if flags & 0x20:
        raise _bad(f"{what} is unreadable: compressed patched data (flag bit 5)")
    if flags & 0x40:
        raise _bad(f"{what} is unreadable: strong encryption (flag bit 6)")
    head = f.get(offset, 30)
    (local_flags,) = struct.unpack_from("<H", head, 6)
    name_len, extra_len = _U16_PAIR.unpack_from(head, 26)
    if (local_flags ^ flags) & _UTF8_NAME and not raw.isascii():
        raise _bad(f"{what} is unreadable: its name is encoded differently in the directory "
                   "and in its local header")
    start = offset + 30 + name_len + extra_len
    if method == _STORED:
        data = f.get(start, csize)
        if len(data) != csize:  # only a file cut short since its records were checked
            raise _bad(f"{what} is unreadable: the file ends inside it")
    else:
        data = _inflate(f, start, csize, usize, what)
    if zlib.crc32(data) != crc:
        raise _bad(f"{what} is unreadable: bad CRC-32 for file {_show(name)}")
    return data


def _inflate(f: _File, start: int, csize: int, usize: int, what: str) -> bytes:
    """At most ``usize`` bytes inflated from the ``csize`` bytes at ``start``, read and
    inflated a chunk at a time: never more input or output than that at hand."""
    decompressor = zlib.decompressobj(-15)
    parts = []
    want, pos, end = usize, start, start + csize
    try:
        while want > 0 and pos < end:
            chunk = f.get(pos, min(end - pos, _INFLATE_CHUNK))
            if not chunk:
                raise _bad(f"{what} is unreadable: the file ends inside it")
            pos += len(chunk)
            out = decompressor.decompress(chunk, want)
            parts.append(out)
            want -= len(out)
            if decompressor.eof:
                break
        if want > 0 and not decompressor.eof:
            parts.append(decompressor.flush()[:want])
    except zlib.error as exc:
        raise _bad(f"{what} is unreadable: {exc}") from None
    return b"".join(parts)


def _inspect_zip(f: _File, check_pickle: bool, max_pickle_bytes: int,
                 cache: ReadCache | None) -> TorchFileInfo:
    info, _, _ = _read_zip(f, check_pickle, max_pickle_bytes, cache)
    return info if cache is None else _handed_out(info)


def _handed_out(info: TorchFileInfo) -> TorchFileInfo:
    """A copy of ``info`` whose containers (the object tree, the storages) are the caller's."""
    return TorchFileInfo(info.format, None if info.obj is None else _fresh(info.obj),
                         dict(info.storages), info.record_prefix)


def _read_zip(f: _File, check_pickle: bool, max_pickle_bytes: int, cache: ReadCache | None):
    """(info, central directory entries, its offset) of a sound zip archive; with a
    ``cache``, ``info.obj`` is the memoised tree, shared: never hand it out (``_handed_out``)."""
    found = _find_central_directory(f)
    if found is None:
        raise _diagnose_no_end_record(f)
    cd_offset, cd_size, cd_end = found
    if cd_offset + cd_size != cd_end:
        raise _bad("central directory is not where the end record says it is")
    if cd_size > _MAX_CENTRAL_DIRECTORY:
        raise _bad(f"central directory of {cd_size} bytes is too large")
    entries = _central_directory(f.get(cd_offset, cd_size))
    if not entries:
        raise _bad("zip archive is empty")
    records = {entry[1]: entry for entry in entries}
    if len(records) != len(entries):
        raise _bad("zip archive holds two records of the same name")
    first = entries[0][1]
    prefix = first.split("/", 1)[0]
    folder = prefix + "/"
    if "/" not in first:
        raise _bad("records are not all in one top-level folder")
    for name in records:
        if not name.startswith(folder):
            raise _bad("records are not all in one top-level folder")
    _check_records(f, entries, cd_offset)
    pkl = records.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise _bad(f"no {_show(prefix + '/data.pkl')} record")
    if pkl[7] > max_pickle_bytes:
        raise _bad(f"data.pkl is {pkl[7]} bytes, over the {max_pickle_bytes}-byte limit")
    data = _read_record(f, pkl)

    obj, refs, late_error = _evaluate_data_pkl(data, check_pickle,
                                               None if cache is None else cache.pickles)
    storages: dict[str, tuple[str, int]] = {}
    for key, storage in refs.items():
        entry = records.get(f"{folder}data/{key}")
        if entry is None:
            raise _bad(f"storage record {_show('data/' + key)} is missing")
        if entry[4] != _STORED:
            raise _bad(f"storage record {_show('data/' + key)} is compressed (torch.save stores "
                       "storages uncompressed; mmap loading needs that)")
        if entry[7] < storage.nbytes:
            raise _bad(f"storage record {_show('data/' + key)} holds {entry[7]} bytes, "
                       f"the pickle needs {storage.nbytes}")
        storages[key] = (storage.dtype, entry[7])
    if late_error is not None:
        raise FormatError(*late_error)
    return TorchFileInfo("zip", obj if check_pickle else None, storages, prefix), entries, cd_offset


# -- memo of data.pkl evaluations ---------------------------------------------------------

def _unread_ranges(data: bytes, entries: list[tuple], cd_offset: int,
                   pkl_name: str) -> list[tuple[int, int]]:
    """Byte ranges of a sound archive (read whole) that no check depends on. (The local
    headers' CRC-32 fields are never read either, but torch writes zeros there, the sizes
    following the data: kept, they cost nothing in hits and save a slice each.)"""
    cut = []
    ordered = sorted(entries, key=_OFFSET_OF)
    for i, (offset, name, _, _, _, _, csize, _) in enumerate(ordered):
        following = ordered[i + 1][0] if i + 1 < len(ordered) else cd_offset
        name_len, extra_len = _U16_PAIR.unpack_from(data, offset + 26)
        start = offset + 30 + name_len + extra_len
        cut.append((start + csize if name == pkl_name else start, following))
    pos = cd_offset
    for _, name, _, _, _, _, _, _ in entries:  # in directory order
        if name != pkl_name:
            cut.append((pos + 16, pos + 20))  # the directory's CRC-32 of a record never read
        pos += 46 + sum(_U16_TRIPLE.unpack_from(data, pos + 28))
    return cut


class ArchiveRanges:
    """The byte ranges that every check depends on (all but the unread ranges cut), in
    archives of one size and structure; ``kept(data)`` is the memo key's part from a file."""

    __slots__ = ("ident", "cut", "_pick", "last")

    def __init__(self, ident: int, size: int, cut: tuple[tuple[int, int], ...]):
        self.ident = ident
        self.cut = cut
        keep = []
        at = 0
        for start, end in sorted(cut):
            if start > at:
                keep.append(slice(at, start))
            at = max(at, end)
        if at < size:
            keep.append(slice(at, size))
        keep.append(slice(0, 0))  # so that itemgetter always gives a tuple
        self._pick = itemgetter(*keep)
        # (check_pickle, max bytes, kept bytes, info) of the archive met last: compared
        # directly, the same file again costs no hashing of its bytes
        self.last: tuple | None = None

    def kept(self, data: bytes) -> bytes:
        """The bytes of ``data`` outside the ranges cut."""
        return b"".join(self._pick(data))


def _archive_from_memo(memo: ArchiveMemo, data: bytes, check_pickle: bool,
                       max_pickle_bytes: int):
    for ranges in memo.ranges.get(len(data), ()):
        kept = ranges.kept(data)
        last = ranges.last
        if (last is not None and last[2] == kept and last[0] == check_pickle
                and last[1] == max_pickle_bytes):
            return last[3]
        hit = memo.results.get((ranges.ident, check_pickle, max_pickle_bytes, kept))
        if hit is not None:
            ranges.last = (check_pickle, max_pickle_bytes, kept, hit)
            return hit
    return None


def _remember_archive(memo: ArchiveMemo, data: bytes, info: TorchFileInfo, entries: list[tuple],
                      cd_offset: int, check_pickle: bool, max_pickle_bytes: int) -> None:
    cut = tuple(_unread_ranges(data, entries, cd_offset, f"{info.record_prefix}/data.pkl"))
    size = len(data)
    known = memo.ranges.get(size)
    if known is None:
        if len(memo.ranges) >= memo.MAX_ARCHIVES:
            memo.clear()
        known = memo.ranges[size] = []
    for ranges in known:
        if ranges.cut == cut:
            break
    else:
        ranges = ArchiveRanges(memo.new_ident(), size, cut)
        known.insert(0, ranges)
        del known[memo.MAX_RANGES_PER_SIZE:]
    kept = ranges.kept(data)
    if len(memo.results) >= memo.MAX_ARCHIVES or memo.weight > memo.MAX_BYTES:
        memo.results.clear()
        memo.weight = 0
    memo.results[(ranges.ident, check_pickle, max_pickle_bytes, kept)] = info
    memo.weight += 2 * size
    ranges.last = (check_pickle, max_pickle_bytes, kept, info)


# -- legacy container -----------------------------------------------------------------
