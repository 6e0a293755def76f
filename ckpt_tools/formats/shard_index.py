"""Shard indexes: every shard present, every tensor in exactly one shard, the headers agreeing
with the index.

``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` is
``{"metadata": {"total_size": <bytes>, ...}, "weight_map": {tensor: shard file name}}``; the
shards lie beside it. ``check_shard_index`` judges an index already parsed against the tensors
the caller read from its shards' headers: a pure function, no file opened, its work linear in
the size of the index and of the headers, its messages short whatever their size.
"""

from __future__ import annotations

import heapq
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..problems import BAD_JSON, ERROR, INDEX_MISMATCH, MISSING_FILE, WARNING, Severity
from . import torchsave
from .safetensors_header import DTYPE_BITS

#: Tensor names shown in one message; the rest are counted.
SHOWN = 3
#: Missing shards reported one by one; the rest in one problem on the index.
MISSING_SHOWN = 8
_NAME_CHARS = 80
_INDEX_SUFFIX = ".index.json"


class TensorLike(Protocol):
    """What a header declares of a tensor (``validator.verdict.Tensor`` is one)."""

    dtype: str
    shape: tuple[int, ...]


class Finding(NamedTuple):
    """One problem, in the order ``_Ctx.add`` takes it; ``relpath`` is relative to the checkpoint."""

    code: str
    relpath: str
    message: str
    severity: Severity = ERROR


@dataclass(frozen=True)
class ShardIndexCheck:
    """What ``check_shard_index`` found: its problems, and the shards the index names
    (relpaths, sorted; only names that stay in the index's folder)."""

    problems: tuple[Finding, ...]
    shards: tuple[str, ...]


def _name(text: str) -> str:
    """A tensor or file name for a message: quoted, a hostile length cut short."""
    return repr(text if len(text) <= _NAME_CHARS else text[:_NAME_CHARS] + "…")


def _listed(names: list[str]) -> str:
    shown = ", ".join(_name(n) for n in sorted(names[:SHOWN * 20])[:SHOWN])
    return shown + (f" and {len(names) - SHOWN:,} more" if len(names) > SHOWN else "")


def _safe_shard_name(name: str) -> bool:
    """A plain file name: never resolved outside the index's folder."""
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not (len(name) > 1 and name[1] == ":"))


def _weight_map(index_rel: str, index: object) -> tuple[dict[str, str] | None, Finding | None]:
    base = posixpath.basename(index_rel)
    if not isinstance(index, dict):
        return None, Finding(BAD_JSON, index_rel, f"{base} is {type(index).__name__}, not an object")
    weight_map = index.get("weight_map")
    if weight_map is None:
        return None, Finding(BAD_JSON, index_rel, f"{base} has no weight_map")
    if not isinstance(weight_map, dict):
        return None, Finding(BAD_JSON, index_rel, f"{base}'s weight_map is "
                                                  f"{type(weight_map).__name__}, not an object")
    for tensor, shard in weight_map.items():   # stops at the first bad entry
        if not isinstance(shard, str):
            return None, Finding(BAD_JSON, index_rel,
                                 f"weight_map[{_name(tensor)}] is {type(shard).__name__}, "
                                 f"not a shard file name")
    return weight_map, None


def shards_of(index_rel: str, index: object) -> tuple[str, ...]:
    """The relpaths of the shards an index names that stay in its folder, sorted: the files
    whose headers the caller reads before ``check_shard_index``."""
    weight_map, _ = _weight_map(index_rel, index)
    if weight_map is None:
        return ()
    folder = posixpath.dirname(index_rel)
    return tuple(sorted(posixpath.join(folder, s) for s in set(weight_map.values())
                        if _safe_shard_name(s)))


def tensor_bytes(tensor: TensorLike) -> int | None:
    """The bytes a tensor's data occupies; None for a dtype neither safetensors nor torch
    names (a safetensors header says ``F32``, a torch.save archive ``float32``)."""
    count = 1
    for dim in tensor.shape:
        count *= dim
    bits = DTYPE_BITS.get(tensor.dtype)
    if bits is not None:
        return (count * bits + 7) // 8
    size = torchsave.DTYPE_SIZES.get(tensor.dtype)
    return None if size is None else count * size


def check_shard_index(index_rel: str, index: object,
                      shards: Mapping[str, Mapping[str, TensorLike] | None],
                      present: Callable[[str], bool],
                      shard_files: Iterable[str] = ()) -> ShardIndexCheck:
    """Judge a parsed shard index against its shards.

    ``index_rel``: the index's relpath in the checkpoint. ``shards``: shard relpath → the
    tensors its header declares, None where it could not be read (a problem the caller
    reported); a shard absent from it is not compared. ``present(relpath)``: whether a file is
    there. ``shard_files``: the shard files the caller found in the index's folder; those of
    the index's format that it does not name are a warning.
    """
    weight_map, bad = _weight_map(index_rel, index)
    if weight_map is None:
        return ShardIndexCheck((bad,), ())
    base = posixpath.basename(index_rel)
    folder = posixpath.dirname(index_rel)
    problems: list[Finding] = []

    prefix = f"{folder}/" if folder else ""
    rel_of: dict[str, str] = {}                # shard name → its relpath in the checkpoint
    unsafe: list[str] = []
    for shard in set(weight_map.values()):
        if _safe_shard_name(shard):
            rel_of[shard] = prefix + shard
        else:
            unsafe.append(shard)
    if unsafe:
        problems.append(Finding(BAD_JSON, index_rel,
                                f"weight_map names shard files outside {base}'s folder: "
                                f"{_listed(unsafe)}; a shard is a plain file name"))

    missing = {rel for rel in rel_of.values() if not present(rel)}
    problems += [Finding(MISSING_FILE, rel, f"named by {base} but absent")
                 for rel in heapq.nsmallest(MISSING_SHOWN, missing)]
    if len(missing) > MISSING_SHOWN:
        problems.append(Finding(MISSING_FILE, index_rel,
                                f"{len(missing) - MISSING_SHOWN:,} more shards it names are absent"))

    problems += _agreement(index_rel, weight_map, rel_of, shards, missing)
    problems += _total_size(index_rel, index, weight_map, rel_of, shards, missing)
    named = set(rel_of.values())
    unnamed = _unnamed_shards(base, folder, named, shard_files)
    if unnamed:
        problems.append(Finding(INDEX_MISMATCH, index_rel,
                                f"shard files beside it that it does not name: {_listed(unnamed)}",
                                WARNING))
    return ShardIndexCheck(tuple(problems), tuple(sorted(named)))


def _unnamed_shards(base: str, folder: str, named: set[str], files: Iterable[str]) -> list[str]:
    """The files beside the index shaped as its shards (``model-….safetensors`` for
    ``model.safetensors.index.json``) that it does not name."""
    if not base.endswith(_INDEX_SUFFIX):
        return []
    stem, suffix = posixpath.splitext(base[:-len(_INDEX_SUFFIX)])
    return [posixpath.basename(f) for f in files
            if f not in named and posixpath.dirname(f) == folder
            and posixpath.basename(f).startswith(f"{stem}-") and f.endswith(suffix)]


def _agreement(index_rel, weight_map, rel_of, shards, missing) -> list[Finding]:
    """The index against the headers of the shards read: each tensor it lists in a shard
    held there, each tensor a header holds listed, and no tensor in two shards."""
    read = {shard: shards[rel] for shard, rel in rel_of.items()
            if rel not in missing and shards.get(rel) is not None}
    holder: dict[str, str] = {}    # tensor → the first shard (by name) whose header holds it
    twice: list[str] = []
    for shard in sorted(read):
        for tensor in read[shard]:
            if holder.setdefault(tensor, shard) != shard:
                twice.append(tensor)
    misplaced: list[str] = []      # listed in S, S lacks it, another shard holds it
    lacking: list[str] = []        # listed in S, no shard read holds it
    for tensor, shard in weight_map.items():
        header = read.get(shard)
        if header is not None and tensor not in header:
            (misplaced if tensor in holder else lacking).append(tensor)
    unlisted = [t for t in holder if t not in weight_map]
    found = []
    if misplaced:
        first = misplaced[0]
        found.append(_mismatch(index_rel, misplaced, "listed in a shard that lacks it and held by "
                               f"another (the first, {_name(first)}, is in "
                               f"{_name(holder[first])}, listed in {_name(weight_map[first])})"))
    for names, what in ((lacking, "listed in a shard that lacks it, held by no shard"),
                        (unlisted, "held by a shard but not listed in the index"),
                        (twice, "held by two shards")):
        if names:
            found.append(_mismatch(index_rel, names, what))
    return found


def _mismatch(index_rel: str, names: list[str], what: str) -> Finding:
    return Finding(INDEX_MISMATCH, index_rel,
                   f"{len(names):,} tensor{'s' if len(names) > 1 else ''} {what}: {_listed(names)}")


def _total_size(index_rel, index, weight_map, rel_of, shards, missing) -> list[Finding]:
    """``metadata.total_size`` against the bytes the headers' tensors hold, where every shard
    was read and every dtype is known; a disagreement is a warning (old writers counted
    differently, and nothing loads by it)."""
    metadata = index.get("metadata")
    declared = metadata.get("total_size") if isinstance(metadata, dict) else None
    if declared is None:
        return []
    if isinstance(declared, bool) or not isinstance(declared, (int, float)):
        return [Finding(INDEX_MISMATCH, index_rel,
                        f"metadata.total_size is {type(declared).__name__}, not a number of bytes",
                        WARNING)]
    total = 0
    for rel in rel_of.values():
        header = shards.get(rel)
        if header is None or rel in missing:
            return []
        for tensor in header.values():
            size = tensor_bytes(tensor)
            if size is None:
                return []
            total += size
    if declared != total:
        big = isinstance(declared, int) and declared.bit_length() > 64
        said = "more than 2**64" if big else f"{declared:,}"
        return [Finding(INDEX_MISMATCH, index_rel,
                        f"metadata.total_size says {said} bytes but the shards' tensors "
                        f"hold {total:,}", WARNING)]
    return []
