"""Strip a checkpoint of its training state: plan it (``strip_plan``), then do it (``execute_strip``).

What goes is what only resuming needs (``layout.is_resume_only``: optimizer, scheduler, scaler
and RNG state, DeepSpeed's global_step*/, FSDP's optimizer_*/); the weights or adapters, configs,
tokenizer, ``trainer_state.json`` and ``training_args.bin`` stay, so the checkpoint is still
usable for evaluation and inference. Where the engine state is the only copy of the model
(DeepSpeed ZeRO-3 without gathered weights, FSDP without consolidated weights) nothing is stripped.

A strip is made visible before it starts: the marker (``layout.STRIP_MARKER``) is written first,
in state ``stripping``, naming the files it removes; each file is unlinked after its identity
check, as prune's are (``prune.execute``); the marker is rewritten ``stripped`` at the end. A
strip killed in between leaves the marker ``stripping`` (audit: ``strip-interrupted``), and the
next ``execute_strip`` of the checkpoint finishes it. The caller holds the root's lock.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from .. import __version__, layout
from ..fs import FileOps, fsync, local_or
from ..kinds import ModelKind, Status
from ..problems import STRIP_INTERRUPTED
from ..prune.execute import (_DIR_FLAGS, Revalidator, _Changed, _describe_change, _dir_id,
                             _identity, _open_dir_nofollow)
from ..prune.plan import skip_reason
from ..records import Checkpoint, FileRecord
from .strip_marker import STRIPPED, STRIPPING, StripMarker, read_marker

_BY = f"ckpt-tools {__version__}"
# Where the engine state holds the only copy of the model, by model kind: never stripped.
_ENGINE_HOLDS_MODEL = {
    ModelKind.DEEPSPEED: ("its DeepSpeed state is the only copy of the model (ZeRO-3 without "
                          "gathered weights): stripping global_step*/ would lose the model"),
    ModelKind.FSDP: ("its FSDP sharded state has no consolidated weights beside it: the engine "
                     "state is the only copy of the model, so none of it is stripped"),
}


@dataclass(frozen=True)
class StrippedFile:
    """One resume-only file to unlink, with the identity it must still have."""

    record: FileRecord
    frees_bytes: int       # 0 where another hard link keeps its blocks
    other_links: int = 0   # links to it that the strip does not remove

    @property
    def relpath(self) -> str:
        return self.record.relpath


@dataclass(frozen=True)
class StripPlan:
    """The training state of the checkpoint at ``checkpoint`` (relative to ``root``) to remove.
    ``finishes``: an interrupted strip's marker is there, and this plan finishes it (it may then
    have no file left to remove)."""

    root: str
    checkpoint: str
    files: tuple[StrippedFile, ...]
    finishes: bool = False

    @property
    def freed_bytes(self) -> int:
        return sum(f.frees_bytes for f in self.files)

    def to_dict(self) -> dict:
        return {"path": self.checkpoint, "freed_bytes": self.freed_bytes,
                "files": [{"path": f.relpath, "bytes": f.frees_bytes} for f in self.files]}


@dataclass(frozen=True)
class Refusal:
    """Why the checkpoint at ``checkpoint`` is not stripped (nothing of it is touched)."""

    root: str
    checkpoint: str
    reason: str


@dataclass(frozen=True)
class StripOutcome:
    """What ``execute_strip`` did. ``removed``: (relpath, bytes freed) of the files this call
    unlinked; ``skipped`` and ``failed``: (relpath, reason); ``refused``: why nothing was touched.
    ``marker_bytes``: what the strip marker takes on disk beyond what it took before this call
    (a first strip's marker costs a block). ``freed_bytes`` is net of it: the bytes that left the
    disk. ``complete``: the checkpoint is stripped and its marker says so."""

    root: str
    checkpoint: str
    removed: tuple[tuple[str, int], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    refused: str = ""
    marker_bytes: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(b for _, b in self.removed) - self.marker_bytes

    @property
    def complete(self) -> bool:
        return not (self.refused or self.skipped or self.failed)


def strip_plan(checkpoint: Checkpoint) -> StripPlan | Refusal:
    """The resume-only files of ``checkpoint`` with the bytes each frees, or why it is refused:
    only a sound (healthy or redundant, no error), complete checkpoint older than --min-age whose
    model is held outside the engine state is stripped. Bytes are exact with hard links within
    the checkpoint: a file also linked elsewhere frees nothing; files linked to one another are
    credited to the last of them (``execute_strip`` measures at each unlink)."""
    c = checkpoint
    root, path = c.dir.root, c.path

    def refuse(reason: str) -> Refusal:
        return Refusal(root, path, reason)

    if c.status not in (Status.HEALTHY, Status.REDUNDANT) or c.errors:
        return refuse(skip_reason(c))
    if c.fresh:
        return refuse(skip_reason(c))
    if c.model_kind in _ENGINE_HOLDS_MODEL:
        return refuse(_ENGINE_HOLDS_MODEL[c.model_kind])
    records = [f for f in c.dir.files if layout.is_resume_only(f.relpath)]
    finishes = any(p.code == STRIP_INTERRUPTED for p in c.problems)
    if not records and not finishes:
        return refuse("stripped already: no training state left" if c.stripped
                      else "no training state to strip")
    links: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for i, rec in enumerate(records):
        if not rec.is_symlink:
            links[(rec.dev, rec.ino)] = links.get((rec.dev, rec.ino), 0) + 1
            last[(rec.dev, rec.ino)] = i
    files = []
    for i, rec in enumerate(records):
        if rec.is_symlink:     # the link itself goes, never its target
            files.append(StrippedFile(rec, rec.allocated))
            continue
        key = (rec.dev, rec.ino)
        others = max(rec.nlink - links[key], 0)
        frees = rec.allocated if others == 0 and last[key] == i else 0
        files.append(StrippedFile(rec, frees, others))
    return StripPlan(root, path, tuple(files), finishes)


def execute_strip(fs: FileOps | None, root: str, plan: StripPlan | Refusal, *, now: float,
                  revalidate: Callable[[str, str], Checkpoint] | None = None) -> StripOutcome:
    """Carry out ``plan`` on the checkpoint under ``root``: the marker first, then each file
    that is still what the plan saw, then the marker rewritten ``stripped``.

    ``revalidate(root, checkpoint)`` returns the checkpoint as it is now (default: re-scanned
    and re-validated with a 1 h --min-age, "now" being ``now``; pass a ``prune.Revalidator``
    with the run's own): it must still be one ``strip_plan`` strips, and each file must have
    the identity both the plan and the re-scan saw. ``now`` (seconds since the epoch) dates
    the marker. Every storage change goes through ``fs``; the checkpoint directory's times are
    set back afterwards (the Trainer's rotation may sort checkpoints by them). Raises only on
    bugs: every failure is in the outcome."""
    if isinstance(plan, Refusal):
        return StripOutcome(plan.root, plan.checkpoint, refused=plan.reason)
    fs = local_or(fs)
    if revalidate is None:
        revalidate = Revalidator(clock=lambda: now, prove=False)
    ckpt = plan.checkpoint
    root_abs = os.path.abspath(root)
    parts = [] if ckpt == "." else ckpt.split("/")
    try:
        root_fd = os.open(root_abs, _DIR_FLAGS)
        try:
            fd = _open_dir_nofollow(root_fd, parts, "checkpoint directory")
        finally:
            os.close(root_fd)
    except _Changed as exc:
        return StripOutcome(root, ckpt, refused=str(exc))
    except OSError as exc:
        return StripOutcome(root, ckpt, refused=f"cannot open the checkpoint directory: "
                                                f"{exc.strerror or exc}")
    try:
        return _Strip(fs, root, ckpt, os.path.join(root_abs, *parts), fd, now).run(plan, revalidate)
    finally:
        os.close(fd)


class _Strip:
    """One strip of the checkpoint directory held open as ``fd``."""

    def __init__(self, fs: FileOps, root: str, ckpt: str, abspath: str, fd: int, now: float):
        self.fs, self.root, self.ckpt, self.abspath, self.fd = fs, root, ckpt, abspath, fd
        self.when = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")
        self.dir_id = _dir_id(os.fstat(fd))
        self.removed: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.marker_before = self._marker_allocated()

    def outcome(self, refused: str = "") -> StripOutcome:
        return StripOutcome(self.root, self.ckpt, tuple(self.removed), tuple(self.skipped),
                            tuple(self.failed), refused,
                            max(0, self._marker_allocated() - self.marker_before))

    def _marker_allocated(self) -> int:
        """What the strip marker takes on disk now (0: none)."""
        try:
            return self.fs.lstat(os.path.join(self.abspath, layout.STRIP_MARKER)).st_blocks * 512
        except OSError:
            return 0

    def still_there(self) -> None:
        """The checkpoint's path still leads to the directory held open, with no symlink."""
        try:
            st = os.stat(self.abspath) if self.ckpt == "." else os.lstat(self.abspath)
        except OSError:
            raise _Changed("checkpoint directory moved or vanished since the plan") from None
        if not stat.S_ISDIR(st.st_mode) or _dir_id(st) != self.dir_id:
            raise _Changed("checkpoint directory was moved or replaced since the plan")

    def run(self, plan: StripPlan, revalidate) -> StripOutcome:
        try:
            self.still_there()
            try:
                fresh = revalidate(self.root, self.ckpt)
            except OSError as exc:
                raise _Changed(f"cannot re-scan the checkpoint: {exc.strerror or exc}") from None
            self.still_there()
            again = strip_plan(fresh)
            if isinstance(again, Refusal):
                raise _Changed(f"no longer to be stripped: {again.reason}")
        except _Changed as exc:
            return self.outcome(str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint never stops the run (§5.4.6)
            return self.outcome(f"re-validation failed: {type(exc).__name__}: {exc}")
        seen = {f.relpath: f.record for f in again.files}
        previous = self._previous_marker()
        dst = os.fstat(self.fd)
        times = previous.directory_times_ns if previous and previous.directory_times_ns else (
            dst.st_atime_ns, dst.st_mtime_ns)
        try:
            os.utime(self.fd, ns=(dst.st_atime_ns, dst.st_mtime_ns))   # only its owner may
        except OSError as exc:
            return self.outcome(f"not stripped: its directory's modification time could not be "
                                f"kept ({exc.strerror or exc}), and the Trainer's checkpoint "
                                "rotation would see this checkpoint as its newest")
        earlier = dict(previous.files) if previous else {}
        removing = earlier | {f.relpath: f.frees_bytes for f in plan.files}
        started = previous.started if previous and previous.started else self.when
        try:
            self._write_marker(StripMarker(STRIPPING, tuple(sorted(removing.items())), started,
                                           by=_BY, directory_times_ns=times))
        except (_Changed, OSError) as exc:
            self._set_times(times)
            why = str(exc) if isinstance(exc, _Changed) else exc.strerror or str(exc)
            return self.outcome(f"the strip marker could not be written: {why}")
        for f in plan.files:
            now_rec = seen.get(f.relpath)
            if now_rec is None:
                continue          # gone since the plan (removed by a strip killed before): fine
            if now_rec.identity != f.record.identity:
                self.skipped.append((f.relpath, _describe_change(f.record.identity, now_rec.identity)))
                continue
            self._unlink(f)
        self._remove_emptied(removing)
        if not (self.skipped or self.failed):
            planned = {f.relpath for f in plan.files}
            done = {p: b for p, b in earlier.items() if p not in planned} | dict(self.removed)
            try:
                self._write_marker(StripMarker(STRIPPED, tuple(sorted(done.items())), started,
                                               self.when, _BY))
            except (_Changed, OSError) as exc:
                why = str(exc) if isinstance(exc, _Changed) else exc.strerror or str(exc)
                self.failed.append((layout.STRIP_MARKER, "stripped, but the marker could not be "
                                    f"rewritten to say so: {why}"))
        self._set_times(times)
        return self.outcome()

    def _previous_marker(self) -> StripMarker | None:
        """An interrupted strip's marker (state ``stripping``), whose files and directory times
        it had: the marker, else the temporary of a strip killed before its marker was renamed
        into place (no file of it was removed yet, but its temporary moved the times)."""
        names = [layout.STRIP_MARKER] + sorted(
            n for n in os.listdir(self.abspath) if n.startswith(layout.STRIP_MARKER_TMP_PREFIX))
        for name in names:
            try:
                marker = read_marker(os.path.join(self.abspath, name))
            except OSError:
                continue
            if not isinstance(marker, str) and marker.state == STRIPPING:
                return marker
        return None

    def _write_marker(self, marker: StripMarker) -> None:
        """Write the marker whole: a temporary beside it, synced, renamed onto it (storage
        without rename: in place; a torn marker reads as an interrupted strip)."""
        fs, final = self.fs, os.path.join(self.abspath, layout.STRIP_MARKER)
        self.still_there()
        for name in fs.listdir(self.abspath):   # a killed run's temporary
            if name.startswith(layout.STRIP_MARKER_TMP_PREFIX):
                fs.unlink(os.path.join(self.abspath, name))
        if fs.atomic_rename:
            tmp = os.path.join(self.abspath, f"{layout.STRIP_MARKER_TMP_PREFIX}{os.getpid()}")
            fs.write_bytes(tmp, marker.to_json())
            if fs.durable_fsync:
                fsync(tmp, fs)
            fs.rename(tmp, final)
        else:
            fs.write_bytes(final, marker.to_json())
        if fs.durable_fsync:   # the marker (and the unlinks before it) durable before going on
            fsync(self.abspath, fs, directory=True)

    def _unlink(self, f: StrippedFile) -> None:
        *subdirs, name = f.relpath.split("/")
        try:
            fd = _open_dir_nofollow(self.fd, subdirs, "directory") if subdirs else self.fd
        except _Changed as exc:
            self.skipped.append((f.relpath, str(exc)))
            return
        except OSError as exc:
            self.failed.append((f.relpath, f"cannot open its directory: {exc.strerror or exc}"))
            return
        try:
            try:
                st = self.fs.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return            # gone already: what the strip wants
            except OSError as exc:
                self.failed.append((f.relpath, f"cannot stat: {exc.strerror or exc}"))
                return
            if _identity(st) != f.record.identity:
                self.skipped.append((f.relpath, _describe_change(f.record.identity, _identity(st))))
                return
            if stat.S_ISDIR(st.st_mode):
                self.skipped.append((f.relpath, "is a directory now"))
                return
            try:
                self.still_there()
                self.fs.unlink(name, dir_fd=fd)   # a symlink goes itself, never its target
            except _Changed as exc:
                self.skipped.append((f.relpath, str(exc)))
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                self.failed.append((f.relpath, f"cannot delete: {exc.strerror or exc}"))
                return
            last_link = stat.S_ISLNK(st.st_mode) or st.st_nlink <= 1
            self.removed.append((f.relpath, st.st_blocks * 512 if last_link else 0))
        finally:
            if fd != self.fd:
                os.close(fd)

    def _remove_emptied(self, relpaths) -> None:
        """The directories of the removed state (global_step*/, optimizer_*/) once empty,
        deepest first (an interrupted strip's too); one still holding anything stays."""
        dirs = {"/".join(rel.split("/")[:i]) for rel in relpaths for i in range(1, rel.count("/") + 1)}
        for rel in sorted(dirs, key=lambda d: (-d.count("/"), d)):
            path = os.path.join(self.abspath, *rel.split("/"))
            try:
                self.still_there()
                if os.path.islink(path) or not os.path.isdir(path) or os.listdir(path):
                    continue
                self.fs.rmdir(path)
            except _Changed as exc:
                self.skipped.append((rel + "/", str(exc)))
                return
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.failed.append((rel + "/", f"cannot remove the emptied directory: "
                                               f"{exc.strerror or exc}"))

    def _set_times(self, times: tuple[int, int]) -> None:
        try:
            os.utime(self.fd, ns=times)
        except OSError as exc:
            self.failed.append((".", "stripped, but its directory's modification time could not "
                                     f"be set back: {exc.strerror or exc}"))


__all__ = ["strip_plan", "execute_strip", "StripPlan", "StrippedFile", "Refusal", "StripOutcome"]
