"""Writing one target through the commit protocol: the files of a ``Conversion`` under a
temporary directory, the marker, validation, the read-back check, then the rename.

A file that cannot be written or synced (a full disk, an I/O error) fails that checkpoint
alone, with one line naming the file as it would be named under DST.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import __version__, canonical, commit, layout
from ..errors import Wording
from ..fs import FileOps, SyncError
from ..problems import NAN_OR_INF, FormatError
from ..records import HEALTHY
from .errors import STORAGE_ERRORS, CheckpointFailure, storage_error
from .extract import Conversion, MigrateSource, build_conversion, open_source
from .plan import (MARKER_FORMAT, METHOD_COPY, METHOD_SVD, MigrateItem, MigratePlan, digest_of,
                   input_files, is_inside, validate_dir)
from .result import MigrateOutcome


class _Writer:
    """Writes the files of one target under its temporary directory, through ``fs``.

    A file that cannot be written (a full disk, an I/O error) becomes one ``CheckpointFailure``
    naming it under ``shown``, the target as the user knows it (not its temporary name).
    """

    def __init__(self, root: str, fs: FileOps, link: bool, shown: str):
        self.root = root
        self.fs = fs
        self.link = link
        self.shown = shown
        self.written: dict[str, int] = {}
        self.warnings: list[str] = []

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def shown_path(self, path: str) -> str:
        """``path`` under the temporary directory, as it will be named under the target."""
        if is_inside(path, self.root):
            return self.shown + path[len(self.root):]
        return path

    def _write(self, rel: str, write: Callable[[str], None]) -> None:
        """``write(path)`` creates the file ``rel`` through the file operations."""
        path = self._abs(rel)
        try:
            self.fs.makedirs(os.path.dirname(path))
            write(path)
        except Exception as exc:  # noqa: BLE001 - libraries wrap OSError in their own types
            why = storage_error(exc)
            if why is None:
                raise
            where = getattr(exc, "filename", None)
            if not (isinstance(where, str) and is_inside(where, self.root)):
                where = path
            raise CheckpointFailure(f"{why} writing {self.shown_path(where)}") from None
        self.written[rel] = self.fs.lstat(path).st_size

    def copy(self, src_abs: str, rel: str, *, allow_link: bool = True) -> None:
        def link_or_copy(dst: str) -> None:
            try:
                self.fs.link(os.path.realpath(src_abs), dst)
            except OSError as exc:
                if exc.errno in STORAGE_ERRORS:    # a copy would fail the same way
                    raise
                if not self.warnings or "hard link" not in self.warnings[-1]:
                    self.warnings.append(f"cannot hard-link ({exc.strerror or exc}); copied instead")
                self.fs.copy_file(src_abs, dst)

        if self.link and allow_link:
            self._write(rel, link_or_copy)
        else:
            self._write(rel, lambda dst: self.fs.copy_file(src_abs, dst))

    def json(self, rel: str, doc: dict) -> None:
        self._write(rel, lambda path: self.fs.write_bytes(path, canonical.json_bytes(doc)))

    def torch_save(self, rel: str, obj) -> None:
        import torch

        def write(path: str) -> None:
            # through a Python file: a failed write then carries its OSError (errno), where
            # torch's own C++ writer only says "unexpected pos"
            with open(path, "wb") as fh:
                torch.save(obj, fh)
        self._write(rel, lambda path: self.fs.write_file(path, write))

    def adapter(self, rel_dir: str, tensors: dict, config: dict) -> None:
        from safetensors.torch import save_file

        def weights(path: str) -> None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})

        self._write(f"{rel_dir}/{layout.ADAPTER_WEIGHTS}", lambda p: self.fs.write_file(p, weights))
        self._write(f"{rel_dir}/{layout.ADAPTER_CONFIG}",
                    lambda p: self.fs.write_file(p, canonical.peft_config_writer(config)))

    def extracted_adapter(self, rel_dir: str, extraction) -> None:
        """A low-rank extraction's adapter_model.safetensors and adapter_config.json."""
        from . import lowrank
        for rel, produce in lowrank.adapter_files(extraction):
            self._write(f"{rel_dir}/{rel}", lambda p, produce=produce: self.fs.write_file(p, produce))


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

    from ..tensor_io import bit_equal, non_finite

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


def clean_stale(parent: str, fs: FileOps | None = None) -> list[str]:
    """Remove migrate's temporary and parked directories left in ``parent`` by a dead run.

    Callers hold DST's lock, so no live run owns them.
    """
    return commit.remove_stale(parent, (layout.MIGRATE_TMP_PREFIX, layout.MIGRATE_OLD_PREFIX), fs)


@dataclass
class MigrateContext:
    plan: MigratePlan
    fs: FileOps
    run_cache: dict = field(default_factory=dict)   # run dir -> its configs (lora_alpha lookup)


class SourceChanged(Exception):
    """A file of the source vanished or changed while it was read: begin that checkpoint again.

    A prune of SRC may delete merged weights between their validation and their read: migrate
    holds SRC's lock (shared) only where SRC already has a lock file, as it never writes there.
    """


def _source_changed(src: MigrateSource, digest: str) -> bool:
    """Whether the input files of ``src`` are no longer those ``digest`` was computed from."""
    try:
        now = open_source(src.abspath)
    except Exception:  # noqa: BLE001 - gone or unreadable: it changed
        return True
    return digest_of(input_files(now.ckpt, now.verdict.facts)) != digest


@dataclass(frozen=True)
class TargetJob:
    """One target to write: from which source, how, and how the user names it."""

    src: MigrateSource
    method: str
    digest: str                 # of the source's input files, as the marker records it
    item: MigrateItem
    shown: str                  # the target as the user named it
    outcome: Callable[..., MigrateOutcome]


class VerifyFailed(Exception):
    """--verify refused a written target: nothing is committed, the outcome says why."""

    def __init__(self, outcome: MigrateOutcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


def write_target(ctx: MigrateContext, job: TargetJob,
                 staging: commit.RenameCommit) -> MigrateOutcome:
    """Build the target in ``staging``, verify it, rename it into place: all or nothing."""
    opts, src, shown = ctx.plan.options, job.src, job.shown
    written: dict = {}

    def write(tmp: str) -> None:
        try:
            conv = build_conversion(src, job.method, opts, run_cache=ctx.run_cache)
            w = _Writer(tmp, ctx.fs, opts.link, shown)
            _write_conversion(conv, w)
        except (OSError, FormatError) as exc:
            if _source_changed(src, job.digest):
                raise SourceChanged(f"{type(exc).__name__}: {exc}") from exc
            raise
        w.json(layout.MIGRATED_MARKER, _marker(job, conv, w))
        written.update(conv=conv, w=w)

    def validate(tmp: str) -> None:
        _, tv = validate_dir(tmp, os.path.basename(staging.final))
        errors = [p for p in tv.problems if p.is_error]
        if errors or tv.status != HEALTHY:
            why = f"{errors[0].code}: {errors[0].path}: {errors[0].message}" if errors else tv.status
            raise CheckpointFailure(f"the written checkpoint does not validate ({why})")
        if tv.layout != layout.CANONICAL:
            raise CheckpointFailure(f"the written checkpoint is {tv.layout}, not canonical")

    def read_back(tmp: str) -> None:
        conv = written["conv"]
        _reread_check(conv, tmp)
        if opts.verify:
            from .verify import verify_conversion
            verify = verify_conversion(conv, tmp, src, opts)
            written["verify"] = verify
            if not verify["passed"]:
                why = verify.get("error") or (
                    f"logits differ by {verify['max_rel_diff']:.3g} (relative), above the "
                    f"tolerance {verify['tolerance']:g}")
                raise VerifyFailed(job.outcome("failed", method=job.method, verify=verify,
                                                reason=Wording("{verify}: {why}", why=why)))

    try:
        commit.commit(staging, write, validate=validate, read_back=read_back)
    except SyncError as exc:
        failure = _sync_failure(exc, staging, shown)
        if failure is None:
            raise
        raise failure from None
    conv, w = written["conv"], written["w"]
    return job.outcome("migrated", method=job.method, experts=conv.num_experts,
                       max_rel_error=conv.max_rel_error, module_errors=conv.module_errors,
                       max_error=opts.max_error if job.method == METHOD_SVD else None,
                       verify=written.get("verify"), warnings=tuple(conv.warnings + w.warnings))


def _marker(job: TargetJob, conv: Conversion, w: _Writer) -> dict:
    """``.ckpt-tools-migrated.json``: where the target came from, written last."""
    v = job.src.verdict
    return {
        "format": MARKER_FORMAT, "tool": "ckpt-tools", "version": __version__,
        "source": job.item.source, "source_path": os.path.realpath(job.src.abspath),
        "layout": v.layout, "method": job.method, "experts": conv.num_experts,
        "max_rel_error": conv.max_rel_error, "inputs_digest": job.digest,
        "inputs": [list(x) for x in input_files(job.src.ckpt, v.facts)],
        "written": dict(sorted(w.written.items())),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sync_failure(exc: SyncError, staging: commit.RenameCommit, shown: str) -> CheckpointFailure | None:
    """A failed fsync of the staging tree or of its parent, as this checkpoint's one-line
    failure naming the file as it would be under DST; None for any other ``OSError``."""
    why = storage_error(exc)
    if why is None:
        return None
    where = exc.filename
    if where == staging.parent:
        return CheckpointFailure(f"{why} syncing the directory {os.path.dirname(shown) or '.'}")
    if is_inside(where, staging.tmp):
        where = shown + where[len(staging.tmp):]
    return CheckpointFailure(f"{why} syncing {where}")
