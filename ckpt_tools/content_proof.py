"""Prove by content that a checkpoint's merged weights hold nothing its PEFT tree lacks.

``audit``'s ``redundant`` is structural: the PEFT tree is complete and sound. Before prune
deletes merged weights (in its plan, and again right before the unlink) it proves more:

- the PEFT tree is this checkpoint's own: no file of it (adapter, router, config), nor a
  directory of it, is a symlink that leads out of the checkpoint directory, and its MoE
  state is not the run's (``best_model/``'s ``../dylo_moe_state``): such a tree proves
  nothing, since what it points at may change or go with another checkpoint;
- for each expert, the merged weights (V1 ``foundation_model.base_model.model.…``, V0
  ``foundation_model.model.…``, every shard) hold exactly the LoRA tensors of the PEFT tree
  (same canonical names, as ``tensor_bytes`` maps them for the converter), each with the
  same dtype, shape and bytes;
- every router tensor of the merged weights (``router.gate.weight`` / ``.bias``) equals the
  PEFT tree router's (router.pt, router.safetensors, or V2's ``gate_state_dict`` form).

Torch is not imported: the headers (safetensors) and pickles (torch.save, evaluated
symbolically) say where each tensor lies, and only those byte ranges are read and compared.
A tensor that is not one plain contiguous slice of its file, or that cannot be read, is not
proven. ``validate --deep`` reports the same comparison as ``merged-mismatch``.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from . import layout
from .formats import safetensors_header as st
from .formats import torchsave
from .layout import Role
from .problems import FormatError
from .records import Checkpoint, CheckpointDir
from .tensor_bytes import (TensorLocation, group_moe_lora, group_peft_lora, group_router,
                           locate_safetensors, locate_torch, lora_or_router_key, read_range)

DIFFER = "merged weights differ from the PEFT tree"
NOT_PROVEN = "merged weights not proven redundant"

# Files up to this size are read whole, header and tensors in one pread.
_WHOLE_FILE = 1 << 20
# Tensors closer than this in one file are read in one pread; a read is at most _BLOCK long
# (unless one tensor is longer): the memory a proof holds per file.
_GAP = 64 * 1024
_BLOCK = 8 << 20
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


@dataclass(frozen=True)
class _Input:
    rel: str             # relative to the checkpoint
    kind: str            # "adapter" | "flat" | "router" | "merged"
    expert: int | None = None


@dataclass(frozen=True)
class _Pairing:
    """What to compare, found from the files' headers alone: per file its reads
    (offset, length), then per tensor (label, tree file, its read, offset, merged file,
    its read, offset, length). ``keep`` holds the parsed headers the memo is keyed by."""

    blocks: tuple[tuple[tuple[int, int], ...], ...]
    pairs: tuple[tuple, ...]
    keep: tuple


class ContentProof:
    """``proof(checkpoint)``: None when its merged weights are proven redundant by content,
    else the reason (one line, naming the file and the tensor).

    One object serves a whole prune run: it remembers which byte ranges to compare for each
    combination of headers met (the checkpoints of a run repeat them; the readers share the
    parsed headers of identical bytes), so that a checkpoint like the one before costs only
    its reads. It holds no open file between calls.
    """

    def __init__(self) -> None:
        self._pairings: dict[tuple, _Pairing] = {}
        self._first_read: dict[str, int] = {}

    def __call__(self, c: Checkpoint) -> str | None:
        facts = c.facts if "tree_form" in c.facts else _facts_of(c.dir)
        failure = self.check(c.dir, c.merged_files, facts)
        return None if failure is None else failure.reason

    def check(self, ckpt: CheckpointDir, merged_files, facts: dict, *,
              own_tree: bool = True) -> ProofFailure | None:
        """The proof for ``ckpt``, whose verdict found ``merged_files`` and ``facts``;
        ``own_tree=False`` leaves out the rule that the PEFT tree must be the checkpoint's own
        (``validate --deep`` compares contents only)."""
        try:
            inputs = _inputs(ckpt, merged_files, facts)
            if own_tree:
                _check_own(ckpt, facts, inputs)
            self._compare(ckpt, inputs, facts)
        except _Fail as exc:
            return exc.failure
        return None

    # --- the comparison ----------------------------------------------------------------

    def _compare(self, ckpt: CheckpointDir, inputs: list[_Input], facts: dict) -> None:
        base = ckpt.abspath
        paths = [os.path.join(base, *i.rel.split("/")) for i in inputs]
        whole: list[bytearray | None] = [None] * len(inputs)
        parsed = []
        for n, (inp, path) in enumerate(zip(inputs, paths)):
            value, whole[n] = self._parse(inp.rel, path)
            parsed.append(value)
        key = (facts.get("tree_form"),) + tuple((i, id(p)) for i, p in zip(inputs, parsed))
        pairing = self._pairings.get(key)
        if pairing is None:
            pairing = _pair(inputs, paths, parsed)
            if len(self._pairings) >= _MEMO_MAX:
                self._pairings.clear()
            self._pairings[key] = pairing
        _compare_bytes(inputs, paths, whole, pairing)

    def _parse(self, rel: str, path: str):
        """(header or TorchFileInfo, the whole file when it is small and safetensors)."""
        try:
            if not rel.endswith(".safetensors"):
                return torchsave.inspect_torch_file(path, check_pickle=True, shared=True), None
            fd, size = st.open_regular(path)
            try:
                if size <= _WHOLE_FILE:
                    os.set_blocking(fd, True)
                    data = read_range(fd, 0, size, "the file")
                    return st.parse_cached(data, size), data
            finally:
                os.close(fd)
            header = st.read_header(path, file_size=size,
                                    first_read=self._first_read.get(rel, st.FIRST_READ_BYTES))
            self._first_read[rel] = (header.data_start + 4095) // 4096 * 4096
            return header, None
        except (FormatError, OSError) as exc:
            raise _Fail(f"{NOT_PROVEN}: cannot read {rel}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    if isinstance(exc, FormatError):
        return exc.message
    return getattr(exc, "strerror", None) or str(exc)


def _facts_of(ckpt: CheckpointDir) -> dict:
    from .validator import validate_checkpoint
    return validate_checkpoint(ckpt, min_age_s=0).facts


def _inputs(ckpt: CheckpointDir, merged_files, facts: dict) -> list[_Input]:
    """The files the proof reads: each expert's weights, the router, the merged weights."""
    roles = {f.relpath: layout.role_of(f.relpath) for f in ckpt.files}
    tree_form = facts.get("tree_form")
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
    router = facts.get("router")
    if not router:
        raise _Fail(f"{NOT_PROVEN}: no router state to compare with")
    inputs.append(_Input(router, "router"))
    merged = [m for m in merged_files if layout.role_of(m).role is Role.MERGED]
    if not merged:
        raise _Fail(f"{NOT_PROVEN}: no merged weights file to compare")
    inputs += [_Input(m, "merged") for m in merged]
    return inputs


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_own(ckpt: CheckpointDir, facts: dict, inputs: list[_Input]) -> None:
    """The PEFT tree must be the checkpoint's own (see the module's docstring)."""
    moe_dir = facts.get("moe_dir") or layout.MOE_STATE_DIR
    for rel in [moe_dir] + [i.rel for i in inputs if i.kind != "merged"]:
        if rel.split("/", 1)[0] == layout.PARENT_DIR:
            raise _Fail(f"{NOT_PROVEN}: {rel} lies outside this checkpoint (the run's, "
                        "rewritten by its next save): it proves nothing")
    real = None
    for rec in ckpt.files:
        if not rec.is_symlink:
            continue
        rel = rec.relpath
        top = rel.split("/", 1)[0]
        role = layout.role_of(rel).role
        if not (role in layout.PEFT_TREE_ROLES or role is Role.ROOT_CONFIG
                or top in (layout.PEFT_DIR, layout.MOE_STATE_DIR)):
            continue
        if real is None:
            real = os.path.realpath(ckpt.abspath)
        target = rec.symlink_target
        if target is None or not _inside(target, real):
            raise _Fail(f"{NOT_PROVEN}: {rel} is a symlink to {target or 'nothing'}, outside "
                        "this checkpoint: a PEFT tree that is not the checkpoint's own proves nothing")


# --- pairing tensors (from the headers alone) ----------------------------------------------

def _is_lora(key: str) -> bool:
    return ".lora_" in key


def _locations(inp: _Input, path: str, parsed) -> dict[str, TensorLocation]:
    wanted = {"adapter": _is_lora, "flat": _is_lora, "router": None,
              "merged": lora_or_router_key}[inp.kind]
    try:
        if isinstance(parsed, st.SafetensorsHeader):
            return locate_safetensors(path, header=parsed, wanted=wanted)
        return locate_torch(path, wanted, info=parsed)
    except (FormatError, OSError) as exc:
        raise _Fail(f"{NOT_PROVEN}: cannot read {inp.rel}: {_why(exc)}") from None


def _shown(ckey: str) -> str:
    return ckey.removeprefix(layout.CANONICAL_KEY_PREFIX)


def _pair(inputs: list[_Input], paths: list[str], parsed: list) -> _Pairing:
    """Which tensor of the PEFT tree each LoRA / router tensor of the merged weights must
    equal; ``_Fail`` where one has no counterpart or the two disagree on dtype or shape."""
    index = {p: n for n, p in enumerate(paths)}
    tree: dict[int, dict[str, TensorLocation]] = {}
    tree_rel: dict[int, str] = {}
    router: dict[str, TensorLocation] = {}
    router_rel = ""
    merged_locs: dict[str, TensorLocation] = {}
    for inp, path, value in zip(inputs, paths, parsed):
        locs = _locations(inp, path, value)
        if inp.kind == "adapter":
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


def _plan_reads(pairs: list, index: dict[str, int], keep: list) -> _Pairing:
    """Group the byte ranges of each file into reads (``_GAP``, ``_BLOCK``)."""
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

    def where(loc: TensorLocation) -> tuple[int, int, int]:
        n = index[loc.path]
        return n, bisect.bisect_right(starts[n], loc.offset) - 1, loc.offset

    out_pairs = []
    for label, t, m in sorted(pairs, key=lambda p: (index[p[2].path], p[2].offset)):
        if t.nbytes:
            out_pairs.append((label, *where(t), *where(m), t.nbytes))
    return _Pairing(tuple(blocks), tuple(out_pairs), tuple(keep))


# --- reading and comparing ------------------------------------------------------------------

def _compare_bytes(inputs: list[_Input], paths: list[str], whole: list, pairing: _Pairing) -> None:
    """Do the pairing's reads (each file opened once, one read held per file) and compare."""
    fds: dict[int, int] = {}
    held: dict[int, tuple[int, int, bytearray]] = {}   # file → (read, its offset, its bytes)

    def read(n: int, b: int) -> tuple[int, bytearray]:
        hit = held.get(n)
        if hit is not None and hit[0] == b:
            return hit[1], hit[2]
        off, size = pairing.blocks[n][b]
        if whole[n] is not None:          # read already, header and all
            if off + size > len(whole[n]):
                raise _Fail(f"{NOT_PROVEN}: cannot read {inputs[n].rel}: file ends inside a tensor")
            held[n] = (b, 0, whole[n])
            return 0, whole[n]
        try:
            fd = fds.get(n)
            if fd is None:
                fd = fds[n] = st.open_readonly(paths[n])
                st.no_readahead(fd)
            buf = read_range(fd, off, size, "a tensor")
        except (FormatError, OSError) as exc:
            raise _Fail(f"{NOT_PROVEN}: cannot read {inputs[n].rel}: {_why(exc)}") from None
        held[n] = (b, off, buf)
        return off, buf

    try:
        for label, tn, tb, to, mn, mb, mo, size in pairing.pairs:
            ts, tbuf = read(tn, tb)
            ms, mbuf = read(mn, mb)
            if tbuf[to - ts:to - ts + size] != mbuf[mo - ms:mo - ms + size]:
                raise _Fail(f"{DIFFER}: {label}", True)
    finally:
        for fd in fds.values():
            os.close(fd)


__all__ = ["ContentProof", "ProofFailure", "DIFFER", "NOT_PROVEN"]
