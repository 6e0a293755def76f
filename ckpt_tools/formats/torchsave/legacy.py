"""The legacy torch.save container (``_use_new_zipfile_serialization=False``): a run of
pickles, then per storage its element count and raw bytes."""

from __future__ import annotations

import struct

from ckpt_tools.problems import TRUNCATED, UNSAFE_PICKLE, FormatError
from ckpt_tools.read_cache import ReadCache
from .evaluation import _MEMO_MAX_PICKLE, _MEMO_VALUE_WEIGHT, _fresh, _late_checks
from .model import DTYPE_SIZES, TorchFileInfo, _LEGACY_MAGIC, _Short, _bad, _show
from .pickle_vm import _run_pickle
from .zip_archive import _File


_LEGACY_PROTOCOL = 1001
_LEGACY_MAGIC_PICKLE = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") + b"."
_FIRST_LEGACY_READ = 64 * 1024

def _parse_legacy_pickles(data: bytes, check_pickle: bool):
    not_torch = _bad("neither a zip archive nor a legacy torch.save file")
    try:
        _, magic, pos = _run_pickle(data, 0, strict=True)
    except _Short:
        if _LEGACY_MAGIC_PICKLE.startswith(data):
            raise FormatError(TRUNCATED, "file ends inside the legacy magic number") from None
        raise not_torch from None
    except FormatError as exc:
        if exc.code == UNSAFE_PICKLE:  # a plain pickle that torch.load would run
            raise
        raise not_torch from None
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _bad("neither a zip archive nor a legacy torch.save file (no magic number)")
    _, protocol, pos = _run_pickle(data, pos, strict=True)
    if protocol != _LEGACY_PROTOCOL:
        raise _bad(f"legacy torch.save protocol {_show(protocol)}, expected {_LEGACY_PROTOCOL}")
    _, sys_info, pos = _run_pickle(data, pos, strict=True)
    if not isinstance(sys_info, dict):
        raise _bad("legacy torch.save sys_info is not a dict")
    vm, obj, pos = _run_pickle(data, pos, strict=check_pickle, pid_len=6)
    _, keys, pos = _run_pickle(data, pos, strict=True)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _bad("legacy storage key list is not a list of strings")
    return vm, obj, keys, pos


def _legacy_pickles(data: bytes, check_pickle: bool, cache: ReadCache | None):
    """``_parse_legacy_pickles`` and the late checks, memoised: (obj, storages by key,
    storage keys, end of the pickles, late error). Raises ``_Short`` and errors as it does.

    A legacy file's pickles come first and end at the key list's STOP, so the file's
    bytes up to there are the key; where that is is known only once they are evaluated,
    so the run lengths seen last are tried. The VM reads nothing past a STOP, so a run
    that evaluated whole from those bytes evaluates the same from any longer prefix.
    """
    if cache is not None:
        for length in cache.legacy_runs.recent():
            if length <= len(data):
                found = cache.pickles.get((data[:length], check_pickle, 6))
                if found is not None:
                    cache.legacy_runs.get(length)
                    return found
    vm, obj, keys, pos = _parse_legacy_pickles(data, check_pickle)
    late_error = _late_checks(vm, obj, check_pickle)
    found = (obj if check_pickle and late_error is None else None, vm.storages, keys, pos,
             late_error)
    if cache is not None and pos <= _MEMO_MAX_PICKLE:
        cache.pickles.put((data[:pos], check_pickle, 6), found,
                          pos + _MEMO_VALUE_WEIGHT * vm.pushes)
        cache.legacy_runs.put(pos, True, 1)
    return found


def _inspect_legacy(f: _File, check_pickle: bool, max_pickle_bytes: int,
                    cache: ReadCache | None) -> TorchFileInfo:
    size = f.size
    want = min(_FIRST_LEGACY_READ, max_pickle_bytes)
    while True:
        data = f.get(0, min(size, want))
        try:
            obj, refs, keys, pos, late_error = _legacy_pickles(data, check_pickle, cache)
            break
        except _Short:
            if len(data) >= size:
                raise FormatError(TRUNCATED, f"file ends at byte {size} inside its "
                                             "pickle data") from None
            if want >= max_pickle_bytes:
                raise _bad(f"pickle data exceeds the {max_pickle_bytes}-byte limit") from None
            want = min(want * 8, max_pickle_bytes)

    if len(set(keys)) != len(keys):
        raise _bad("legacy storage key list repeats a key")
    if set(keys) != set(refs):
        missing = sorted(set(refs) - set(keys)) or sorted(set(keys) - set(refs))
        raise _bad(f"storage {_show(missing[0])} is referenced but not stored, or stored but "
                   "not referenced")
    storages: dict[str, tuple[str, int]] = {}
    for key in keys:
        storage = refs[key]
        head = f.get(pos, 8)
        if len(head) < 8:
            raise FormatError(TRUNCATED, f"file ends at byte {size} before storage {_show(key)}")
        (count,) = struct.unpack("<q", head)
        nbytes = count * DTYPE_SIZES[storage.dtype]
        if count < 0 or nbytes != storage.nbytes:
            raise _bad(f"storage {_show(key)} holds {count} elements, the pickle declared "
                       f"{storage.nbytes // DTYPE_SIZES[storage.dtype]}")
        pos += 8 + nbytes
        if pos > size:
            raise FormatError(TRUNCATED, f"storage {_show(key)} ends at byte {pos} but the file "
                                         f"has {size} bytes")
        storages[key] = (storage.dtype, nbytes)
    if late_error is not None:
        raise FormatError(*late_error)
    if check_pickle and cache is not None:
        obj = _fresh(obj)  # the memoised tree is shared: the caller gets its own containers
    return TorchFileInfo("legacy", obj if check_pickle else None, storages)
