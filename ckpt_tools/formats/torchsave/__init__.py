"""Inspect ``torch.save`` files without unpickling them.

Two containers exist. The zip format (torch >= 1.6): one top-level folder holding
``data.pkl``, ``data/<key>`` storage records (always ZIP_STORED), ``version``,
``byteorder``... The legacy format (``_use_new_zipfile_serialization=False``): a
run of pickles (magic number, protocol version, sys_info, the object, the sorted list
of storage keys), then per storage an 8-byte little-endian element count and the raw
bytes.

The object pickle is evaluated by a small symbolic VM: nothing is imported and nothing
is called. It admits the globals that ``torch.load(weights_only=True)`` admits by
default (``torch/_weights_only_unpickler.py``) and models those a checkpoint uses:
dicts, lists, plain values and dense tensors, which become ``TensorRef`` records.

Modules: ``model`` (the records and the dtypes and globals known), ``pickle_vm`` (the VM),
``evaluation`` (data.pkl evaluations through the ``ReadCache``), ``zip_archive`` (the zip
container, and the memo of whole small archives: its docstring states the invariant every new
byte range read must keep), ``legacy`` (the legacy container); this
one opens the file and picks the container.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from ckpt_tools.formats.safetensors_header import ReadAt, no_readahead, open_regular, pread_full
from ckpt_tools.problems import TRUNCATED, FormatError
from ckpt_tools.read_cache import ReadCache

from .evaluation import _evaluate_afresh, _fresh  # noqa: F401 - bench/fuzz_atheris.py
from .legacy import _inspect_legacy
from .model import (ALLOWED_GLOBALS, DTYPE_SIZES, MAX_PICKLE_BYTES,  # noqa: F401 - re-exported
                    MAX_VIEW_EXPANSION, STORAGE_DTYPES, TRAINER_RNG_GLOBALS, StorageRef,
                    TensorRef, TorchFileInfo, TorchSymbol, _bad, _Short, _ZIP_LOCAL)
from .pickle_vm import _run_pickle  # noqa: F401 - tests and bench/fuzz_atheris.py
from .zip_archive import (_archive_from_memo, _central_directory,  # noqa: F401 - tests
                          _File, _find_central_directory, _handed_out, _inspect_zip, _read_zip,
                          _remember_archive, ArchiveRanges)


_SMALL_FILE = 1 << 20  # files up to this size are read whole, in one pread
_HEAD_READ = 16 * 1024  # larger files: the first read at offset 0 (data.pkl comes first)
_WHOLE_OBJECT = 64 * 1024  # in a bucket a request costs more than bytes: one GET up to this


def inspect_torch_file(path: str | os.PathLike, *,
                       check_pickle: bool | frozenset[str] = True,
                       max_pickle_bytes: int = MAX_PICKLE_BYTES, shared: bool = False,
                       file_size: int | None = None,
                       cache: ReadCache | None = None,
                       read_at: ReadAt | None = None) -> TorchFileInfo:
    """Check a ``torch.save`` file's container and pickle without unpickling it.

    Reads the zip directory and the pickle, never the tensor data: a file of up to
    1 MiB in one ``pread``, a larger one by its first and last 16 KiB and what else the
    directory points at. With ``check_pickle`` a global that
    ``torch.load(weights_only=True)`` would refuse, or an allowlisted call this reader
    does not model, raises ``FormatError`` ``unsafe-pickle``; without it (for files such
    as ``training_args.bin`` that are never loaded) globals are not judged and ``obj`` is
    None. Other damage raises ``bad-archive`` or ``truncated``; errors from the OS
    propagate as ``OSError``. With a ``cache`` (``ReadCache``), evaluations of pickles and
    whole small archives are memoised in it (see above); each call gets its own ``obj`` tree,
    unless ``shared``: then the result may be the very object other calls with that cache
    get, never to be mutated. Without one, nothing is memoised and every result is new.
    ``file_size``: the size of a regular file as the caller's own ``lstat`` saw it (see
    ``safetensors_header.open_regular``). ``check_pickle`` may be a frozenset of global
    names (``TRAINER_RNG_GLOBALS``): then it is True with those globals allowed too.
    ``read_at`` (an object in a bucket): its bytes come through it, ``file_size`` being the
    size listed, and only the ranges the container needs are asked for, whatever its size.
    """
    if read_at is not None:
        return _inspect(read_at, file_size, _WHOLE_OBJECT, check_pickle, max_pickle_bytes,
                        shared, cache)
    fd, size = open_regular(path, file_size)
    try:
        if size > _SMALL_FILE:
            no_readahead(fd)
        return _inspect(partial(pread_full, fd), size, _SMALL_FILE, check_pickle, max_pickle_bytes,
                        shared, cache)
    finally:
        os.close(fd)


def _inspect(read_at: ReadAt, size: int, whole_up_to: int, check_pickle, max_pickle_bytes: int,
             shared: bool, cache: ReadCache | None) -> TorchFileInfo:
    """``inspect_torch_file`` of the file ``read_at`` reads: one up to ``whole_up_to`` bytes in
    one read, a larger one by the ranges the container needs (its head, its central directory
    from the tail, the pickle records), each one request on object storage."""
    if size == 0:
        raise FormatError(TRUNCATED, "empty file")
    if size <= whole_up_to:
        data = read_at(size, 0)
        f = _File(read_at, len(data), data)  # a file cut short since fstat: what is there
        if data[:4] == _ZIP_LOCAL:
            if cache is None:
                return _read_zip(f, check_pickle, max_pickle_bytes, None)[0]
            memo = cache.archives
            info = _archive_from_memo(memo, data, check_pickle, max_pickle_bytes)
            if info is None:
                info, entries, cd_offset = _read_zip(f, check_pickle, max_pickle_bytes, cache)
                _remember_archive(memo, data, info, entries, cd_offset, check_pickle,
                                  max_pickle_bytes)
            return info if shared else _handed_out(info)
    else:
        f = _File(read_at, size)
        data = f.keep(0, min(_HEAD_READ, size))
    if data[:4] == _ZIP_LOCAL:
        return _inspect_zip(f, check_pickle, max_pickle_bytes, cache)
    return _inspect_legacy(f, check_pickle, max_pickle_bytes, cache)


def flatten_tensors(obj, *, max_nodes: int = 10_000_000,
                    is_tensor: Callable[[object], bool] | None = None) -> dict[str, TensorRef]:
    """Map dotted names to the tensors of a state-dict-like tree.

    Nested dict keys and list/tuple indices are joined with '.', in the tree's order:
    ``{"gate_state_dict": {"weight": t}}`` gives ``{"gate_state_dict.weight": t}``.
    Raises ``FormatError`` (``bad-archive``) past ``max_nodes`` visited nodes, which
    bounds the work on trees that share a subtree many times. A leaf is a tensor when
    ``is_tensor`` says so (default: a ``TensorRef`` of this reader); ``tensor_io`` passes
    torch's, so that a tree ``torch.load`` built gets the very names this reader gives.
    """
    if is_tensor is None:
        is_tensor = _is_tensor_ref
    out: dict[str, TensorRef] = {}
    work: list[tuple[str, object]] = [("", obj)]
    visited = 0
    while work:
        name, node = work.pop()
        visited += 1
        if visited > max_nodes:
            raise _bad(f"object tree has more than {max_nodes} nodes")
        if is_tensor(node):
            out[name] = node
            continue
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        work.extend((f"{name}.{key}" if name else str(key), value)
                    for key, value in reversed(items))
    return out


def _is_tensor_ref(node) -> bool:
    return isinstance(node, TensorRef)


__all__ = ["inspect_torch_file", "flatten_tensors", "TorchFileInfo", "TensorRef", "StorageRef",
           "TorchSymbol", "DTYPE_SIZES", "STORAGE_DTYPES", "ALLOWED_GLOBALS", "TRAINER_RNG_GLOBALS",
           "MAX_PICKLE_BYTES", "MAX_VIEW_EXPANSION"]
