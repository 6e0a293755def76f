"""Read single tensors out of large weight files, touching only their bytes.

``tensor_bytes`` says where every tensor lives, without importing torch (see there for
safetensors, torch.save zip archives and legacy torch.save files); this module turns such
a location into a tensor with one ``pread`` of exactly the bytes it occupies. Legacy
(pre-1.6) torch.save files have no index of their storages: they are loaded whole with
``torch.load(weights_only=True)``, the one case that reads more than it needs.

No pickle is ever executed here (the zip reader evaluates data.pkl symbolically), and
readahead is switched off on the files read (``POSIX_FADV_RANDOM``), so the bytes read
from storage stay close to the bytes of the tensors returned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping

import torch

from .formats import safetensors_header as st
from .formats.torchsave import flatten_tensors
from .problems import BAD_ARCHIVE, FormatError
from .tensor_bytes import (SAFETENSORS_DTYPE_NAMES, TensorLocation, locate,  # noqa: F401
                           locate_safetensors, locate_torch, read_range)

#: safetensors dtype names → torch dtypes: ``tensor_bytes``' names, as this torch has them.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in SAFETENSORS_DTYPE_NAMES.items()
    if hasattr(torch, name)}


class ReadStats:
    """Bytes and calls spent reading tensor data (thread safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.tensors_read = 0
        self.whole_file_loads = 0

    def add(self, nbytes: int, tensors: int = 1, whole: bool = False) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.tensors_read += tensors
            self.whole_file_loads += int(whole)


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` (torch name) or ``"F32"`` (safetensors name) → ``torch.float32``."""
    if name in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[name]
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError("dtype-unknown", f"unknown dtype {name!r}")
    return dtype


# --- reading -----------------------------------------------------------------------

def _from_bytes(buf: bytearray, loc: TensorLocation) -> torch.Tensor:
    dtype = torch_dtype(loc.dtype)
    numel = 1
    for d in loc.shape:
        numel *= d
    if numel == 0:
        return torch.empty(loc.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8).view(dtype)
    if loc.stride is None:
        return flat[:numel].view(loc.shape)
    return torch.as_strided(flat, loc.shape, loc.stride, 0).contiguous()


def _advise_random(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except (AttributeError, OSError):
        pass


def read_tensors(locations: Mapping[str, TensorLocation] | Iterable[TensorLocation], *,
                 stats: ReadStats | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors at ``locations``; keyed by ``TensorLocation.name``.

    Each file is opened once and read in offset order, one ``pread`` per tensor.
    """
    locs = list(locations.values()) if isinstance(locations, Mapping) else list(locations)
    by_file: dict[str, list[TensorLocation]] = {}
    for loc in locs:
        by_file.setdefault(loc.path, []).append(loc)
    out: dict[str, torch.Tensor] = {}
    for path, group in by_file.items():
        if any(loc.offset < 0 for loc in group):
            whole = torch.load(path, map_location="cpu", weights_only=True)
            flat = flatten_tensors(whole, is_tensor=_is_torch_tensor)
            if stats:
                stats.add(os.path.getsize(path), len(group), whole=True)
            for loc in group:
                if loc.file_key not in flat:
                    raise FormatError(BAD_ARCHIVE, f"{path}: no tensor {loc.file_key!r}")
                out[loc.name] = flat[loc.file_key].clone()
            continue
        fd = st.open_readonly(path)
        try:
            _advise_random(fd)
            for loc in sorted(group, key=lambda item: item.offset):
                buf = read_range(fd, loc.offset, loc.nbytes, f"tensor {loc.file_key!r} of {path}")
                if stats:
                    stats.add(loc.nbytes)
                out[loc.name] = _from_bytes(buf, loc)
        finally:
            os.close(fd)
    return out


def _is_torch_tensor(node) -> bool:
    return isinstance(node, torch.Tensor)


def drop_cache(path: str) -> None:
    """Ask the kernel to forget the file's cached pages (used by benchmarks and tests)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included, which ``torch.equal`` calls unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        size = a.element_size()
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(size)
        if as_int is None:
            return torch.equal(a, b)
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)
