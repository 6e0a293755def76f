"""Prove by content that a checkpoint's merged weights hold nothing its PEFT tree lacks.

``audit``'s ``redundant`` is structural: the PEFT tree is complete and sound. Before prune
deletes merged weights (in its plan, and again right before the unlink) it proves more:

- the PEFT tree is this checkpoint's own: no file of it (adapter, router, config), nor a
  directory of it, is a symlink that leads out of the checkpoint directory, and its MoE
  state is not the run's (``best_model/``'s ``../dylo_moe_state``): such a tree proves
  nothing, since what it points at may change or go with another checkpoint;
- for each expert, the merged weights (V1 ``foundation_model.base_model.model.…``, V0
  ``foundation_model.model.…``, every shard) hold exactly the LoRA tensors of the PEFT tree
  (same canonical names, as ``tensor_bytes`` maps them for migrate), each with the
  same dtype, shape and bytes;
- every router tensor of the merged weights (``router.gate.weight`` / ``.bias``) equals the
  PEFT tree router's (router.pt, router.safetensors, or V2's ``gate_state_dict`` form).

A merged file that is a symlink is not compared: prune unlinks the link itself, and its
target, whatever it holds, stays. Torch is not imported: the headers (safetensors) and
pickles (torch.save, evaluated symbolically) say where each tensor lies, and only those byte
ranges are read and compared. A tensor that is not one plain contiguous slice of its file,
or that cannot be read, is not proven. ``validate --deep`` reports the same comparison as ``merged-mismatch``.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .. import layout
from ..checkpoint_reads import ROW_IS_SYMLINK, ROW_RELPATH, ROW_SYMLINK_TARGET, regular_size
from ..formats import safetensors_header as st
from ..formats import torchsave
from ..kinds import TreeForm
from ..layout import Role
from ..problems import TRUNCATED, FormatError
from ..read_cache import ReadCache
from ..records import Checkpoint, CheckpointDir
from ..tensor_bytes import (TensorLocation, group_moe_lora, group_peft_lora, group_router,
                           locate_safetensors, locate_torch, lora_or_router_key)

if TYPE_CHECKING:
    from ..storage.remote import ObjectStorage
    from ..validator import VerdictFacts

DIFFER = "merged weights differ from the PEFT tree"
NOT_PROVEN = "merged weights not proven redundant"

# Files up to this size are read whole, header and tensors in one pread.
_WHOLE_FILE = 1 << 20
# Tensors closer than this in one file are read in one pread; a read is at most _BLOCK long
# (a longer tensor is compared piece by piece), a batch of reads at most _BATCH.
_GAP = 64 * 1024
_BLOCK = 8 << 20
_BATCH = 32 << 20
_JOIN = 64 * 1024      # tensors compared at once: joined into buffers of about this size
_MEMO_MAX = 256


@dataclass(frozen=True)
class ProofFailure:
    """Why merged weights are not proven redundant. ``mismatch``: the PEFT tree and the merged
    weights really disagree (a tensor differs or has no counterpart), rather than the proof
    being impossible (a symlink, an unreadable file, a tensor that is not a plain slice)."""

    reason: str
    mismatch: bool


class _Fail(Exception):
    def __init__(self, reason: str, mismatch: bool = False):
        super().__init__(reason)
        self.failure = ProofFailure(reason, mismatch)


class _Input(NamedTuple):
    rel: str             # relative to the checkpoint
    kind: str            # "adapter" | "flat" | "router" | "merged"
    expert: int | None = None


@dataclass(frozen=True)
class _Pairing:
    """What to compare, found from the files' headers alone.

    ``blocks``: per file, the byte ranges (offset, length) to read. ``batches``: the
    comparisons, in batches of reads that fit in ``_BATCH`` bytes: (the reads (file, read),
    then groups of tensors compared at once: the tree side and the merged side as runs
    (read's slot, slice) in one order, and per tensor (label, slot, slice, slot, slice) for
    saying which one differs). ``keep`` holds the parsed headers the memo is keyed by."""

    blocks: tuple[tuple[tuple[int, int], ...], ...]
    batches: tuple[tuple, ...]
    keep: tuple


class _File:
    """One input file, opened once: its descriptor (None for an object in a bucket, read by
    ranges through ``read_at``), its size and, when it is small, its bytes."""

    __slots__ = ("rel", "path", "fd", "size", "whole", "read_at")

    def __init__(self, rel: str, path: str, size: int | None,
                 storage: ObjectStorage | None = None):
        """``size``: the size the scan's ``lstat`` (or listing) found for a regular file (then
        no ``fstat``; see ``safetensors_header.open_regular``), else None."""
        self.rel, self.path = rel, path
        self.fd, self.read_at = None, None
        if storage is None:
            self.fd, self.size = st.open_regular(path, size)
        else:
            self.size, self.read_at = storage.reader(path, size)
        self.whole: bytes | None = None
        try:
            if self.size <= _WHOLE_FILE:
                self.whole = self._pread(self.size, 0)
            elif self.fd is not None:
                st.no_readahead(self.fd)
        except BaseException:
            self.close()
            raise

    def _pread(self, nbytes: int, offset: int) -> bytes:
        if self.read_at is not None:
            return self.read_at(nbytes, offset)
        return st.pread_full(self.fd, nbytes, offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def read(self, offset: int, nbytes: int) -> memoryview:
        """The ``nbytes`` bytes at ``offset``; FormatError ``truncated`` where the file ends first."""
        if self.whole is None:
            data, offset = self._pread(nbytes, offset), 0
        else:
            data = self.whole
        if offset + nbytes > len(data):
            raise FormatError(TRUNCATED, "file ends inside a tensor")
        return memoryview(data)[offset:offset + nbytes]

    def header(self, first_read: int, memo: dict | None) -> st.SafetensorsHeader:
        data = self.whole if self.whole is not None else self._pread(first_read, 0)
        if len(data) >= 8:
            need = 8 + int.from_bytes(data[:8], "little")
            if len(data) < need <= min(self.size, 8 + st.MAX_HEADER_BYTES):
                data += self._pread(need - len(data), len(data))
        return st.parse_cached(data, self.size, memo)


class ContentProof:
    """``proof(checkpoint)``: None when its merged weights are proven redundant by content,
    else the reason (one line, naming the file and the tensor).

    One object serves a whole prune run: it remembers which byte ranges to compare for each
    combination of headers met (the checkpoints of a run repeat them; the readers share the
    parsed headers of identical bytes), so that a checkpoint like the one before costs only
    its reads. It holds no open file between calls. ``cache``: the ``ReadCache`` its reads
    of headers and torch.save files go through (the scan's, when it has one); by default one
    of its own, which lives as long as this object. ``storage``: the object storage the
    checkpoints were listed from (their files are then read by byte ranges through it);
    None for local directories.
    """

    def __init__(self, cache: ReadCache | None = None,
                 storage: ObjectStorage | None = None) -> None:
        self._cache = ReadCache() if cache is None else cache
        self._storage = storage
        self._pairings: dict[tuple, _Pairing] = {}
        self._inputs: dict[tuple, list[_Input] | str] = {}
        self._first_read: dict[str, int] = {}

    def __call__(self, c: Checkpoint) -> str | None:
        facts = c.facts if c.facts is not None else _facts_of(c.dir)
        failure = self.check(c.dir, c.merged_files, tree_form=facts.tree_form,
                             router=facts.router, moe_dir=facts.moe_dir)
        return None if failure is None else failure.reason

    def check(self, ckpt: CheckpointDir, merged_files, *, tree_form: TreeForm,
              router: str | None, moe_dir: str, own_tree: bool = True) -> ProofFailure | None:
        """The proof for ``ckpt``, whose verdict found ``merged_files``, a PEFT tree of
        ``tree_form``, the router state at ``router`` and the MoE state in ``moe_dir`` (its
        ``VerdictFacts``); ``own_tree=False`` leaves out the rule that the PEFT tree must be
        the checkpoint's own (``validate --deep`` compares contents only)."""
        rows = ckpt.files
        # Unlinking a symlink loses nothing (its target stays): only the merged files that
        # are files of their own must hold nothing the tree lacks.
        links = {r[ROW_RELPATH] for r in rows if r[ROW_IS_SYMLINK]}
        held = tuple(m for m in merged_files
                     if m not in links and layout.role_of(m).role is Role.MERGED)
        if not held:
            return None
        try:
            inputs = self._inputs_of(tuple(r[ROW_RELPATH] for r in rows), held, tree_form,
                                     router)
            if own_tree:
                _check_own(ckpt, rows, moe_dir, inputs)
            self._compare(ckpt, rows, inputs, tree_form)
        except _Fail as exc:
            return exc.failure
        return None

    def _inputs_of(self, relpaths: tuple[str, ...], merged_files: tuple[str, ...],
                   tree_form: TreeForm, router: str | None) -> list[_Input]:
        """``_inputs``, once per set of relpaths (the checkpoints of a run repeat theirs);
        ``merged_files``: the merged-weight files (not index, not symlink) to compare."""
        key = (relpaths, merged_files, tree_form, router)
        found = self._inputs.get(key)
        if found is None:
            try:
                found = _inputs(relpaths, merged_files, tree_form, router)
            except _Fail as exc:
                found = exc.failure.reason
            if len(self._inputs) >= _MEMO_MAX:
                self._inputs.clear()
            self._inputs[key] = found
        if isinstance(found, str):
            raise _Fail(found)
        return found

    # --- the comparison ----------------------------------------------------------------

    def _compare(self, ckpt: CheckpointDir, rows, inputs: list[_Input],
                 tree_form: TreeForm) -> None:
        base = ckpt.abspath if self._storage is None else self._storage.path_of(ckpt)
        sep = os.sep if self._storage is None else "/"
        prefix = base if base.endswith(sep) else base + sep
        sizes = {r[ROW_RELPATH]: regular_size(r) for r in rows if regular_size(r) is not None}
        files: list[_File] = []
        try:
            for inp in inputs:
                path = prefix + inp.rel if sep == "/" else os.path.join(base, *inp.rel.split("/"))
                files.append(self._open(inp.rel, path, sizes.get(inp.rel), self._storage))
            parsed = [self._parse(f) for f in files]
            key = (tree_form,) + tuple((i, id(p)) for i, p in zip(inputs, parsed))
            pairing = self._pairings.get(key)
            if pairing is None:
                pairing = _pair(inputs, [f.path for f in files], parsed,
                                [(f.read_at, f.size) for f in files])
                if len(self._pairings) >= _MEMO_MAX:
                    self._pairings.clear()
                self._pairings[key] = pairing
            _compare_bytes(files, pairing)
        finally:
            for f in files:
                f.close()

    @staticmethod
    def _open(rel: str, path: str, size: int | None, storage: ObjectStorage | None) -> _File:
        try:
            return _File(rel, path, size, storage)
        except (FormatError, OSError) as exc:
            raise _Fail(f"{NOT_PROVEN}: cannot read {rel}: {_why(exc)}") from None

    def _parse(self, f: _File):
        """The file's header (safetensors) or ``TorchFileInfo`` (torch.save)."""
        try:
            if not f.rel.endswith(".safetensors"):
                return torchsave.inspect_torch_file(f.path, check_pickle=True, shared=True,
                                                    file_size=f.size, cache=self._cache,
                                                    read_at=f.read_at)
            header = f.header(self._first_read.get(f.rel, st.FIRST_READ_BYTES),
                              self._cache.headers)
            self._first_read[f.rel] = (header.data_start + 4095) // 4096 * 4096
            return header
        except ValueError:   # the file ended before the header it declares (it shrank)
            raise _Fail(f"{NOT_PROVEN}: cannot read {f.rel}: file ends inside its header") from None
        except (FormatError, OSError) as exc:
            raise _Fail(f"{NOT_PROVEN}: cannot read {f.rel}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    if isinstance(exc, FormatError):
        return exc.message
    return getattr(exc, "strerror", None) or str(exc)


def _facts_of(ckpt: CheckpointDir) -> VerdictFacts:
    """The facts of a record built without a verdict (a caller's own)."""
    from ..validator import validate_checkpoint
    return validate_checkpoint(ckpt, min_age_s=0).facts


def _inputs(relpaths: tuple[str, ...], merged_files: tuple[str, ...], tree_form: TreeForm,
            router: str | None) -> list[_Input]:
    """The files the proof reads: each expert's weights, the router, the merged weights."""
    roles = {rel: layout.role_of(rel) for rel in relpaths}
    inputs: list[_Input] = []
    if tree_form in (layout.TREE_CANONICAL, layout.TREE_NESTED):
        nested = tree_form == layout.TREE_NESTED
        weights: dict[int, list[str]] = {}
        for rel, r in sorted(roles.items()):
            if r.role is Role.ADAPTER_WEIGHTS and r.nested == nested:
                weights.setdefault(r.expert, []).append(rel)
        for e, rels in sorted(weights.items()):
            # as the validator: adapter_model.safetensors where both are there
            rel = min(rels, key=lambda p: not p.endswith(layout.ADAPTER_WEIGHTS))
            inputs.append(_Input(rel, "adapter", e))
    elif tree_form == layout.TREE_FLAT:
        inputs += [_Input(rel, "flat", r.expert) for rel, r in sorted(roles.items())
                   if r.role is Role.FLAT_EXPERT]
    if not inputs:
        raise _Fail(f"{NOT_PROVEN}: no PEFT tree to compare with")
    if not router:
        raise _Fail(f"{NOT_PROVEN}: no router state to compare with")
    inputs.append(_Input(router, "router"))
    inputs += [_Input(m, "merged") for m in merged_files]
    return inputs


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_own(ckpt: CheckpointDir, rows, moe_dir: str, inputs: list[_Input]) -> None:
    """The PEFT tree must be the checkpoint's own (see the module's docstring)."""
    for rel in [moe_dir] + [i.rel for i in inputs if i.kind != "merged"]:
        if rel.split("/", 1)[0] == layout.PARENT_DIR:
            raise _Fail(f"{NOT_PROVEN}: {rel} lies outside this checkpoint (the run's, "
                        "rewritten by its next save): it proves nothing")
    real = None
    for row in rows:
        if not row[ROW_IS_SYMLINK]:
            continue
        rel = row[ROW_RELPATH]
        top = rel.split("/", 1)[0]
        role = layout.role_of(rel).role
        if not (role in layout.PEFT_TREE_ROLES or role is Role.ROOT_CONFIG
                or top in (layout.PEFT_DIR, layout.MOE_STATE_DIR)):
            continue
        if real is None:
            real = os.path.realpath(ckpt.abspath)
        target = row[ROW_SYMLINK_TARGET]
        if target is None or not _inside(target, real):
            raise _Fail(f"{NOT_PROVEN}: {rel} is a symlink to {target or 'nothing'}, outside "
                        "this checkpoint: a PEFT tree that is not the checkpoint's own proves nothing")


# --- pairing tensors (from the headers alone) ----------------------------------------------

def _is_lora(key: str) -> bool:
    return ".lora_" in key


def _locations(inp: _Input, path: str, parsed, reader=(None, None)) -> dict[str, TensorLocation]:
    wanted = {"adapter": _is_lora, "flat": _is_lora, "router": None,
              "merged": lora_or_router_key}[inp.kind]
    try:
        if isinstance(parsed, st.SafetensorsHeader):
            return locate_safetensors(path, header=parsed, wanted=wanted)
        return locate_torch(path, wanted, info=parsed, read_at=reader[0], size=reader[1])
    except (FormatError, OSError) as exc:
        raise _Fail(f"{NOT_PROVEN}: cannot read {inp.rel}: {_why(exc)}") from None


def _shown(ckey: str) -> str:
    return ckey.removeprefix(layout.CANONICAL_KEY_PREFIX)


def _flat_peft_form(inp: _Input, locs: dict) -> bool:
    """An ``expert_<i>.pt`` file keyed as PEFT saves an adapter (``layout.flat_expert_peft_form``)."""
    try:
        return layout.flat_expert_peft_form(locs)
    except layout.MixedKeyForms as exc:
        raise _Fail(f"{NOT_PROVEN}: {inp.rel} {exc}") from None


def _pair(inputs: list[_Input], paths: list[str], parsed: list, readers: list) -> _Pairing:
    """Which tensor of the PEFT tree each LoRA / router tensor of the merged weights must
    equal; ``_Fail`` where one has no counterpart or the two disagree on dtype or shape.
    ``readers``: per file, (its ``read_at``, its size) when it is an object in a bucket."""
    index = {p: n for n, p in enumerate(paths)}
    tree: dict[int, dict[str, TensorLocation]] = {}
    tree_rel: dict[int, str] = {}
    router: dict[str, TensorLocation] = {}
    router_rel = ""
    merged_locs: dict[str, TensorLocation] = {}
    for inp, path, value, reader in zip(inputs, paths, parsed, readers):
        locs = _locations(inp, path, value, reader)
        if inp.kind == "adapter":
            tree[inp.expert] = group_peft_lora(locs)
            tree_rel[inp.expert] = inp.rel
        elif inp.kind == "flat" and _flat_peft_form(inp, locs):
            tree[inp.expert] = group_peft_lora(locs)
            tree_rel[inp.expert] = inp.rel
        elif inp.kind == "flat":
            grouped = group_moe_lora(locs)
            others = sorted(set(grouped) - {inp.expert})
            if others:
                raise _Fail(f"{NOT_PROVEN}: {inp.rel} holds LoRA tensors of expert {others[0]}")
            tree[inp.expert] = grouped.get(inp.expert, {})
            tree_rel[inp.expert] = inp.rel
        elif inp.kind == "router":
            router, router_rel = group_router(locs), inp.rel
        else:
            merged_locs.update(locs)
    rel_of = {p: i.rel for i, p in zip(inputs, paths)}
    for key in merged_locs:
        if _is_lora(key) and layout.moe_lora_parts(key) is None:
            raise _Fail(f"{NOT_PROVEN}: {rel_of[merged_locs[key].path]} holds {key}, "
                        "a LoRA tensor of no expert")
    merged = group_moe_lora(merged_locs)
    merged_router = group_router({k: v for k, v in merged_locs.items()
                                  if k.startswith(layout.ROUTER_KEY_PREFIX)})

    pairs = []
    for e in sorted(set(tree) | set(merged)):
        mine, theirs = tree.get(e), merged.get(e, {})
        if mine is None:
            raise _Fail(f"{DIFFER}: the merged weights hold expert {e}, the PEFT tree does not",
                        True)
        for ckey in sorted(set(mine) | set(theirs)):
            pairs.append(_pair_one(f"expert_{e} {_shown(ckey)}", tree_rel[e], mine.get(ckey),
                                   theirs.get(ckey), rel_of))
    for key, m in sorted(merged_router.items()):
        pairs.append(_pair_one(f"router {key}", router_rel, router.get(key), m, rel_of))
    return _plan_reads(pairs, index, parsed)


def _pair_one(name: str, tree_rel: str, t: TensorLocation | None, m: TensorLocation | None,
              rel_of: dict[str, str]) -> tuple[str, TensorLocation, TensorLocation]:
    """(label, tree location, merged location) of one tensor, or _Fail."""
    if t is None:
        raise _Fail(f"{DIFFER}: {name} is in {rel_of[m.path]}, not in {tree_rel}", True)
    if m is None:
        raise _Fail(f"{DIFFER}: {name} is in {tree_rel}, not in the merged weights", True)
    label = f"{name} ({tree_rel})"
    for what, a, b in (("dtype", t.dtype, m.dtype), ("shape", list(t.shape), list(m.shape))):
        if a != b:
            raise _Fail(f"{DIFFER}: {label}: {what} {b} in {rel_of[m.path]}, {a} in {tree_rel}",
                        True)
    for loc in (t, m):
        if not loc.is_plain_slice:
            raise _Fail(f"{NOT_PROVEN}: {label}: not a plain contiguous slice of "
                        f"{rel_of[loc.path]}")
    return label, t, m


def _pieces(pairs: list) -> list:
    """The pairs, a tensor longer than ``_BLOCK`` cut into pieces of at most that many bytes
    (plain slices of equal dtype and shape are equal exactly when their pieces are)."""
    out = []
    for label, t, m in pairs:
        if t.nbytes <= _BLOCK:
            out.append((label, t, m))
            continue
        for at in range(0, t.nbytes, _BLOCK):
            n = min(_BLOCK, t.nbytes - at)
            out.append((label, dataclasses.replace(t, offset=t.offset + at, nbytes=n),
                        dataclasses.replace(m, offset=m.offset + at, nbytes=n)))
    return out


def _plan_reads(pairs: list, index: dict[str, int], keep: list) -> _Pairing:
    """Group the byte ranges of each file into reads (``_GAP``, ``_BLOCK``), and the
    comparisons into batches whose reads hold at most ``_BATCH`` bytes."""
    pairs = _pieces(pairs)
    ranges: dict[int, set[tuple[int, int]]] = {}
    for _, t, m in pairs:
        for loc in (t, m):
            if loc.nbytes:
                ranges.setdefault(index[loc.path], set()).add((loc.offset, loc.nbytes))
    blocks: list[tuple[tuple[int, int], ...]] = []
    for n in range(len(index)):
        out: list[list[int]] = []
        for off, size in sorted(ranges.get(n, ())):
            if out and off - (out[-1][0] + out[-1][1]) <= _GAP and off + size - out[-1][0] <= _BLOCK:
                out[-1][1] = max(out[-1][1], off + size - out[-1][0])
            else:
                out.append([off, size])
        blocks.append(tuple((a, b) for a, b in out))
    starts = [[b[0] for b in bl] for bl in blocks]

    def where(loc: TensorLocation) -> tuple[tuple[int, int], int]:
        n = index[loc.path]
        b = bisect.bisect_right(starts[n], loc.offset) - 1
        return (n, b), loc.offset - blocks[n][b][0]

    batches: list[tuple[dict, list]] = []    # ({(file, read): bytes}, [(label, t, m)])
    for label, t, m in sorted(pairs, key=lambda p: (index[p[1].path], p[1].offset)):
        if not t.nbytes:
            continue
        (tk, to), (mk, mo) = where(t), where(m)
        reads = batches[-1][0] if batches else None
        if reads is not None:
            more = sum(blocks[k[0]][k[1]][1] for k in {tk, mk} if k not in reads)
            if more and sum(reads.values()) + more > _BATCH:
                reads = None
        if reads is None:
            batches.append(({}, []))
            reads = batches[-1][0]
        for k in (tk, mk):
            reads.setdefault(k, blocks[k[0]][k[1]][1])
        batches[-1][1].append((label, tk, slice(to, to + t.nbytes), mk, slice(mo, mo + m.nbytes)))
    return _Pairing(tuple(blocks), tuple(_batch(*b) for b in batches), tuple(keep))


def _runs(parts: list[tuple[int, slice]]) -> tuple[tuple[int, slice], ...]:
    """(read, slice) parts, adjacent ones of one read merged: the fewer, the faster joined."""
    out: list[list] = []
    for k, sl in parts:
        if out and out[-1][0] == k and out[-1][2] == sl.start:
            out[-1][2] = sl.stop
        else:
            out.append([k, sl.start, sl.stop])
    return tuple((k, slice(a, b)) for k, a, b in out)


def _batch(reads: dict, items: list) -> tuple:
    """(the reads (file, read) in slot order, then per group of tensors of about ``_JOIN``
    bytes: the tree side's and the merged side's runs (slot, slice) in one order, and per
    tensor (label, slot, slice, slot, slice))."""
    slot = {k: i for i, k in enumerate(reads)}
    groups: list[list] = []
    size = _JOIN
    for label, tk, ts, mk, ms in items:
        if size + (ts.stop - ts.start) > _JOIN:
            groups.append([])
            size = 0
        groups[-1].append((label, slot[tk], ts, slot[mk], ms))
        size += ts.stop - ts.start
    return (tuple(reads), tuple((_runs([(i[1], i[2]) for i in g]), _runs([(i[3], i[4]) for i in g]),
                                 tuple(g)) for g in groups))


# --- reading and comparing ------------------------------------------------------------------

def _compare_bytes(files: list[_File], pairing: _Pairing) -> None:
    """Do each batch's reads and compare its tensors at once: the tree side's bytes joined
    against the merged side's, in the same order; only on a difference, tensor by tensor."""
    for reads, groups in pairing.batches:
        views = []
        for n, b in reads:
            try:
                views.append(files[n].read(*pairing.blocks[n][b]))
            except (FormatError, OSError) as exc:
                raise _Fail(f"{NOT_PROVEN}: cannot read {files[n].rel}: {_why(exc)}") from None
        for tree, merged, items in groups:
            if (b"".join([views[k][sl] for k, sl in tree])
                    != b"".join([views[k][sl] for k, sl in merged])):
                for label, tk, ts, mk, ms in items:
                    if views[tk][ts] != views[mk][ms]:
                        raise _Fail(f"{DIFFER}: {label}", True)


__all__ = ["ContentProof", "ProofFailure", "DIFFER", "NOT_PROVEN"]
