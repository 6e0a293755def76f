"""Evaluations of data.pkl, memoised in the scan's ``ReadCache``, and the late checks on
their object trees; ``_fresh`` copies a memoised tree for a caller."""

from __future__ import annotations


from ckpt_tools.problems import BAD_ARCHIVE, FormatError
from ckpt_tools.read_cache import BoundedMemo
from .model import StorageRef, TensorRef, TorchSymbol, _Short
from .pickle_vm import _PickleVM, _check_extents, _check_tree, _run_pickle


_MEMO_MAX_PICKLE = 1 << 20  # larger pickles are evaluated afresh every time
_MEMO_VALUE_WEIGHT = 128  # bytes counted per value the VM pushed, for the memo's budget
# ``ReadCache.pickles``: (pickle bytes, strict, pid_len) → evaluation: pid_len 5 for a zip
# archive's data.pkl, 6 for the run of pickles that opens a legacy file.
# ``ReadCache.legacy_runs``: lengths of the pickle runs of the legacy files seen last: where
# to cut a legacy file's bytes to look its run up in ``pickles`` before evaluating it.


def _evaluate_data_pkl(data: bytes, strict: bool, memo: BoundedMemo | None):
    """(obj, storages by key, late error) of a zip archive's data.pkl; memoised.

    Raises the ``FormatError`` for a pickle the VM refuses. ``late_error`` is the
    (code, message) of a failed tensor-extent or object-tree check, which the caller
    raises after checking the storage records, as a fresh read would order them.
    ``memo``: a ``ReadCache.pickles``, or None to evaluate afresh.

    The evaluation and those checks are a pure function of the pickle's bytes and
    ``strict``, so the checkpoints of a run, whose router.pt / skill_library.pt /
    adapter pickles are byte-identical (tensor values live in the storage records, not
    in data.pkl), share one evaluation. The memoised ``obj`` tree is never handed out:
    ``_fresh`` gives every caller its own copy of the containers.
    """
    key = (data, strict, 5) if memo is not None and len(data) <= _MEMO_MAX_PICKLE else None
    found = memo.get(key) if key is not None else None
    if found is None:
        found, weight = _evaluate_afresh(data, strict)
        if key is not None:
            memo.put(key, found, weight)
    early_error, obj, refs, late_error = found
    if early_error is not None:
        raise FormatError(*early_error)
    return obj, refs, late_error


def _evaluate_afresh(data: bytes, strict: bool) -> tuple[tuple, int]:
    try:
        vm, obj, _ = _run_pickle(data, 0, strict=strict, pid_len=5)
    except _Short:
        return ((BAD_ARCHIVE, "data.pkl ends before its STOP opcode"), None, None, None), len(data)
    except FormatError as exc:
        return ((exc.code, exc.message), None, None, None), len(data)
    late_error = _late_checks(vm, obj, strict)
    keep = obj if strict and late_error is None else None
    return (None, keep, vm.storages, late_error), len(data) + _MEMO_VALUE_WEIGHT * vm.pushes


def _late_checks(vm: _PickleVM, obj, strict: bool) -> tuple[str, str] | None:
    """(code, message) where the tensors overrun their storages' declared sizes or the
    tree (when judged) is cyclic, too deep or too large unfolded; None when sound."""
    try:
        _check_extents(vm.tensors, vm.storages)
        if strict:
            _check_tree(obj)
    except FormatError as exc:
        return exc.code, exc.message
    return None


_ATOMS = frozenset({str, int, float, complex, bool, bytes, type(None), frozenset,
                    TensorRef, StorageRef, TorchSymbol})


def _fresh(node, memo: dict | None = None):
    """A copy of an object tree's mutable containers (dicts, lists, sets, and tuples that
    hold them), sharing what the tree shares; immutable leaves are the same objects.
    Linear in the distinct containers: ``_check_tree`` bounded the depth."""
    kind = type(node)
    if kind in _ATOMS:
        return node
    if memo is None:
        memo = {}
    ident = id(node)
    done = memo.get(ident)
    if done is not None:
        return done
    atoms = _ATOMS
    if kind is dict:
        copy: object = {}
        memo[ident] = copy
        for key, value in node.items():
            copy[key] = value if type(value) in atoms else _fresh(value, memo)
    elif kind is list:
        copy = []
        memo[ident] = copy
        for value in node:
            copy.append(value if type(value) in atoms else _fresh(value, memo))
    elif kind is tuple:
        items = [value if type(value) in atoms else _fresh(value, memo) for value in node]
        copy = node if all(a is b for a, b in zip(items, node)) else tuple(items)
        memo[ident] = copy
    elif kind is set:
        copy = set(node)
        memo[ident] = copy
    else:
        return node
    return copy


# -- memo of whole small archives -------------------------------------------------------
#
# The torch.save files of a run's checkpoints (router, skill library) differ only where the
# zip reader never looks: the bytes of every record but data.pkl (tensor values, the
# serialization id), the data descriptors and padding after each record, and the directory's
# CRC-32 fields of those records (only data.pkl's CRC is checked). Once an archive read whole
# has passed every check, where those ranges lie is known from its directory; a later file
# of the same size that is byte for byte the same outside them is the same input to every
# check, so it gets the same result. Every byte outside the ranges is compared (it is part
# of the key): a difference anywhere the reader looks means a full read.
