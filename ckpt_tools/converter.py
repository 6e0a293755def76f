"""Migrate checkpoints to the canonical layout: plan, then execute.

``plan_migrate(src, dst)`` scans SRC and decides, per checkpoint, what ``execute_migrate``
will do: ``copy`` (canonical; canonical+merged loses its merged weights once they are shown
to hold the same LoRA tensors as its PEFT tree), ``exact`` (the LoRA and router tensors are
already in a state dict or in ``expert_<i>.pt`` files: they are re-keyed, never recomputed)
or ``svd`` (a truly merged model: ``lowrank.extract`` against ``--base-model``). Broken and
in-progress checkpoints are skipped with their reason; a finished target is skipped after a
check.

Each target is built under ``<parent>/.ckpt-tools-tmp-<name>-<pid>`` inside DST, every file
and directory fsynced, validated (it must classify ``peft-only`` with no error) and its
tensors re-read and compared with what was extracted; only then is it renamed into place
and the parent directory fsynced. The marker file ``.ckpt-tools-migrated.json``, written
last, records the identity of every input file: a re-run skips targets whose marker
matches their source and redoes the rest. The source is only ever read.

A disk that fills up or fails (ENOSPC, EIO, ...) while a target is written or synced fails
that checkpoint alone, with one line naming the condition and the file as it would have been
named under DST; the others go on. Its temporary directory is removed (retried past a failed
unlink; where the file system refuses even that, it stays, hidden, and the next migrate of
that DST removes it), and so are the run directories made for it alone. A failed fsync of the
parent after the rename takes the rename back: a target reported failed is never left in place.

``build_conversion`` (the in-memory half) is shared with ``loader.load_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import __version__, layout, scanner
from .faults import NO_FAULTS as _NO_FAULTS, Faults as _Faults
from .formats import safetensors_header as st
from .layout import Role
from .problems import NAN_OR_INF, FormatError
from .records import BROKEN, IN_PROGRESS, PEFT_ONLY, Checkpoint, CheckpointDir
from .tensor_bytes import group_moe_lora, group_peft_lora, group_router, lora_or_router_key
from .validator import _MAX_JSON_BYTES, HEADERS, Verdict, validate_checkpoint

METHOD_COPY, METHOD_EXACT, METHOD_SVD = "copy", "exact", "svd"
ACTION_MIGRATE, ACTION_SKIP, ACTION_DONE = "migrate", "skip", "done"
# --verify: the largest max|Δlogits| / max|logits| accepted. Exact adapters differ from their
# source only by float rounding (PEFT's unmerged forward against our own hooks, in float32);
# a low-rank extraction differs by its truncation, which the user chose with --rank/--energy.
DEFAULT_VERIFY_TOL = {METHOD_COPY: 1e-4, METHOD_EXACT: 1e-4, METHOD_SVD: 1e-2}
# --max-error: the largest relative error ‖D − B·A‖_F / ‖D‖_F of any module of an svd extraction
# (D: the module's fine-tuning delta). 1% keeps 99.99% of the delta's energy: the copy changes
# what the fine-tune did to each layer's output by 1% of that change at most. A delta that is
# truly low-rank is met to float rounding (a merged LoRA: ~1e-7), so anything above 1% is a
# delta that is not low-rank at this rank: the copy would be lossy. docs/migrate.md says more.
DEFAULT_MAX_ERROR = 0.01
_MARKER_FORMAT = 1


class MigrateError(Exception):
    """Migration cannot start at all (bad roots, DST inside SRC, ...)."""


class CheckpointFailure(Exception):
    """One checkpoint could not be migrated; the message is one clear line. ``fields`` are
    what its ``MigrateOutcome`` records besides (an svd extraction over --max-error: which
    modules, what would meet it)."""

    def __init__(self, message: str, *, fields: dict | None = None):
        super().__init__(message)
        self.fields = dict(fields or {})


# --- options, plan, result ------------------------------------------------------------

@dataclass(frozen=True)
class MigrateOptions:
    link: bool = False                 # hard-link files carried byte for byte instead of copying
    base_model: str | None = None      # --base-model: a local model dir or a hub id in the cache
    rank: int | None = None            # --rank (svd)
    energy: float | None = None        # --energy (svd)
    max_error: float = DEFAULT_MAX_ERROR   # --max-error (svd): worst module error accepted
    device: str = "auto"               # --device (svd)
    lora_alpha: float | None = None    # --lora-alpha: when no config of the checkpoint or run says
    verify: bool = False               # --verify: compare logits before committing
    verify_tol: float | None = None    # None: DEFAULT_VERIFY_TOL per method
    min_age_s: float = 3600.0

    def tolerance(self, method: str) -> float:
        return self.verify_tol if self.verify_tol is not None else DEFAULT_VERIFY_TOL[method]


@dataclass(frozen=True)
class MigrateItem:
    """What will happen to one checkpoint of SRC."""

    source: str                   # relative to SRC ('.' when SRC is the checkpoint)
    target: str                   # relative to DST
    layout: str
    status: str
    action: str                   # migrate | skip | done
    method: str | None = None     # copy | exact | svd
    reason: str | None = None     # why skipped / why it is expected to fail / what 'done' means
    experts: int | None = None
    inputs_digest: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"notes": list(self.notes)}


@dataclass(frozen=True)
class MigratePlan:
    """Everything ``execute_migrate`` needs; serialisable with ``to_dict``/``from_dict``."""

    src: str
    dst: str
    options: MigrateOptions
    items: tuple[MigrateItem, ...]
    problems: tuple[dict, ...] = ()     # scan problems tied to no checkpoint

    @property
    def to_migrate(self) -> tuple[MigrateItem, ...]:
        return tuple(i for i in self.items if i.action == ACTION_MIGRATE)

    def to_dict(self) -> dict:
        return {"src": self.src, "dst": self.dst, "options": dataclasses.asdict(self.options),
                "items": [i.to_dict() for i in self.items], "problems": list(self.problems)}

    @classmethod
    def from_dict(cls, doc: dict) -> MigratePlan:
        items = tuple(MigrateItem(**(d | {"notes": tuple(d.get("notes", ()))})) for d in doc["items"])
        return cls(doc["src"], doc["dst"], MigrateOptions(**doc["options"]), items,
                   tuple(doc.get("problems", ())))


@dataclass(frozen=True)
class MigrateOutcome:
    source: str
    target: str
    outcome: str                        # migrated | skipped | failed
    method: str | None = None
    experts: int | None = None
    max_rel_error: float | None = None  # svd: worst module reconstruction error; exact/copy: 0.0
    reason: str | None = None
    module_errors: dict = field(default_factory=dict)
    verify: dict | None = None          # {"max_abs_diff", "max_rel_diff", "tolerance", "passed"}
    max_error: float | None = None      # svd: the bound each module's error was held to
    over_bound: tuple[dict, ...] = ()   # svd, failed: modules above it (lowrank.OverBound), worst first
    suggested_rank: int | None = None   # svd, failed: a --rank that meets the bound
    suggested_energy: float | None = None   # svd, failed: an --energy that meets the bound
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    detail: str | None = field(default=None, compare=False)   # a traceback, for -v

    def to_dict(self) -> dict:
        d = {"source": self.source, "target": self.target}
        if self.outcome == "migrated":
            d |= {"method": self.method, "experts": self.experts,
                  "max_rel_error": self.max_rel_error}
            if self.max_error is not None:
                d["max_error"] = self.max_error
            if self.module_errors:
                d["module_errors"] = self.module_errors
            if self.verify is not None:
                d["verify"] = self.verify
            if self.warnings:
                d["warnings"] = list(self.warnings)
        else:
            d |= {"method": self.method, "reason": self.reason}
            if self.verify is not None:
                d["verify"] = self.verify
            if self.over_bound:
                d |= {"max_rel_error": self.max_rel_error, "max_error": self.max_error,
                      "module_errors": self.module_errors,
                      "over_bound": [dict(o) for o in self.over_bound],
                      "suggested_rank": self.suggested_rank,
                      "suggested_energy": self.suggested_energy}
        return d


@dataclass(frozen=True)
class MigrateResult:
    migrated: tuple[MigrateOutcome, ...]
    skipped: tuple[MigrateOutcome, ...]
    failed: tuple[MigrateOutcome, ...]

    def to_dict(self) -> dict:
        return {"migrated": [o.to_dict() for o in self.migrated],
                "skipped": [o.to_dict() for o in self.skipped],
                "failed": [o.to_dict() for o in self.failed]}


# --- roots -------------------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_roots(src: str, dst: str) -> None:
    """SRC an existing directory; DST not inside SRC and SRC not inside DST."""
    if not os.path.lexists(src):
        raise MigrateError(f"{src}: no such file or directory")
    if not os.path.isdir(src):
        raise MigrateError(f"{src}: not a directory")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise MigrateError(f"{dst}: exists and is not a directory")
    rs = os.path.realpath(src)
    rd = os.path.realpath(dst)
    if rs == rd:
        raise MigrateError(f"DST {dst} is SRC {src}: migrate writes a new tree, never in place")
    if _inside(rd, rs):
        raise MigrateError(f"DST {dst} lies inside SRC {src}: choose a DST outside the tree "
                           "being migrated")
    if _inside(rs, rd):
        raise MigrateError(f"SRC {src} lies inside DST {dst}: choose a DST outside the tree "
                           "being migrated")


# --- planning ----------------------------------------------------------------------------

def _method_for(c: Checkpoint) -> tuple[str | None, str | None]:
    """(method, reason it cannot work) for a checkpoint that is neither broken nor in progress."""
    lay = c.layout
    if lay == layout.CANONICAL:
        return METHOD_COPY, None
    if lay == layout.CANONICAL_MERGED:
        # peft-only here: a complete tree beside a merged export (validator: merged-export)
        if c.facts.get("merged_kind") in ("v0", "v1", "hf", "hf-lora") and c.status in (
                "redundant", PEFT_ONLY):
            return METHOD_COPY, None
        if c.facts.get("merged_kind") in ("v0", "v1"):
            return METHOD_EXACT, None
        return None, "canonical tree is incomplete and the merged weights hold no LoRA tensors"
    if lay in (layout.V0, layout.V1, layout.V2, layout.V3, layout.V4, layout.V5):
        return METHOD_EXACT, None
    if lay == layout.HF_MERGED:
        return METHOD_SVD, None
    return None, f"layout {lay!r} cannot be migrated"


def _skip_reason(c: Checkpoint) -> str:
    if c.status == IN_PROGRESS:
        if c.dir.tmp_name:
            return "in progress: a temporary checkpoint directory"
        return "in progress: written to within --min-age"
    errors = c.errors or c.problems
    if errors:
        p = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"broken: {p.code}: {p.path}: {p.message}{more}"
    return "broken"


def _input_files(ckpt: CheckpointDir, verdict_facts: dict) -> list[tuple[str, int, int]]:
    """(relpath, size, mtime_ns) of every file the migration of ``ckpt`` may read."""
    files = [(f.relpath, f.size, f.mtime_ns) for f in ckpt.files
             if not f.name.startswith(".ckpt-tools")]
    moe_dir = verdict_facts.get("moe_dir") or layout.MOE_STATE_DIR
    if moe_dir.startswith(layout.PARENT_DIR):
        parent = os.path.join(ckpt.abspath, *moe_dir.split("/"))
        try:
            for e in sorted(os.scandir(parent), key=lambda e: e.name):
                if e.is_file(follow_symlinks=False):
                    stt = e.stat(follow_symlinks=False)
                    files.append((f"{moe_dir}/{e.name}", stt.st_size, stt.st_mtime_ns))
        except OSError:
            pass
    return sorted(files)


def _digest(files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def plan_migrate(src: str, dst: str, options: MigrateOptions = MigrateOptions(), *,
                 now: float | None = None, jobs: int = 1, progress=None) -> MigratePlan:
    """Scan SRC and decide what to do with each checkpoint (nothing is written)."""
    from .api import scan
    check_roots(src, dst)
    result = scan(src, min_age_s=options.min_age_s, now=now, jobs=jobs, progress=progress)
    items = []
    for c in result.checkpoints:
        target = c.path
        if c.status in (BROKEN, IN_PROGRESS):
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_SKIP,
                                     reason=_skip_reason(c), experts=c.num_experts))
            continue
        method, why_not = _method_for(c)
        if method is None:
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_SKIP,
                                     reason=why_not, experts=c.num_experts))
            continue
        digest = _digest(_input_files(c.dir, c.facts))
        notes = []
        experts = c.num_experts
        if method == METHOD_SVD:
            experts = 1
            if not options.base_model:
                notes.append("needs --base-model (a truly merged model: the LoRA delta is baked in)")
            if options.rank is None and options.energy is None:
                notes.append("needs --rank or --energy")
        state, detail = _target_state(os.path.join(dst, *target.split("/")) if target != "."
                                      else dst, digest, check=False)
        if state == "finished":
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_DONE, method,
                                     reason="already migrated", experts=experts,
                                     inputs_digest=digest))
            continue
        if state == "foreign":
            notes.append(f"target exists: {detail}")
        elif state == "stale":
            notes.append(f"target will be replaced: {detail}")
        items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_MIGRATE, method,
                                 experts=experts, inputs_digest=digest, notes=tuple(notes)))
    return MigratePlan(src=src, dst=dst, options=options, items=tuple(items),
                       problems=tuple(p.to_dict() for p in result.problems))


# --- the target's state ------------------------------------------------------------------

def _read_marker(target_abs: str) -> dict | None:
    return _read_json(os.path.join(target_abs, layout.MIGRATED_MARKER))


def _validate_dir(path: str, name: str | None = None) -> tuple[CheckpointDir, Verdict]:
    """Scan and validate the directory ``path`` as one checkpoint (named ``name``)."""
    dirs, _ = scanner.find_checkpoints(path)
    mine = [d for d in dirs if d.path == "."]
    if not mine:
        raise CheckpointFailure(f"{path}: not a checkpoint directory")
    ckpt = mine[0]
    if name is not None:
        ckpt = dataclasses.replace(ckpt, name=name, step=layout.checkpoint_step(name),
                                   tmp_name=layout.is_tmp_checkpoint_name(name))
    return ckpt, validate_checkpoint(ckpt, level=HEADERS, min_age_s=0.0)


def _target_state(target_abs: str, digest: str, *, check: bool = True) -> tuple[str, str]:
    """absent | finished | stale | foreign, with a word on why."""
    if not os.path.lexists(target_abs):
        return "absent", ""
    if os.path.islink(target_abs) or not os.path.isdir(target_abs):
        return "foreign", "not a directory"
    try:
        entries = os.listdir(target_abs)
    except OSError as exc:
        return "foreign", f"cannot list it: {exc.strerror or exc}"
    if not entries:
        return "absent", "empty directory"
    marker = _read_marker(target_abs)
    if marker is None:
        return "foreign", "it was not written by ckpt-tools migrate (no marker); not overwriting"
    if marker.get("inputs_digest") != digest:
        return "stale", "the source changed since it was migrated"
    if check:
        try:
            _, verdict = _validate_dir(target_abs, os.path.basename(target_abs))
        except (CheckpointFailure, scanner.ScanError) as exc:
            return "stale", str(exc)
        errors = [p for p in verdict.problems if p.is_error]
        if verdict.status != PEFT_ONLY or errors:
            why = f"{errors[0].code}: {errors[0].message}" if errors else verdict.status
            return "stale", f"it no longer validates ({why})"
    return "finished", ""




# --- I/O failures, in words ----------------------------------------------------------------

_STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EIO: "I/O error", errno.EROFS: "read-only file system",
                   errno.EFBIG: "file too large"}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def storage_error(exc: BaseException) -> str | None:
    """What a failed write or fsync means, in words ("no space left on device", "I/O error",
    ...), or None when ``exc`` is not the storage failing.

    Recognised from an ``OSError``, from safetensors' writer (a ``SafetensorError`` whose text
    ends in "(os error 28)") and from torch.save writing to a Python file (a ``RuntimeError``
    raised while the ``OSError`` was being handled).
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None and not isinstance(e, OSError):
            found = _OS_ERROR_CODE.search(str(e))
            code = int(found.group(1)) if found else None
        if code in _STORAGE_ERRORS:
            return _STORAGE_ERRORS[code]
        e = e.__cause__ or e.__context__
    return None


# --- durable file writing ----------------------------------------------------------------

def _fsync_path(path: str, directory: bool = False, faults: _Faults | None = None) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        if faults is not None:
            faults.fail("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: str, faults: _Faults, shown: Callable[[str], str]) -> None:
    """fsync every file and directory under ``top``; a failure names the file as ``shown``."""
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        paths = [(os.path.join(dirpath, n), False) for n in filenames] + [(dirpath, True)]
        for p, is_dir in paths:
            if not is_dir and os.path.islink(p):
                continue
            _sync_or_fail(p, is_dir, faults, shown(p))


def _remove_tree(path: str, faults: _Faults) -> OSError | None:
    """Remove ``path`` and everything under it, going on past errors; the first error, or None."""
    first: OSError | None = None

    def remove(p: str, rm: Callable[[str], None]) -> None:
        nonlocal first
        try:
            faults.fail("remove", p)
            rm(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            first = first or exc

    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        remove(path, os.unlink)
        return first
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            remove(os.path.join(dirpath, name), os.unlink)
        remove(dirpath, os.rmdir)
    return first if os.path.lexists(path) else None


def _discard(path: str, faults: _Faults, shown: str) -> str | None:
    """Remove a temporary directory, retrying past a failed unlink; None once it is gone, else
    why it stays (the next migrate of that DST removes it: ``clean_stale``)."""
    error = None
    for _ in range(3):
        error = _remove_tree(path, faults)
        if error is None:
            return None
    why = storage_error(error) or (error.strerror or str(error)).lower()
    return (f"the temporary directory {shown} could not be removed ({why}: {error.filename}); "
            "the next migrate of this DST removes it")


class _Writer:
    """Writes the files of one target under its temporary directory.

    A file that cannot be written (a full disk, an I/O error) becomes one ``CheckpointFailure``
    naming it under ``shown``, the target as the user knows it (not its temporary name).
    """

    def __init__(self, root: str, faults: _Faults, link: bool, shown: str):
        self.root = root
        self.faults = faults
        self.link = link
        self.shown = shown
        self.written: dict[str, int] = {}
        self.warnings: list[str] = []

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def shown_path(self, path: str) -> str:
        """``path`` under the temporary directory, as it will be named under the target."""
        if _inside(path, self.root):
            return self.shown + path[len(self.root):]
        return path

    def done(self, rel: str) -> None:
        self.written[rel] = os.path.getsize(self._abs(rel))
        self.faults.hit("after_write")

    def _write(self, rels: tuple[str, ...], write: Callable[..., None], *, shared: bool = False) -> None:
        """``write(*paths)`` creates the files ``rels``.

        ``shared``: the file may be a hard link to a source file, so an injected fault strikes
        before it is made and never cuts it.
        """
        paths = [self._abs(r) for r in rels]
        failing = paths[0]
        try:
            os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
            if shared:
                self.faults.fail("write", paths[0])
            write(*paths)
            for p in [] if shared else paths:
                failing = p
                try:
                    self.faults.fail("write", p)
                except OSError:
                    os.truncate(p, os.path.getsize(p) // 2)
                    raise
        except Exception as exc:  # noqa: BLE001 - libraries wrap OSError in their own types
            why = storage_error(exc)
            if why is None:
                raise
            where = getattr(exc, "filename", None)
            if not (isinstance(where, str) and _inside(where, self.root)):
                where = failing
            raise CheckpointFailure(f"{why} writing {self.shown_path(where)}") from None
        for rel in rels:
            self.done(rel)

    def copy(self, src_abs: str, rel: str, *, allow_link: bool = True) -> None:
        def copy_bytes(dst: str) -> None:
            shutil.copyfile(src_abs, dst)      # follows a symlink inside the root: its content
            try:
                shutil.copystat(src_abs, dst)  # mode and times: carried files stay byte-and-stat equal
            except OSError:
                pass

        def link_or_copy(dst: str) -> None:
            try:
                os.link(os.path.realpath(src_abs), dst)
            except OSError as exc:
                if exc.errno in _STORAGE_ERRORS:    # a copy would fail the same way
                    raise
                if not self.warnings or "hard link" not in self.warnings[-1]:
                    self.warnings.append(f"cannot hard-link ({exc.strerror or exc}); copied instead")
                copy_bytes(dst)

        if self.link and allow_link:
            self._write((rel,), link_or_copy, shared=True)
        else:
            self._write((rel,), copy_bytes)

    def json(self, rel: str, doc: dict) -> None:
        def write(path: str) -> None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        self._write((rel,), write)

    def torch_save(self, rel: str, obj) -> None:
        import torch

        def write(path: str) -> None:
            # through a Python file: a failed write then carries its OSError (errno), where
            # torch's own C++ writer only says "unexpected pos"
            with open(path, "wb") as fh:
                torch.save(obj, fh)
        self._write((rel,), write)

    def adapter(self, rel_dir: str, tensors: dict, config: dict) -> None:
        from peft import LoraConfig
        from safetensors.torch import save_file

        def weights(path: str) -> None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})

        def config_file(path: str) -> None:
            # the file PEFT writes for this config, with target_modules in a stable order: PEFT
            # keeps them in a set, whose order changes from one process to the next
            LoraConfig(**config).save_pretrained(os.path.dirname(path))
            with open(path, encoding="utf-8") as fh:
                written = json.load(fh)
            if isinstance(written.get("target_modules"), list):
                written["target_modules"] = sorted(written["target_modules"])
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump(written, fh, indent=2, sort_keys=True)
                    fh.write("\n")

        self._write((f"{rel_dir}/{layout.ADAPTER_WEIGHTS}",), weights)
        self._write((f"{rel_dir}/{layout.ADAPTER_CONFIG}",), config_file)

    def extracted_adapter(self, rel_dir: str, extraction) -> None:
        """A low-rank extraction's adapter_model.safetensors and adapter_config.json."""
        from . import lowrank
        self._write((f"{rel_dir}/{layout.ADAPTER_WEIGHTS}", f"{rel_dir}/{layout.ADAPTER_CONFIG}"),
                    lambda weights, config: lowrank.write_adapter(extraction, os.path.dirname(weights)))


# --- the in-memory conversion (shared with the loader) ------------------------------------

@dataclass
class ExpertAdapter:
    """One expert: either tensors (canonical keys) plus LoraConfig kwargs, or PEFT's own files."""

    index: int
    config: dict                                   # LoraConfig keyword arguments / file content
    tensors: dict | None = None                    # canonical key -> torch.Tensor
    adapter_dir: str | None = None                 # a directory PEFT can load as is
    expected: dict | None = None                   # canonical key -> (dtype name, shape)

    @property
    def name(self) -> str:
        return f"{layout.EXPERT_DIR_PREFIX}{self.index}"


@dataclass
class Conversion:
    """A checkpoint in canonical form, in memory (tensors) or pointing at files to copy."""

    method: str
    layout: str
    num_experts: int
    experts: list[ExpertAdapter]
    router: dict                        # "gate.weight"/"gate.bias" -> tensor
    moe_config: dict
    root_config: dict
    skill_library: str | None           # absolute path of a file to carry, or None: write {}
    carried: list[tuple[str, str]]      # (absolute source path, relpath in the target)
    copy_tree: list[tuple[str, str]] = field(default_factory=list)   # files copied as is
    warnings: list[str] = field(default_factory=list)
    module_errors: dict = field(default_factory=dict)
    max_rel_error: float | None = 0.0
    lora_bytes: int = 0                 # bytes of tensor data extracted
    extraction: object | None = None    # lowrank.Extraction for svd


def _read_json(path: str) -> dict | None:
    """The JSON object in the file at ``path``; None where there is none to use: no such file,
    not a regular file (a FIFO is never opened), over _MAX_JSON_BYTES, or not a JSON object."""
    try:
        raw = st.read_bounded(path, _MAX_JSON_BYTES)
        doc = json.loads(raw.decode("utf-8")) if len(raw) <= _MAX_JSON_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_canonical_root_config(cfg: dict | None) -> bool:
    return isinstance(cfg, dict) and cfg.get("model_type") == layout.DYLORA_MODEL_TYPE


@dataclass
class _Source:
    """What the converter reads of one checkpoint."""

    abspath: str
    ckpt: CheckpointDir
    verdict: Verdict

    @property
    def facts(self) -> dict:
        return self.verdict.facts

    def abs(self, rel: str) -> str:
        return os.path.normpath(os.path.join(self.abspath, *rel.split("/")))

    def files_with(self, *roles: Role) -> list[tuple[str, layout.FileRole]]:
        out = []
        for f in self.ckpt.files:
            r = layout.role_of(f.relpath)
            if r.role in roles:
                out.append((f.relpath, r))
        return sorted(out)

    @property
    def moe_dir(self) -> str:
        return self.facts.get("moe_dir") or layout.MOE_STATE_DIR


def open_source(path: str, *, min_age_s: float = 0.0, now: float | None = None) -> _Source:
    """Scan and validate the checkpoint directory at ``path`` (one checkpoint, not a tree)."""
    dirs, _ = scanner.find_checkpoints(path)
    mine = [d for d in dirs if d.path == "."]
    if not mine:
        raise CheckpointFailure(f"{path}: not a checkpoint directory")
    verdict = validate_checkpoint(mine[0], level=HEADERS, min_age_s=min_age_s, now=now)
    return _Source(os.path.abspath(path), mine[0], verdict)


def _refuse_unsafe_links(src: _Source, root: str, shown: str) -> None:
    """Migrate reads the files it carries by path: none may be a symlink leading out of
    ``root`` (SRC; symlinks are never followed out of a root), nor a FIFO or a device
    (reading one blocks, or never ends), nor a symlink to a directory or a loop (a directory
    has no bytes to carry). ``shown`` names the checkpoint under SRC."""
    root_real = os.path.realpath(root)
    real = os.path.realpath(src.abspath)
    if not _inside(real, root_real):
        raise CheckpointFailure(f"{shown}: now leads to {real}, outside {root} (a directory was "
                                "replaced by a symlink); migrate never follows a symlink out of SRC")
    for f in src.ckpt.files:
        path = src.abs(f.relpath)
        where = f.relpath if shown == "." else f"{shown}/{f.relpath}"
        if f.is_symlink:
            real = os.path.realpath(path)
            if not _inside(real, root_real):
                raise CheckpointFailure(f"{where}: a symlink to {real}, outside {root}; "
                                        "migrate never follows a symlink out of SRC")
        try:
            st.require_regular(path)
        except st.NotRegularFile as exc:
            raise CheckpointFailure(f"{where}: {exc.strerror}; not reading it") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointFailure(f"{where}: a symlink loop; not following it") from None
            continue    # a dangling link: the reader that needs it says so


# tensors ------------------------------------------------------------------------------

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _merged_locations(src: _Source) -> dict:
    from .tensor_io import locate
    found = {}
    for rel, role in src.files_with(Role.MERGED):
        if rel not in src.verdict.merged_files:
            continue
        found.update(locate(src.abs(rel), wanted=lora_or_router_key))
    return found


def _group_moe_lora(locs: dict, *, only_expert: int | None = None, where: str) -> dict:
    """{expert: {canonical key: TensorLocation}} from ``….lora_A.expert_<i>.weight`` keys."""
    for key in locs:
        try:
            parts = layout.moe_lora_parts(key)
        except layout.BadIndex as exc:
            raise CheckpointFailure(f"{where}: {exc}") from None
        if parts is None:
            continue
        _, part, expert, _ = parts
        if part not in _LORA_PARTS:
            raise CheckpointFailure(f"{where}: {key}: {part} (DoRA) is not supported by migrate")
        if only_expert is not None and expert != only_expert:
            raise CheckpointFailure(f"{where}: holds {key!r} of expert {expert}, "
                                    f"not expert {only_expert}")
    return group_moe_lora(locs)


def _router_from(locs: dict, *, where: str) -> dict:
    """gate.weight / gate.bias locations from any of the router key forms."""
    out = {k: loc for k, loc in group_router(locs).items()
           if k in (layout.GATE_WEIGHT, layout.GATE_BIAS)}
    if layout.GATE_WEIGHT not in out:
        raise CheckpointFailure(f"{where}: no {layout.GATE_WEIGHT} in the router state")
    return out


# hyperparameters ----------------------------------------------------------------------

def _ranks(expert_locs: dict) -> dict[str, int]:
    """module → r, from the shapes of lora_A ([r, in]) / lora_embedding_A ([r, vocab])."""
    ranks = {}
    for locs in expert_locs.values():
        for ckey, loc in locs.items():
            parts = layout.peft_lora_parts(ckey)
            if parts and parts[1] in ("lora_A", "lora_embedding_A") and loc.shape:
                ranks.setdefault(parts[0], loc.shape[0])
    return ranks


def _run_configs(run_dir: str, own: str, cache: dict | None) -> list[tuple[str, dict]]:
    """(path, config) of the DyLoRA configs of a run: its dylo_moe_state/config.json, and the
    root, MoE and first adapter configs of its other checkpoints (newest first)."""
    key = (run_dir, own)
    if cache is not None and key in cache:
        return cache[key]
    found: list[tuple[str, dict]] = []
    p = os.path.join(run_dir, layout.MOE_STATE_DIR, layout.MOE_CONFIG)
    cfg = _read_json(p)
    if cfg is not None:
        found.append((p, cfg))
    try:
        names = [e.name for e in os.scandir(run_dir)
                 if e.is_dir(follow_symlinks=False) and layout.is_checkpoint_name(e.name)
                 and not layout.is_tmp_checkpoint_name(e.name)]
    except OSError:
        names = []
    names.sort(key=lambda n: (layout.checkpoint_step(n) or -1, n), reverse=True)
    expert0 = f"{layout.EXPERT_DIR_PREFIX}0"
    for name in names[:32]:
        d = os.path.join(run_dir, name)
        if os.path.realpath(d) == os.path.realpath(own):
            continue
        for rel in (layout.ROOT_CONFIG, f"{layout.MOE_STATE_DIR}/{layout.MOE_CONFIG}",
                    f"{layout.PEFT_DIR}/{expert0}/{layout.ADAPTER_CONFIG}",
                    f"{layout.PEFT_DIR}/{expert0}/{expert0}/{layout.ADAPTER_CONFIG}"):
            p = os.path.join(d, *rel.split("/"))
            cfg = _read_json(p)
            if cfg is None:
                continue
            if rel == layout.ROOT_CONFIG and not layout.is_dylora_config(cfg):
                continue
            found.append((p, cfg))
    if cache is not None:
        cache[key] = found
    return found


def _cfg_r(cfg: dict) -> int | None:
    r = cfg.get("r") if "peft_type" in cfg else layout.first_key(cfg, layout.LORA_R_KEYS)
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _cfg_alpha(cfg: dict):
    a = layout.first_key(cfg, layout.LORA_ALPHA_KEYS)
    return a if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _cfg_dropout(cfg: dict):
    d = layout.first_key(cfg, layout.LORA_DROPOUT_KEYS)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _cfg_base(cfg: dict) -> str | None:
    for k in ("base_model_name_or_path", "_name_or_path"):
        v = cfg.get(k)
        if isinstance(v, str) and v:
            return v
    return None


@dataclass
class _Hyper:
    r: int
    rank_pattern: dict
    alpha: float
    dropout: float
    base: str | None
    target_modules: list[str]
    notes: list[str]


def _resolve_hyper(src: _Source, ranks: dict[str, int], options: MigrateOptions,
                   run_cache: dict | None) -> _Hyper:
    """r from the shapes; alpha, dropout and the base model from the configs."""
    if not ranks:
        raise CheckpointFailure("no LoRA tensors found")
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
    notes: list[str] = []

    own: list[tuple[str, dict]] = []
    moe_cfg = src.facts.get("moe_config")
    if isinstance(moe_cfg, dict):
        own.append((f"{src.moe_dir}/{layout.MOE_CONFIG}", moe_cfg))
    root_cfg = src.facts.get("root_config")
    if isinstance(root_cfg, dict):
        own.append((layout.ROOT_CONFIG, root_cfg))
    for rel, role in src.files_with(Role.ADAPTER_CONFIG):
        cfg = _read_json(src.abs(rel))
        if cfg is not None:
            own.append((rel, cfg))
    run_dir = os.path.dirname(src.abspath)
    run = [(os.path.relpath(p, run_dir), c) for p, c in _run_configs(run_dir, src.abspath, run_cache)]

    def pick(getter, what: str, candidates, need_r: bool):
        for where, cfg in candidates:
            v = getter(cfg)
            if v is None:
                continue
            cr = _cfg_r(cfg)
            if need_r and cr is not None and cr != r:
                continue
            if need_r and cr is None and where not in [w for w, _ in own]:
                continue    # a run config that does not say r may be of another setup
            return v, where
        return None, None

    alpha, where = pick(_cfg_alpha, "lora_alpha", own, need_r=False)
    if alpha is None:
        values = {}
        for w, cfg in run:
            a = _cfg_alpha(cfg)
            if a is not None and _cfg_r(cfg) == r:
                values.setdefault(a, w)
        if len(values) == 1:
            alpha, where = next(iter(values.items()))
            where = f"the run's {where}"
        elif len(values) > 1:
            notes.append(f"the run's configs disagree on lora_alpha ({sorted(values)}); not using them")
    if alpha is None and options.lora_alpha is not None:
        alpha, where = options.lora_alpha, "--lora-alpha"
    if alpha is None:
        alpha = 2 * r
        notes.append(f"warning: no config records lora_alpha; guessed lora_alpha = 2·r = {alpha} "
                     "(the upstream convention; pass --lora-alpha if training used another)")
    else:
        if options.lora_alpha is not None and where != "--lora-alpha" and options.lora_alpha != alpha:
            notes.append(f"warning: --lora-alpha {options.lora_alpha} ignored: {where} says {alpha}")
        notes.append(f"lora_alpha = {alpha} from {where}")
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)

    dropout, _ = pick(_cfg_dropout, "lora_dropout", own + run, need_r=False)
    if dropout is None:
        dropout = layout.DEFAULT_LORA_DROPOUT
    base, _ = pick(_cfg_base, "base_model_name_or_path", own + run, need_r=False)
    if base is None and options.base_model:
        base = options.base_model
    if base is None:
        notes.append("warning: no config names the base model; base_model_name_or_path is unset "
                     "(pass --base-model)")
    targets = None
    for _, cfg in own:
        t = cfg.get("target_modules")
        if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
            targets = t
            break
    leaves = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    if targets is None or not set(leaves) <= set(targets):
        targets = leaves
    if not _full_grid(list(ranks)):
        # only some layers were adapted: leaf names would make PEFT adapt them all
        import re
        return _Hyper(r, rank_pattern, alpha, float(dropout), base,
                      "^(" + "|".join(re.escape(m) for m in sorted(ranks)) + ")$", notes)
    return _Hyper(r, rank_pattern, alpha, float(dropout), base, sorted(targets), notes)


def _full_grid(modules: list[str]) -> bool:
    """Whether the modules are every layer 0..n-1 times every kind (then leaf names are exact)."""
    import re
    by_kind: dict[str, set[int]] = {}
    for m in modules:
        found = re.search(r"\.(\d{1,18})\.", m)  # a longer number is no layer index
        kind = m if found is None else m[:found.start()] + ".#." + m[found.end():]
        by_kind.setdefault(kind, set()).add(-1 if found is None else int(found.group(1)))
    layer_sets = {frozenset(v) for v in by_kind.values()}
    if len(layer_sets) != 1:
        return False
    layers = next(iter(layer_sets))
    return layers == {-1} or layers == frozenset(range(len(layers)))


def _lora_config(h: _Hyper, has_bias: bool) -> dict:
    targets = h.target_modules if isinstance(h.target_modules, str) else list(h.target_modules)
    return {"r": h.r, "lora_alpha": h.alpha, "lora_dropout": h.dropout,
            "target_modules": targets, "bias": "none",
            "task_type": layout.LORA_TASK_TYPE, "base_model_name_or_path": h.base,
            "rank_pattern": dict(h.rank_pattern), "lora_bias": has_bias, "inference_mode": True}


def _moe_config(src: _Source, h: _Hyper, num_experts: int, extra: dict) -> dict:
    cfg = dict(src.facts.get("moe_config") or {})
    for k, v in extra.items():
        cfg.setdefault(k, v)
    cfg.update({"num_experts": num_experts, "lora_r": h.r, "lora_alpha": h.alpha,
                "lora_dropout": h.dropout, "base_model_name_or_path": h.base,
                "target_modules": h.target_modules if isinstance(h.target_modules, str)
                else list(h.target_modules)})
    return cfg


def _root_config(num_experts: int, h: _Hyper) -> dict:
    return {"model_type": layout.DYLORA_MODEL_TYPE, "checkpoint_type": layout.PEFT_ONLY_TYPE,
            "num_experts": num_experts, "base_model_name_or_path": h.base, "lora_r": h.r,
            "lora_alpha": h.alpha, "lora_dropout": h.dropout}


def _carried(src: _Source, *, exclude_roles=()) -> list[tuple[str, str]]:
    """Trainer state, tokenizer and other loose files carried byte for byte."""
    out = []
    for f in src.ckpt.files:
        if f.name.startswith(".ckpt-tools"):
            continue
        role = layout.role_of(f.relpath).role
        top = "/" not in f.relpath
        if role in exclude_roles:
            continue
        if role in layout.CARRIED_ROLES or (top and role is Role.OTHER) or (
                role is Role.OTHER and f.relpath.startswith(layout.MOE_STATE_DIR + "/")):
            out.append((src.abs(f.relpath), f.relpath))
    return out


# the conversions ----------------------------------------------------------------------

def _tree_experts(src: _Source) -> tuple[dict, dict]:
    """({expert: {ckey: loc}}, {expert: (adapter dir, adapter_config path)}) of a dirs/nested tree."""
    from .tensor_io import locate_safetensors
    expert_locs: dict[int, dict] = {}
    dirs: dict[int, tuple[str, str]] = {}
    for rel, role in src.files_with(Role.ADAPTER_WEIGHTS):
        if not rel.endswith(".safetensors"):
            raise CheckpointFailure(f"{rel}: adapter_model.bin is not supported; expected "
                                    "adapter_model.safetensors")
        expert_locs[role.expert] = group_peft_lora(locate_safetensors(src.abs(rel)))
        d = os.path.dirname(src.abs(rel))
        dirs[role.expert] = (d, os.path.join(d, layout.ADAPTER_CONFIG))
    return expert_locs, dirs


def _flat_experts(src: _Source) -> dict:
    from .tensor_io import locate_torch
    out = {}
    for rel, role in src.files_with(Role.FLAT_EXPERT):
        locs = locate_torch(src.abs(rel), wanted=lambda k: ".lora_" in k)
        grouped = _group_moe_lora(locs, only_expert=role.expert, where=rel)
        out[role.expert] = grouped.get(role.expert, {})
    return out


def _router_locations(src: _Source, merged: dict | None) -> tuple[dict, dict]:
    """Router tensor locations and the V2 router.pt's metadata (top_k, temperature, ...)."""
    from .tensor_io import locate
    meta: dict = {}
    rel = src.facts.get("router")
    if rel is not None and rel.endswith(".pt") and os.path.isfile(src.abs(rel)):
        from .formats import torchsave
        info = torchsave.inspect_torch_file(src.abs(rel))
        if isinstance(info.obj, dict) and layout.LEGACY_ROUTER_STATE in info.obj:
            for k in ("num_experts", "input_size", "top_k", "temperature", "expert_maturity"):
                v = info.obj.get(k)
                if isinstance(v, (int, float, str, list)) and not isinstance(v, bool):
                    meta[k] = v
    rk = {k: v for k, v in (merged or {}).items() if layout.router_key(k)}
    # a merged state dict without a PEFT tree is the checkpoint's own router (best_model/'s
    # run-level router.pt is the run's latest, not necessarily the best step's)
    if rk and (src.verdict.tree_form == layout.TREE_NONE or rel is None):
        return _router_from(rk, where="merged weights"), meta
    if rel is None:
        raise CheckpointFailure("no router state found")
    return _router_from(locate(src.abs(rel)), where=rel), meta


def _check_same(tree: dict, merged: dict, where: str) -> None:
    """The PEFT tree must hold exactly the merged weights' LoRA tensors, bit for bit."""
    from .tensor_io import bit_equal, read_tensors
    for e in sorted(tree):
        a, b = tree[e], merged.get(e, {})
        if set(a) != set(b):
            diff = sorted(set(a) ^ set(b))
            raise CheckpointFailure(f"expert {e}: the PEFT tree and the merged weights hold "
                                    f"different LoRA modules (e.g. {diff[0]}); not choosing one")
        ta, tb = read_tensors(a), read_tensors(b)
        for k in sorted(ta):
            if not bit_equal(ta[k], tb[k]):
                raise CheckpointFailure(f"expert {e}: {k} differs between the PEFT tree and "
                                        f"the merged weights ({where}); not choosing one")


def build_conversion(src: _Source, method: str, options: MigrateOptions, *,
                     run_cache: dict | None = None, check_merged: bool = True) -> Conversion:
    """Everything a canonical target holds, with LoRA and router tensors read exactly."""
    from .tensor_io import read_tensors
    if method == METHOD_SVD:
        return _svd_conversion(src, options)
    v = src.verdict
    tree = v.tree_form
    merged_kind = v.merged_kind
    merged = _merged_locations(src) if merged_kind in ("v0", "v1") else None
    merged_experts = _group_moe_lora(merged, where="merged weights") if merged else {}

    warnings: list[str] = []
    dir_experts: dict = {}
    if tree in (layout.TREE_CANONICAL, layout.TREE_NESTED):
        expert_locs, dir_experts = _tree_experts(src)
    elif tree == layout.TREE_FLAT:
        expert_locs = _flat_experts(src)
    else:
        expert_locs = merged_experts
    if not expert_locs:
        raise CheckpointFailure("no LoRA tensors found")
    if merged_experts and tree != layout.TREE_NONE and check_merged:
        _check_same(expert_locs, merged_experts, ", ".join(
            m for m in v.merged_files if layout.role_of(m).role is Role.MERGED))
    elif merged_kind in ("hf", "hf-lora") and tree != layout.TREE_NONE:
        warnings.append("merged weights hold no DyLoRA LoRA keys to compare with the PEFT tree; "
                        "dropped without that check")

    num_experts = v.num_experts or (max(expert_locs) + 1)
    missing = [i for i in range(num_experts) if i not in expert_locs]
    if missing:
        raise CheckpointFailure(f"expert {missing[0]} of {num_experts} has no LoRA tensors")

    router_locs, router_meta = _router_locations(src, merged)

    if method == METHOD_COPY:
        return _copy_conversion(src, expert_locs, dir_experts, router_locs, num_experts, warnings)

    ranks = _ranks(expert_locs)
    h = _resolve_hyper(src, ranks, options, run_cache)
    warnings += h.notes
    experts = []
    lora_bytes = 0
    all_locs = {f"{e}/{k}": loc for e, locs in expert_locs.items() for k, loc in locs.items()}
    all_locs |= {f"router/{k}": loc for k, loc in router_locs.items()}
    tensors = read_tensors({k: dataclasses.replace(loc, name=k) for k, loc in all_locs.items()})
    lora_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    for e in range(num_experts):
        t = {k: tensors[f"{e}/{k}"] for k in expert_locs[e]}
        has_bias = any(k.endswith("lora_B.bias") for k in t)
        if dir_experts and e in dir_experts:
            cfg = _read_json(dir_experts[e][1]) or _lora_config(h, has_bias)
            experts.append(ExpertAdapter(e, cfg, tensors=t, adapter_dir=dir_experts[e][0]))
        else:
            experts.append(ExpertAdapter(e, _lora_config(h, has_bias), tensors=t))
    router = {k: tensors[f"router/{k}"] for k in router_locs}
    extra = {}
    if "top_k" in router_meta:
        extra["top_k"] = router_meta["top_k"]
    if "temperature" in router_meta:
        extra["temperature"] = router_meta["temperature"]
    gw = router.get(layout.GATE_WEIGHT)
    if gw is not None and gw.ndim == 2:
        extra["hidden_size"] = int(gw.shape[1])
    skill = os.path.join(src.abspath, *src.moe_dir.split("/"), layout.SKILL_LIBRARY)
    return Conversion(
        method=METHOD_EXACT, layout=v.layout, num_experts=num_experts, experts=experts,
        router=router, moe_config=_moe_config(src, h, num_experts, extra),
        root_config=_root_config(num_experts, h),
        skill_library=os.path.normpath(skill) if os.path.isfile(skill) else None,
        carried=_carried(src), warnings=warnings, max_rel_error=0.0, lora_bytes=lora_bytes)


def _copy_conversion(src: _Source, expert_locs: dict, dir_experts: dict, router_locs: dict,
                     num_experts: int, warnings: list[str]) -> Conversion:
    """Canonical (and canonical+merged): the tree as it is, minus merged weights."""
    from .tensor_io import read_tensors
    copy = []
    root_cfg = src.facts.get("root_config")
    replace_root = not _is_canonical_root_config(root_cfg)
    for f in src.ckpt.files:
        role = layout.role_of(f.relpath).role
        if role in (Role.MERGED, Role.MERGED_INDEX) or f.name.startswith(".ckpt-tools"):
            continue
        if role is Role.ROOT_CONFIG and replace_root:
            continue
        copy.append((src.abs(f.relpath), f.relpath))
    new_root = {}
    if replace_root:
        moe = src.facts.get("moe_config") or {}
        new_root = {"model_type": layout.DYLORA_MODEL_TYPE, "checkpoint_type": layout.PEFT_ONLY_TYPE,
                    "num_experts": num_experts}
        for k in ("base_model_name_or_path", "lora_r", "lora_alpha", "lora_dropout"):
            if k in moe:
                new_root[k] = moe[k]
        if root_cfg is not None:
            warnings.append("config.json is not a DyLoRA-MoE config (rewritten by another tool); "
                            "replaced with the canonical one")
    experts = [ExpertAdapter(e, _read_json(dir_experts[e][1]) or {}, adapter_dir=dir_experts[e][0],
                             expected={k: (loc.dtype, loc.shape) for k, loc in locs.items()})
               for e, locs in sorted(expert_locs.items())]
    return Conversion(method=METHOD_COPY, layout=src.verdict.layout, num_experts=num_experts,
                      experts=experts, router=read_tensors(router_locs), moe_config={},
                      root_config=new_root,
                      skill_library=None, carried=[], copy_tree=copy, warnings=warnings,
                      max_rel_error=0.0)


def resolve_model_dir(path_or_id: str) -> str:
    """A local model directory, or a hub id resolved from the local Hugging Face cache only."""
    if os.path.isdir(path_or_id):
        return os.path.abspath(path_or_id)
    if os.path.exists(path_or_id):
        raise CheckpointFailure(f"base model {path_or_id}: not a directory")
    if path_or_id.count("/") > 1 or path_or_id.startswith((".", "/")):
        raise CheckpointFailure(f"base model {path_or_id}: no such directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the hub raises several kinds for "not cached"
        raise CheckpointFailure(f"base model {path_or_id}: not a local directory and not in the "
                                f"local Hugging Face cache (no network is used; "
                                f"{type(exc).__name__})") from None


def _hidden_size(cfg: dict | None) -> int | None:
    for c in (cfg or {}, (cfg or {}).get("text_config") or {}):
        for k in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(k), int):
                return c[k]
    return None


def _svd_conversion(src: _Source, options: MigrateOptions) -> Conversion:
    import torch
    if not options.base_model:
        raise CheckpointFailure("a truly merged model: migrate needs --base-model to extract "
                                "its LoRA delta")
    if options.rank is None and options.energy is None:
        raise CheckpointFailure("a truly merged model: give --rank N or --energy F")
    try:
        from . import lowrank
        extract = lowrank.extract
    except (ImportError, AttributeError):
        raise CheckpointFailure("low-rank extraction is not available in this build "
                                "(ckpt_tools.lowrank.extract)") from None
    base_dir = resolve_model_dir(options.base_model)
    try:
        ex = extract(base_dir, src.abspath, rank=options.rank, energy=options.energy,
                     device=options.device, base_model_name_or_path=options.base_model,
                     max_error=options.max_error)
    except lowrank.BaseMismatch as exc:
        raise CheckpointFailure(f"base model {options.base_model} is not this checkpoint's "
                                f"base: {exc}; nothing extracted") from None
    if ex.over_bound:
        raise CheckpointFailure(
            f"svd: the low-rank copy would lose part of the fine-tune: {ex.over_bound_reason()}",
            fields={"max_rel_error": float(ex.max_rel_error), "max_error": options.max_error,
                    "module_errors": dict(ex.errors),
                    "over_bound": tuple(o.to_dict() for o in ex.over_bound),
                    "suggested_rank": ex.suggested_rank,
                    "suggested_energy": ex.suggested_energy})
    cfg = dict(ex.adapter_config)
    if not cfg.get("target_modules"):
        raise CheckpointFailure("the merged model does not differ from the base model in any "
                                "linear layer: nothing to extract")
    hidden = _hidden_size(src.facts.get("root_config")) or _hidden_size(
        _read_json(os.path.join(base_dir, layout.ROOT_CONFIG)))
    if hidden is None:
        raise CheckpointFailure("cannot tell the hidden size for the router (no config.json)")
    # The canonical layout needs a router: one expert, a zero gate (softmax over one expert is 1).
    router = {layout.GATE_WEIGHT: torch.zeros(1, hidden), layout.GATE_BIAS: torch.zeros(1)}
    r = int(cfg.get("r") or max(ex.ranks.values(), default=1))
    h = _Hyper(r, dict(cfg.get("rank_pattern") or {}), cfg.get("lora_alpha", r),
               float(cfg.get("lora_dropout") or 0.0), options.base_model,
               sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list)
               else cfg["target_modules"], [])
    moe = {"num_experts": 1, "lora_r": h.r, "lora_alpha": h.alpha, "lora_dropout": h.dropout,
           "base_model_name_or_path": h.base, "target_modules": h.target_modules,
           "hidden_size": hidden, "top_k": 1, "extracted": {
               "method": METHOD_SVD, "rank": options.rank, "energy": options.energy,
               "max_rel_error": ex.max_rel_error, "max_error": options.max_error}}
    expert = ExpertAdapter(0, cfg, tensors=dict(ex.lora_state))
    return Conversion(
        method=METHOD_SVD, layout=src.verdict.layout, num_experts=1, experts=[expert],
        router=router, moe_config=moe, root_config=_root_config(1, h), skill_library=None,
        carried=_carried(src, exclude_roles=(Role.ROOT_CONFIG,)),
        warnings=list(getattr(ex, "notes", ())), module_errors=dict(ex.errors),
        max_rel_error=float(ex.max_rel_error), extraction=ex,
        lora_bytes=sum(t.numel() * t.element_size() for t in ex.lora_state.values()))


# --- writing and checking one target ---------------------------------------------------------

def _write_conversion(conv: Conversion, w: _Writer) -> None:
    if conv.method == METHOD_COPY:
        for src_abs, rel in conv.copy_tree:
            w.copy(src_abs, rel)
        if conv.root_config:
            w.json(layout.ROOT_CONFIG, conv.root_config)
        return
    peft = layout.PEFT_DIR
    for ex in conv.experts:
        rel_dir = f"{peft}/{ex.name}"
        if conv.method == METHOD_SVD:
            w.extracted_adapter(rel_dir, conv.extraction)
        elif ex.adapter_dir is not None:
            # PEFT's own files (V5, nested): already canonical, carried byte for byte
            w.copy(os.path.join(ex.adapter_dir, layout.ADAPTER_WEIGHTS),
                   f"{rel_dir}/{layout.ADAPTER_WEIGHTS}", allow_link=False)
            w.copy(os.path.join(ex.adapter_dir, layout.ADAPTER_CONFIG),
                   f"{rel_dir}/{layout.ADAPTER_CONFIG}", allow_link=False)
        else:
            w.adapter(rel_dir, ex.tensors, ex.config)
    moe = layout.MOE_STATE_DIR
    w.torch_save(f"{moe}/{layout.ROUTER_PT}", {k: v.contiguous() for k, v in conv.router.items()})
    if conv.skill_library:
        w.copy(conv.skill_library, f"{moe}/{layout.SKILL_LIBRARY}")
    else:
        w.torch_save(f"{moe}/{layout.SKILL_LIBRARY}", {})
    w.json(f"{moe}/{layout.MOE_CONFIG}", conv.moe_config)
    w.json(layout.ROOT_CONFIG, conv.root_config)
    for src_abs, rel in conv.carried:
        if rel not in w.written:
            w.copy(src_abs, rel)


def _reread_check(conv: Conversion, tmp: str) -> None:
    """The tensors on disk equal what was extracted, bit for bit and dtype for dtype, and are
    finite: a NaN or an infinity makes the checkpoint broken, as ``validate --deep`` says, and
    migrate never presents a canonical copy of it as a migration."""
    import torch
    from safetensors.torch import load_file

    from .tensor_io import bit_equal, non_finite

    def finite(got: dict, where: str) -> None:
        bad = non_finite(got)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointFailure(f"broken: {NAN_OR_INF}: {where}: NaN or Inf in {shown}")

    def same(a: dict, b: dict, where: str) -> None:
        if set(a) != set(b):
            raise CheckpointFailure(f"{where}: written keys differ from the extracted ones")
        for k in a:
            if not bit_equal(a[k], b[k]):
                raise CheckpointFailure(f"{where}: {k} reads back different from what was written")

    for ex in conv.experts:
        path = os.path.join(tmp, layout.PEFT_DIR, ex.name, layout.ADAPTER_WEIGHTS)
        got = load_file(path)
        finite(got, f"{layout.PEFT_DIR}/{ex.name}/{layout.ADAPTER_WEIGHTS}")
        if ex.tensors is not None:
            same(ex.tensors, got, path)
        elif ex.expected is not None:
            shapes = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in got.items()}
            if shapes != {k: (d, tuple(s)) for k, (d, s) in ex.expected.items()}:
                raise CheckpointFailure(f"{path}: copied adapter differs from its source")
    if conv.router:
        got = torch.load(os.path.join(tmp, layout.MOE_STATE_DIR, layout.ROUTER_PT),
                         weights_only=True, map_location="cpu")
        finite(got, f"{layout.MOE_STATE_DIR}/{layout.ROUTER_PT}")
        same(conv.router, got, "router.pt")


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return
        raise exc_info[1]
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


def clean_stale(parent: str) -> list[str]:
    """Remove migrate's temporary and parked directories left in ``parent`` by a dead run.

    Callers hold DST's lock, so no live run owns them.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith((layout.MIGRATE_TMP_PREFIX, layout.MIGRATE_OLD_PREFIX)) and \
                e.is_dir(follow_symlinks=False):
            # one that cannot be removed (a failing disk) stays hidden and never stops the run:
            # new temporary directories carry this run's pid
            if _remove_tree(e.path, _NO_FAULTS) is None:
                removed.append(e.path)
    if removed:
        try:
            _fsync_path(parent, directory=True)
        except OSError:
            pass    # only the removals' durability: their directories are gone either way
    return removed


@dataclass
class _Context:
    plan: MigratePlan
    faults: _Faults
    run_cache: dict = field(default_factory=dict)   # run dir -> its configs (lora_alpha lookup)


def _target_abs(plan: MigratePlan, item: MigrateItem) -> str:
    return os.path.abspath(plan.dst if item.target == "." else
                           os.path.join(plan.dst, *item.target.split("/")))


def _shown_target(plan: MigratePlan, item: MigrateItem) -> str:
    """The target as the user named it (DST as given, then the relative path)."""
    return plan.dst if item.target == "." else os.path.join(plan.dst, *item.target.split("/"))


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(dirs: list[str]) -> None:
    """Remove the directories made for a target that failed, deepest first, while empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


class _SourceChanged(Exception):
    """A file of the source vanished or changed while it was read: begin that checkpoint again.

    A prune of SRC may delete merged weights between their validation and their read: migrate
    holds SRC's lock (shared) only where SRC already has a lock file, as it never writes there.
    """


_SOURCE_ATTEMPTS = 3


def _source_changed(src: _Source, digest: str) -> bool:
    """Whether the input files of ``src`` are no longer those ``digest`` was computed from."""
    try:
        now = open_source(src.abspath)
    except Exception:  # noqa: BLE001 - gone or unreadable: it changed
        return True
    return _digest(_input_files(now.ckpt, now.verdict.facts)) != digest


def _migrate_fresh(ctx: _Context, item: MigrateItem) -> MigrateOutcome:
    """``_migrate_one``, begun again from the source as it now is when it changed while read."""
    changed: list[str] = []
    for _ in range(_SOURCE_ATTEMPTS):
        try:
            out = _migrate_one(ctx, item)
        except _SourceChanged as exc:
            changed.append(str(exc))
            continue
        if changed and out.outcome != "failed":
            out = dataclasses.replace(out, warnings=out.warnings + (
                f"note: the source changed while it was read ({changed[-1]}); done again from "
                "the source as it now is",))
        return out
    raise CheckpointFailure(f"the source kept changing while it was read: {changed[-1]}")


def _migrate_one(ctx: _Context, item: MigrateItem) -> MigrateOutcome:
    t0 = time.monotonic()
    plan, opts = ctx.plan, ctx.plan.options
    src_abs = os.path.abspath(plan.src if item.source == "." else
                              os.path.join(plan.src, *item.source.split("/")))
    target = _target_abs(plan, item)

    def outcome(kind: str, **kw) -> MigrateOutcome:
        return MigrateOutcome(item.source, item.target, kind, seconds=time.monotonic() - t0, **kw)

    # the source as it is now, not as it was planned
    try:
        src = open_source(src_abs, min_age_s=opts.min_age_s)
    except scanner.ScanError as exc:
        raise CheckpointFailure(str(exc)) from None
    v = src.verdict
    if v.status in (BROKEN, IN_PROGRESS):
        probe = Checkpoint(src.ckpt, v.status, v.layout, tuple(v.problems), v.merged_files,
                           v.num_experts, facts=v.facts)
        return outcome("skipped", method=item.method, reason=_skip_reason(probe) + " (since the plan)")
    method, why_not = _method_for(Checkpoint(src.ckpt, v.status, v.layout, tuple(v.problems),
                                             v.merged_files, v.num_experts, facts=v.facts))
    if method is None:
        return outcome("skipped", reason=why_not)
    _refuse_unsafe_links(src, plan.src, item.source)
    digest = _digest(_input_files(src.ckpt, v.facts))

    state, detail = _target_state(target, digest)
    if state == "finished":
        return outcome("skipped", method=method, reason="already migrated")
    if state == "foreign":
        raise CheckpointFailure(f"target {target} exists: {detail}")

    parent = os.path.dirname(target)
    name = os.path.basename(target)
    tmp = os.path.join(parent, f"{layout.MIGRATE_TMP_PREFIX}{name}-{os.getpid()}")
    shown = _shown_target(plan, item)
    new_dirs = _missing_dirs(parent)
    try:
        result = _write_target(ctx, src, method, state, digest, item, target, tmp, shown, outcome)
    except BaseException as exc:
        left = _discard(tmp, ctx.faults, os.path.join(os.path.dirname(shown), os.path.basename(tmp)))
        _remove_empty(new_dirs)
        reason = str(exc) if isinstance(exc, CheckpointFailure) else None
        # only an OSError of its own here (mkdir, rename, a read): the writer names the file
        # of a failed write itself, and other exceptions go up as they are
        why = storage_error(exc) if reason is None and isinstance(exc, OSError) else None
        if why is not None:
            where = getattr(exc, "filename", None)
            if isinstance(where, str) and _inside(where, tmp):
                where = shown + where[len(tmp):]
            reason = f"{why}: {where}" if isinstance(where, str) else f"{why} migrating to {shown}"
        if reason is None:
            raise       # a bug: execute_migrate reports it (its traceback with -v)
        raise CheckpointFailure(reason + (f"; {left}" if left else ""),
                                fields=getattr(exc, "fields", None)) from None
    left = _discard(tmp, ctx.faults, tmp)      # a --verify failure leaves it; a success renamed it
    if result.outcome == "failed":
        _remove_empty(new_dirs)
    if left:
        result = dataclasses.replace(result, warnings=result.warnings + (f"warning: {left}",))
    return result


def _write_target(ctx: _Context, src: _Source, method: str, state: str, digest: str,
                  item: MigrateItem, target: str, tmp: str, shown: str,
                  outcome: Callable[..., MigrateOutcome]) -> MigrateOutcome:
    """Build the target under ``tmp``, verify it, rename it into place: all or nothing."""
    opts, v = ctx.plan.options, src.verdict
    parent = os.path.dirname(target)
    name = os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    _rmtree(tmp)
    os.mkdir(tmp)
    try:
        conv = build_conversion(src, method, opts, run_cache=ctx.run_cache)
        w = _Writer(tmp, ctx.faults, opts.link, shown)
        _write_conversion(conv, w)
    except (OSError, FormatError) as exc:
        if _source_changed(src, digest):
            raise _SourceChanged(f"{type(exc).__name__}: {exc}") from exc
        raise
    marker = {
        "format": _MARKER_FORMAT, "tool": "ckpt-tools", "version": __version__,
        "source": item.source, "source_path": os.path.realpath(src.abspath),
        "layout": v.layout, "method": method, "experts": conv.num_experts,
        "max_rel_error": conv.max_rel_error, "inputs_digest": digest,
        "inputs": [list(x) for x in _input_files(src.ckpt, v.facts)],
        "written": dict(sorted(w.written.items())),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    w.json(layout.MIGRATED_MARKER, marker)
    _fsync_tree(tmp, ctx.faults, w.shown_path)
    _fsync_dir(parent, ctx.faults, os.path.dirname(shown))

    # verify before committing: our validator, then the tensors read back
    _, tv = _validate_dir(tmp, name)
    errors = [p for p in tv.problems if p.is_error]
    if errors or tv.status != PEFT_ONLY:
        why = f"{errors[0].code}: {errors[0].path}: {errors[0].message}" if errors else tv.status
        raise CheckpointFailure(f"the written checkpoint does not validate ({why})")
    if tv.layout != layout.CANONICAL:
        raise CheckpointFailure(f"the written checkpoint is {tv.layout}, not canonical")
    _reread_check(conv, tmp)
    verify = None
    if opts.verify:
        from .loader import verify_conversion
        verify = verify_conversion(conv, tmp, src, opts)
        if not verify["passed"]:
            why = verify.get("error") or (
                f"logits differ by {verify['max_rel_diff']:.3g} (relative), above the "
                f"tolerance {verify['tolerance']:g}")
            return outcome("failed", method=method, verify=verify, reason=f"--verify: {why}")

    ctx.faults.hit("before_rename")
    old = None
    warnings = list(conv.warnings + w.warnings)
    if state == "stale":
        old = os.path.join(parent, f"{layout.MIGRATE_OLD_PREFIX}{name}-{os.getpid()}")
        _rmtree(old)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
    else:
        if os.path.isdir(target):
            os.rmdir(target)     # absent or an empty directory (checked above)
        os.rename(tmp, target)
    try:
        # the rename is what commits the target: a failed fsync of it undoes it, so that what
        # is reported (failed) is what is on disk (no target, or the old one)
        _fsync_dir(parent, ctx.faults, os.path.dirname(shown))
    except BaseException:
        os.rename(target, tmp)
        if old is not None:
            os.rename(old, target)
        raise
    ctx.faults.hit("after_rename")
    if old is not None:
        left = _discard(old, ctx.faults, old)
        if left:
            warnings.append(f"warning: {left}")
    return outcome("migrated", method=method, experts=conv.num_experts,
                   max_rel_error=conv.max_rel_error, module_errors=conv.module_errors,
                   max_error=opts.max_error if method == METHOD_SVD else None,
                   verify=verify, warnings=tuple(warnings))


def _sync_or_fail(path: str, directory: bool, faults: _Faults, what: str) -> None:
    """fsync ``path``; a storage error becomes this checkpoint's one-line failure."""
    try:
        _fsync_path(path, directory=directory, faults=faults)
    except OSError as exc:
        why = storage_error(exc)
        if why is None:
            raise
        raise CheckpointFailure(f"{why} syncing {what}") from None


def _fsync_dir(path: str, faults: _Faults, shown: str) -> None:
    _sync_or_fail(path, True, faults, f"the directory {shown or '.'}")


# --- execution -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MigrateEvent:
    kind: str                        # start | done
    item: MigrateItem
    outcome: MigrateOutcome | None = None


def _ordered(items: list[MigrateItem]) -> tuple[list[MigrateItem], list[MigrateItem]]:
    """Items whose target holds another target must be done first, one at a time."""
    targets = [i.target for i in items]

    def holds_other(t: str) -> bool:
        return any(o != t and (t == "." or o.startswith(t + "/")) for o in targets)

    first = sorted((i for i in items if holds_other(i.target)), key=lambda i: i.target.count("/"))
    rest = [i for i in items if not holds_other(i.target)]
    return first, rest


def lock_dir_for(plan: MigratePlan) -> str:
    """Where DST's lock file lives: DST itself, or its parent when DST is a target itself."""
    dst = os.path.abspath(plan.dst)
    if any(i.target == "." for i in plan.items):
        return os.path.dirname(dst)
    return dst


def execute_migrate(plan: MigratePlan, *, jobs: int = 1,
                    on_event: Callable[[MigrateEvent], None] | None = None,
                    lock: bool = True, lock_timeout: float = 0.0,
                    lock_path: str | None = None) -> MigrateResult:
    """Carry out ``plan``: every item is re-checked against the source as it is now.

    Takes DST's tree lock exclusively and SRC's shared (and their lock files: SRC's where
    it has one; or ``lock_path`` instead) unless ``lock`` is False; raises
    ``locking.LockHeld`` when another run holds it.
    """
    from contextlib import ExitStack
    faults = _Faults.from_env()
    ctx = _Context(plan, faults)
    migrated: list[MigrateOutcome] = []
    skipped: list[MigrateOutcome] = []
    failed: list[MigrateOutcome] = []
    results_lock = threading.Lock()

    for i in plan.items:
        if i.action == ACTION_SKIP:
            skipped.append(MigrateOutcome(i.source, i.target, "skipped", method=i.method,
                                          reason=i.reason))
    work = [i for i in plan.items if i.action in (ACTION_MIGRATE, ACTION_DONE)]

    with ExitStack() as stack:
        dst = os.path.abspath(plan.dst)
        ldir = lock_dir_for(plan)
        os.makedirs(ldir, exist_ok=True)
        if lock:
            from .locking import root_lock
            # one call: DST's tree may lie above SRC (a lock taken twice would block itself)
            stack.enter_context(root_lock([ldir], lock_timeout, lock_path=lock_path,
                                          shared_roots=[plan.src]))
        for parent in sorted({os.path.dirname(_target_abs(plan, i)) for i in work}):
            if parent == os.path.dirname(dst) or _inside(parent, dst):
                clean_stale(parent)

        def run(item: MigrateItem) -> None:
            if on_event:
                on_event(MigrateEvent("start", item))
            try:
                out = _migrate_fresh(ctx, item)
            except CheckpointFailure as exc:
                out = MigrateOutcome(item.source, item.target, "failed", method=item.method,
                                     reason=str(exc), **exc.fields)
            except Exception as exc:  # noqa: BLE001 - one checkpoint never stops the others
                import traceback
                msg = str(exc).splitlines()[0] if str(exc) else ""
                out = MigrateOutcome(item.source, item.target, "failed", method=item.method,
                                     reason=f"{type(exc).__name__}: {msg}",
                                     detail=traceback.format_exc())
            with results_lock:
                {"migrated": migrated, "skipped": skipped, "failed": failed}[out.outcome].append(out)
            if on_event:
                on_event(MigrateEvent("done", item, out))

        first, rest = _ordered(work)
        for item in first:
            run(item)
        if jobs > 1 and len(rest) > 1:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(run, rest))
        else:
            for item in rest:
                run(item)

    def key(o: MigrateOutcome):
        return o.source
    return MigrateResult(tuple(sorted(migrated, key=key)), tuple(sorted(skipped, key=key)),
                         tuple(sorted(failed, key=key)))
