"""Where tensors lie in weight files, by their names and by their canonical LoRA names: no torch.

The pure readers (``formats.safetensors_header``, ``formats.torchsave``) say where every
tensor lives; this module turns that into ``TensorLocation`` records, one byte range each:

- safetensors: ``data_start + begin .. data_start + end`` of the header entry;
- torch.save zip archives: the storage record's data offset inside the archive (from its
  local file header; records are always stored uncompressed) plus the tensor's element
  offset, up to the last element its shape and stride reach;
- legacy (pre-1.6) torch.save files have no index of their storages: ``offset`` is -1 and
  only ``torch.load`` reads them (``tensor_io``).

It also names the LoRA and router tensors of any key form (V0/V1 merged state dicts,
``expert_<i>.pt`` files, PEFT adapters, the three router forms) by one canonical key, with
the layout's own mapping, so that migrate (which reads them with torch) and prune's
content proof (which compares their bytes without it) agree on what is what.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

from . import layout
from .formats import safetensors_header as st
from .formats import torchsave
from .problems import BAD_ARCHIVE, DTYPE_UNKNOWN, TRUNCATED, FormatError

#: safetensors dtype names → the torch dtype names that ``TensorLocation.dtype`` uses.
SAFETENSORS_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are. ``offset`` < 0: the file must be loaded whole (legacy)."""

    path: str
    name: str
    dtype: str                     # a torch dtype name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None  # None: contiguous
    offset: int                    # absolute byte offset of the first byte to read
    nbytes: int                    # bytes to read
    key: str | None = None         # the name inside the file, when ``name`` was remapped

    @property
    def file_key(self) -> str:
        return self.key if self.key is not None else self.name

    @property
    def is_plain_slice(self) -> bool:
        """Its bytes are one contiguous run, in row-major order, of exactly its elements:
        what another file's copy of the same tensor would hold byte for byte."""
        size = torchsave.DTYPE_SIZES.get(self.dtype)
        numel = 1
        for d in self.shape:
            numel *= d
        if self.offset < 0 or size is None or self.nbytes != numel * size:
            return False
        if self.stride is None:
            return True
        return all(s == e for d, s, e in zip(self.shape, self.stride, contiguous_stride(self.shape))
                   if d != 1)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a row-major tensor of ``shape``, in elements."""
    out = []
    step = 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def dtype_name(safetensors_dtype: str) -> str:
    """``"F32"`` → ``"float32"``; FormatError ``dtype-unknown`` for a dtype torch cannot hold."""
    name = SAFETENSORS_DTYPE_NAMES.get(safetensors_dtype)
    if name is None:
        raise FormatError(DTYPE_UNKNOWN, f"unknown dtype {safetensors_dtype!r}")
    return name


# --- locating ------------------------------------------------------------------------

def locate_safetensors(path: str, header: st.SafetensorsHeader | None = None,
                       wanted=None) -> dict[str, TensorLocation]:
    """Locations of the tensors of a safetensors file (``header``: its header, when read
    already). ``wanted(name) -> bool`` limits which are returned."""
    if header is None:
        header = st.read_header(path)
    start = header.data_start
    out = {}
    for t in header.tensors:
        if wanted is None or wanted(t.name):
            out[t.name] = TensorLocation(path, t.name, dtype_name(t.dtype), tuple(t.shape), None,
                                         start + t.begin, t.end - t.begin)
    return out


class _RangedFile(io.RawIOBase):
    """A read-only, seekable file over a ``ReadAt`` (an object in a bucket, read by ranges),
    for ``zipfile``: each read is one ranged request."""

    def __init__(self, read_at: st.ReadAt, size: int):
        self._read_at, self._size, self._pos = read_at, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(self._size - self._pos, 0))
        data = self._read_at(n, self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def record_data_offsets(path: str, prefix: str, keys: Iterable[str],
                        read_at: st.ReadAt | None = None,
                        size: int | None = None) -> dict[str, int]:
    """Absolute offset of the data of each storage record ``<prefix>/data/<key>``.
    ``read_at``, ``size``: an object in a bucket, read by ranges (its listed size)."""
    wanted = {f"{prefix}/data/{k}": k for k in keys}
    out: dict[str, int] = {}
    fd = st.open_readonly(path) if read_at is None else None
    pread = read_at if read_at is not None else (lambda n, at: st.pread_full(fd, n, at))
    try:
        stream = open(fd, "rb", closefd=False) if fd is not None else \
            io.BufferedReader(_RangedFile(read_at, size), 64 * 1024)
        with stream, zipfile.ZipFile(stream) as archive:
            infos = {i.filename: i for i in archive.infolist() if i.filename in wanted}
        for name, key in wanted.items():
            info = infos.get(name)
            if info is None:
                raise FormatError(BAD_ARCHIVE, f"storage record {name!r} is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(BAD_ARCHIVE, f"storage record {name!r} is compressed")
            head = pread(30, info.header_offset)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise FormatError(BAD_ARCHIVE, f"no local header for {name!r}")
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            out[key] = info.header_offset + 30 + name_len + extra_len
    except zipfile.BadZipFile as exc:
        raise FormatError(BAD_ARCHIVE, f"unreadable zip archive: {exc}") from None
    finally:
        if fd is not None:
            os.close(fd)
    return out


def locate_torch(path: str, wanted=None,
                 info: torchsave.TorchFileInfo | None = None,
                 read_at: st.ReadAt | None = None,
                 size: int | None = None) -> dict[str, TensorLocation]:
    """Locations of the tensors of a torch.save state dict (nested keys joined with '.').

    ``wanted(name) -> bool`` limits which storages are resolved (each costs a tiny read);
    ``info``: the file's ``inspect_torch_file``, when inspected already (with its pickle).
    ``read_at``, ``size``: as for ``record_data_offsets``.
    """
    if info is None:
        info = torchsave.inspect_torch_file(path, check_pickle=True)
    flat = torchsave.flatten_tensors(info.obj)
    if wanted is not None:
        flat = {k: v for k, v in flat.items() if wanted(k)}
    if info.format != "zip":
        return {k: TensorLocation(path, k, t.dtype, tuple(t.shape), tuple(t.stride), -1, 0)
                for k, t in flat.items()}
    data_at = record_data_offsets(path, info.record_prefix, {t.storage_key for t in flat.values()},
                                  read_at, size)
    out = {}
    for k, t in flat.items():
        size = torchsave.DTYPE_SIZES[t.dtype]
        first = t.storage_offset * size
        end = t.storage_bytes_needed
        out[k] = TensorLocation(path, k, t.dtype, tuple(t.shape), tuple(t.stride),
                                data_at[t.storage_key] + first, max(end - first, 0))
    return out


def locate(path: str, wanted=None) -> dict[str, TensorLocation]:
    """Locations of every tensor of a safetensors or torch.save file."""
    if path.endswith(".safetensors"):
        return locate_safetensors(path, wanted=wanted)
    return locate_torch(path, wanted)


def lora_or_router_key(key: str) -> bool:
    """A key that may hold a LoRA or router tensor: what migrate and the proof read."""
    return ".lora_" in key or key.startswith(layout.ROUTER_KEY_PREFIX)


# --- canonical names ---------------------------------------------------------------------

def group_moe_lora(locs: dict[str, TensorLocation]) -> dict[int, dict[str, TensorLocation]]:
    """{expert: {canonical key: location}} from ``….lora_A.expert_<i>.weight`` keys (V0 and V1
    merged state dicts, ``expert_<i>.pt`` files); other keys are left out."""
    out: dict[int, dict[str, TensorLocation]] = {}
    for key, loc in locs.items():
        parts = layout.moe_lora_parts(key)
        if parts is None:
            continue
        module, part, expert, param = parts
        ckey = layout.canonical_adapter_key(module, part, param)
        out.setdefault(expert, {})[ckey] = dataclasses.replace(loc, name=ckey, key=key)
    return out


def group_peft_lora(locs: dict[str, TensorLocation]) -> dict[str, TensorLocation]:
    """{canonical key: location} of a PEFT adapter file's LoRA tensors."""
    out = {}
    for key, loc in locs.items():
        parts = layout.peft_lora_parts(key)
        if parts is None:
            continue
        module, part, param = parts
        ckey = layout.canonical_adapter_key(module, part, param)
        out[ckey] = dataclasses.replace(loc, name=ckey, key=key)
    return out


def router_key_of(key: str) -> str:
    """The router state dict's own name of a key of any router form: ``router.gate.weight``
    (merged state dicts), ``gate.weight`` (router.pt, router.safetensors) and
    ``gate_state_dict.weight`` (V2's legacy router.pt) are all ``gate.weight``."""
    k = layout.router_key(key) or key
    if k.startswith(layout.LEGACY_ROUTER_STATE + "."):
        k = "gate." + k[len(layout.LEGACY_ROUTER_STATE) + 1:]
    return k


def group_router(locs: dict[str, TensorLocation]) -> dict[str, TensorLocation]:
    """{router key: location} of every tensor of a router file (see ``router_key_of``)."""
    return {router_key_of(key): dataclasses.replace(loc, name=router_key_of(key), key=key)
            for key, loc in locs.items()}


# --- reading -----------------------------------------------------------------------------

def read_range(fd: int, offset: int, nbytes: int, what: str) -> bytearray:
    """Exactly ``nbytes`` bytes at ``offset`` of ``fd`` (opened blocking, e.g. by
    ``st.open_readonly``), read into one new buffer; FormatError ``truncated`` naming
    ``what`` where the file ends first."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise FormatError(TRUNCATED, f"file ends inside {what}")
        got += n
    return buf
