"""The state of one validation (``_Ctx``): where the checkpoint's files are, what their
relpaths decide (``_Shape``), the readers that turn every failure into a problem, and the
memoised checks (``_memoised``) that go through the scan's ``ReadCache``."""

from __future__ import annotations

import os
from operator import itemgetter
from typing import TYPE_CHECKING

from .. import checkpoint_reads as reads
from .. import layout
from ..formats import safetensors_header as st
from ..formats import torchsave
from ..kinds import TreeForm
from ..layout import Role
from ..peft_types import finite_number as _finite  # noqa: F401 - examine uses them from here
from ..peft_types import positive_int as _count, short_value as _short  # noqa: F401
from ..problems import (BAD_JSON, ERROR, MISSING_FILE, PERMISSION_DENIED, UNREADABLE,
                        WARNING, FormatError, Problem)
from ..read_cache import ReadCache, bounded_put
from ..records import CheckpointDir, FileRecord
from .verdict import Tensor

if TYPE_CHECKING:
    from ..storage.remote import ObjectStorage


_RELPATH = itemgetter(reads.ROW_RELPATH)
_MAX_JSON_BYTES = reads.MAX_JSON_BYTES


class _Recorder:
    """Stands in for a _Ctx while a memoised check runs: it only collects problems."""

    def __init__(self, cache: ReadCache):
        self.cache = cache  # a check memoised inside another is memoised in the same cache
        self.items: list[tuple] = []

    def add(self, code: str, relpath: str, message: str, severity: str = ERROR) -> None:
        self.items.append((code, relpath, message, severity))


def _memoised(ctx, key, keepalive, fn):
    """``fn(ctx)``; with a cache, run once per ``key`` and replayed afterwards (its value
    and the problems it added).

    The checkpoints of a run repeat the same headers and configs; the parsed objects are
    shared by the readers' caches, so checks on them are keyed by identity. ``keepalive``
    holds those objects so that their ids stay theirs while the entry lives.
    """
    cache = ctx.cache
    if cache is None:
        return fn(ctx)
    hit = cache.checks.get(key)
    if hit is None:
        rec = _Recorder(cache)
        value = fn(rec)
        hit = (keepalive, value, tuple(rec.items))
        bounded_put(cache.checks, key, hit)
    for code, rel, msg, sev in hit[2]:
        ctx.add(code, rel, msg, sev)
    return hit[1]


class _Shape:
    """What a checkpoint's relpaths alone decide: the role of each file, the merged files,
    the form of the PEFT tree and where each expert lives. The checkpoints of a run share
    one, so it is worked out once per distinct set of relpaths."""

    __slots__ = ("roles", "merged", "tree_form", "expert_dirs", "flat_experts", "position",
                 "bad_indices", "holds_temporary")

    def __init__(self, relpaths: tuple[str, ...]):
        roles = {rel: layout.role_of(rel) for rel in relpaths}
        self.roles = roles
        self.merged = tuple(sorted(p for p, r in roles.items()
                                   if r.role in (Role.MERGED, Role.MERGED_INDEX)))
        self.tree_form = _tree_form_of(roles)
        self.expert_dirs = tuple(sorted(_expert_dirs_of(roles).items()))
        self.position = {rel: i for i, rel in enumerate(relpaths)}
        self.flat_experts = tuple(sorted(p for p, r in roles.items()
                                         if r.role is Role.FLAT_EXPERT))
        # files and directories whose names hold an expert index out of range
        self.bad_indices = tuple(sorted({r.bad_index for r in roles.values() if r.bad_index}))
        # an entry of ckpt-tools' own being written inside it (the callback's PEFT tree)
        self.holds_temporary = any(layout.is_tmp_checkpoint_name(rel.split("/", 1)[0])
                                   for rel in relpaths)


def _shape_of(relpaths: tuple[str, ...], cache: ReadCache | None) -> _Shape:
    if cache is None:
        return _Shape(relpaths)
    shape = cache.shapes.get(relpaths)
    if shape is None:
        shape = _Shape(relpaths)
        bounded_put(cache.shapes, relpaths, shape)
    return shape


class _Ctx:
    """The state of one validation: where things are and the problems found so far."""

    def __init__(self, ckpt: CheckpointDir, level: str, cache: ReadCache | None,
                 storage: ObjectStorage | None = None):
        self.ckpt = ckpt
        self.level = level
        self.cache = cache
        self.storage = storage   # None: local files; else the scan's object storage
        self.base = base = ckpt.abspath if storage is None else storage.path_of(ckpt)
        self._prefix = base if base.endswith(os.sep) else base + os.sep
        self.problems: list[Problem] = []
        self.raw: list[tuple] = []   # the problems as added: (code, relpath, message, severity)
        self.trace: list | None = None  # reads (kind, relpath, arg, value) while recording
        self.rows = ckpt.files
        self._by_path: dict[str, FileRecord] | None = None
        self.shape = _shape_of(tuple(map(_RELPATH, self.rows)), cache)  # rows are sorted by relpath
        self.roles = self.shape.roles  # shared between checkpoints: never mutate it

    @property
    def by_path(self) -> dict[str, FileRecord]:
        """relpath → FileRecord, in relpath order; made when first needed."""
        if self._by_path is None:
            self._by_path = {f.relpath: f for f in self.ckpt.files}
        return self._by_path

    def size_hint(self, relpath: str) -> int | None:
        """The size the scan found for ``relpath`` where it found a regular file there (then
        opening it needs no second look), else None."""
        by_path = self._by_path
        if by_path is not None:
            rec = by_path.get(relpath)
            if rec is None or rec.is_symlink or not rec.is_regular:
                return None
            return rec.size
        at = self.shape.position.get(relpath)
        if at is None:
            return None
        return reads.regular_size(self.rows[at])

    def reshape(self) -> None:
        """Derive what the relpaths alone decide (after ``by_path`` changed)."""
        self.shape = _shape_of(tuple(self.by_path), self.cache)
        self.roles = self.shape.roles  # shared between checkpoints: never mutate it

    def rel(self, relpath: str) -> str:
        """A path relative to the scan root, for reports."""
        if relpath == ".":
            return self.ckpt.path
        if self.ckpt.path == ".":
            return relpath
        return os.path.normpath(f"{self.ckpt.path}/{relpath}").replace(os.sep, "/")

    def add(self, code: str, relpath: str, message: str, severity: str = ERROR) -> None:
        self.raw.append((code, relpath, message, severity))
        self.problems.append(Problem(code, self.rel(relpath), message, severity))

    def abspath(self, relpath: str) -> str:
        # os.path.join(self.base, *relpath.split("/")) for a '/'-separated relative path
        if os.sep == "/":
            return self._prefix + relpath
        return os.path.join(self.base, *relpath.split("/"))

    def files_with(self, role: Role) -> list[str]:
        return [p for p, r in self.roles.items() if r.role is role]

    def readable(self, relpath: str, in_tree: bool) -> bool:
        """Whether a file may be opened: it exists and is no symlink out of the root."""
        rec = self.by_path.get(relpath)
        if rec is None:
            return False
        if rec.is_symlink:
            if rec.escapes_root:
                return False
            if rec.symlink_target is None:
                self.add(MISSING_FILE, relpath, "dangling symlink", ERROR if in_tree else WARNING)
                return False
        return True

    def scandir(self, path: str) -> list:
        """The entries of the directory ``path`` (beside the checkpoint: best_model/'s run)."""
        if self.storage is None:
            with os.scandir(path) as it:
                return list(it)
        return self.storage.scandir(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path) if self.storage is None else self.storage.isdir(path)

    def read_prefix(self, relpath: str, n: int) -> bytes:
        """The first ``n`` bytes of a small file (``OSError`` as the OS or the store says)."""
        path = self.abspath(relpath)
        if self.storage is None:
            with open(path, "rb") as fh:
                return fh.read(n)
        return self.storage.read_range(path, 0, n)

    def os_problem(self, relpath: str, exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            self.add(PERMISSION_DENIED, relpath, "permission denied")
        elif isinstance(exc, FileNotFoundError):
            self.add(MISSING_FILE, relpath, "file vanished during validation")
        elif isinstance(exc, st.NotRegularFile):
            self.add(UNREADABLE, relpath, exc.strerror)   # "not a regular file (a FIFO)"
        else:
            self.add(UNREADABLE, relpath, f"cannot read: {exc.strerror or exc}")

    # --- readers that turn every failure into a problem -------------------------

    def read_json(self, relpath: str) -> dict | None:
        """A JSON object, shared with other readers of the same bytes: never mutate it."""
        try:
            raw = reads.read_json_bytes(self.abspath(relpath), self.size_hint(relpath),
                                        self.storage)
        except OSError as exc:
            self.trace = None
            self.os_problem(relpath, exc)
            return None
        if len(raw) > _MAX_JSON_BYTES:
            self.trace = None
            self.add(BAD_JSON, relpath, f"larger than {_MAX_JSON_BYTES} bytes")
            return None
        value = reads.parse_json(raw, self.cache)
        if isinstance(value, str):
            self.trace = None
            self.add(BAD_JSON, relpath, value)
            return None
        if self.trace is not None:
            self.trace.append(("json", relpath, None, value))
        return value

    def _guarded(self, relpath: str, read):
        """``read()``, with a FormatError or OSError turned into a problem (and None)."""
        try:
            return read()
        except FormatError as exc:
            self.trace = None
            self.add(exc.code, relpath, exc.message)
        except OSError as exc:
            self.trace = None
            self.os_problem(relpath, exc)
        return None

    def read_safetensors(self, relpath: str) -> dict[str, Tensor] | None:
        header = self._guarded(relpath, lambda: reads.read_header(
            self.abspath(relpath), relpath, self.size_hint(relpath), self.cache, self.storage))
        if header is None:
            return None
        if self.trace is not None:
            self.trace.append(("st", relpath, None, header))
        return _memoised(self, ("tensors", id(header)), header,
                         lambda _: {t.name: Tensor(t.dtype, tuple(t.shape)) for t in header.tensors})

    def read_torch(self, relpath: str, check_pickle: bool | frozenset[str] = True):
        # shared: the validator never mutates what it reads
        info = self._guarded(relpath, lambda: reads.inspect_torch(
            self.abspath(relpath), check_pickle, self.size_hint(relpath), self.cache,
            self.storage))
        if info is None:
            return None
        if self.trace is not None:
            token = reads.torch_token(info, self.cache)
            if token is None:
                self.trace = None
            else:
                self.trace.append(("torch", relpath, check_pickle, token))
        return info

    def read_tensors(self, relpath: str) -> dict[str, Tensor] | None:
        """Names, dtypes and shapes of the tensors of a safetensors or torch.save file."""
        if relpath.endswith(".safetensors"):
            return self.read_safetensors(relpath)
        info = self.read_torch(relpath)
        if info is None:
            return None
        flat = torchsave.flatten_tensors(info.obj)
        return {k: Tensor(v.dtype, tuple(v.shape)) for k, v in flat.items()}


def _tree_form_of(roles: dict) -> TreeForm:
    nested = canonical = flat = False
    for rel, role in roles.items():
        if role.role is Role.FLAT_EXPERT:
            flat = True
        elif role.role in (Role.ADAPTER_CONFIG, Role.ADAPTER_WEIGHTS):
            if role.nested:
                nested = True
            else:
                canonical = True
    if canonical:
        return layout.TREE_CANONICAL
    if nested:
        return layout.TREE_NESTED
    if flat:
        return layout.TREE_FLAT
    if any(rel.startswith(layout.PEFT_DIR + "/") for rel in roles):
        return layout.TREE_CANONICAL  # an emptied or foreign peft_adapters/: judged as canonical
    return layout.TREE_NONE


def _expert_dirs_of(roles: dict) -> dict[int, str]:
    dirs: dict[int, str] = {}
    for rel, role in roles.items():
        if role.expert is None or role.role is Role.FLAT_EXPERT:
            continue
        parts = rel.split("/")
        if role.nested:
            dirs[role.expert] = "/".join(parts[:3])
        elif role.role in (Role.ADAPTER_CONFIG, Role.ADAPTER_WEIGHTS, Role.PEFT_README, Role.OTHER):
            dirs.setdefault(role.expert, "/".join(parts[:2]))
    return dirs
