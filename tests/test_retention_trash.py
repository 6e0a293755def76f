"""The trash of ``prune --delete`` (``ckpt_tools.retention.trash``) and ``ckpt-tools restore``:
a checkpoint moved aside in one rename after its identity is checked, listed, purged after its
grace period (or at once), restored by name; and SIGKILL after each file operation of a move
and of a purge, through ``tests/faulty_fs.py``'s ``after_op`` point."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_tools import scan
from ckpt_tools.cli import main
from ckpt_tools.layout import TRASH_DIR
from ckpt_tools.retention.trash import (DEFAULT_PURGE_AFTER_S, PURGING_SUFFIX, MoveFailed,
                                        MoveSkipped, NotATrashEntry, RestoreFailed, list_trash,
                                        move_to_trash, purge, restore)
from fixtures.copying import copy_tree

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RUN = "run_trainer"
OLD, NEW = f"{RUN}/checkpoint-2", f"{RUN}/checkpoint-4"
DAY = 86400.0


@pytest.fixture
def tree(results_tree, tmp_path):
    """A private copy of the fixture tree's Trainer run: (root, run directory, now)."""
    src, _, now = results_tree
    root = copy_tree(src, tmp_path / "results", only=(RUN,))
    return root, root / RUN, now


def planned(root: Path, path: str):
    """The checkpoint ``path`` as a plan sees it: from a scan of the whole root."""
    return next(c for c in scan(str(root), min_age_s=0).checkpoints if c.path == path)


def files_of(top: Path) -> dict[str, tuple[int, int, int]]:
    """relpath → (inode, size, mtime_ns) of every file under ``top``: equal only for the same files."""
    out = {}
    for dirpath, _dirs, names in os.walk(top):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), top)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def mtime(p: Path) -> int:
    return os.lstat(p).st_mtime_ns


# --- move ---------------------------------------------------------------------------------------

def test_a_move_is_one_rename_into_the_runs_trash_and_the_scan_sees_only_live_checkpoints(tree):
    root, run, now = tree
    ckpt = planned(root, OLD)
    before, run_mtime, ckpt_mtime = files_of(root / OLD), mtime(run), mtime(root / OLD)
    entry = move_to_trash(None, str(root), ckpt, now=now)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    assert entry.name == f"checkpoint-2.deleted-{stamp}"
    assert Path(entry.path) == run / TRASH_DIR / entry.name
    assert not (root / OLD).exists()
    assert os.lstat(entry.path).st_ino == ckpt.dir.ino
    assert files_of(Path(entry.path)) == before
    assert entry.original_name == "checkpoint-2" and entry.deleted_at == int(now)
    assert entry.allocated_bytes == entry.frees_bytes == sum(f.allocated for f in ckpt.dir.files) > 0
    # the Trainer's rotation sorts by mtime: neither the run's nor the checkpoint's moved
    assert mtime(run) == run_mtime and mtime(Path(entry.path)) == ckpt_mtime
    assert list_trash(str(run)) == [entry]
    assert [c.path for c in scan(str(root), min_age_s=0).checkpoints] == [NEW]


def test_the_trash_gets_the_run_directorys_permissions(tree):
    root, run, now = tree
    os.chmod(run, 0o750)
    move_to_trash(None, str(root), planned(root, OLD), now=now)
    st = os.lstat(run / TRASH_DIR)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (os.lstat(run).st_uid, os.lstat(run).st_gid)


@pytest.mark.parametrize("change, reason", [
    ("modified", "'trainer_state.json' modified"),
    ("added", "'notes.txt' added"),
    ("vanished", "'scheduler.pt'"),
    ("replaced", "replaced since the plan"),
])
def test_a_checkpoint_changed_since_the_plan_is_skipped_and_left_in_place(tree, change, reason):
    root, run, now = tree
    ckpt = planned(root, OLD)
    d = root / OLD
    if change == "modified":
        with open(d / "trainer_state.json", "a") as fh:
            fh.write(" ")
    elif change == "added":
        (d / "notes.txt").write_text("x")
    elif change == "vanished":
        (d / "scheduler.pt").unlink()
    else:
        os.rename(d, run / "moved-away")
        copy_tree(run / "moved-away", d)
    after = files_of(d)
    with pytest.raises(MoveSkipped, match=reason):
        move_to_trash(None, str(root), ckpt, now=now)
    assert files_of(d) == after
    assert list_trash(str(run)) == []


def test_a_callers_check_replaces_the_file_comparison(tree):
    root, _run, now = tree
    ckpt = planned(root, OLD)
    with pytest.raises(MoveSkipped, match="^no longer to delete$"):
        move_to_trash(None, str(root), ckpt, now=now, check=lambda fresh: "no longer to delete")
    (root / OLD / "notes.txt").write_text("x")     # changed, but the caller judged the re-scan
    seen = []
    entry = move_to_trash(None, str(root), ckpt, now=now,
                          check=lambda fresh: seen.append(fresh.files) or None)
    assert any(f.relpath == "notes.txt" for f in seen[0])
    assert os.path.isfile(os.path.join(entry.path, "notes.txt"))


def test_a_directory_swapped_in_between_the_check_and_the_rename_is_put_back(tree):
    root, run, now = tree
    ckpt, d = planned(root, OLD), root / OLD

    def swap(_fresh):            # runs after the checks, right before the rename
        os.rename(d, run / "the-planned-one")
        copy_tree(run / "the-planned-one", d)

    with pytest.raises(MoveSkipped, match="put back"):
        move_to_trash(None, str(root), ckpt, now=now, check=swap)
    assert d.is_dir() and os.lstat(d).st_ino != ckpt.dir.ino
    assert os.lstat(run / "the-planned-one").st_ino == ckpt.dir.ino
    assert list_trash(str(run)) == []


def test_a_checkpoint_that_is_a_symlink_is_refused_and_neither_it_nor_its_target_moves(tree):
    root, run, now = tree
    ckpt = planned(root, OLD)
    elsewhere = root.parent / "elsewhere"
    os.rename(root / OLD, elsewhere)
    os.symlink(elsewhere, root / OLD)
    before = files_of(elsewhere)
    with pytest.raises(MoveSkipped, match="symlink"):
        move_to_trash(None, str(root), ckpt, now=now)
    assert os.path.islink(root / OLD) and files_of(elsewhere) == before
    assert not (run / TRASH_DIR).exists()


def test_a_trash_that_is_not_a_directory_fails_the_move_and_leaves_the_checkpoint(tree):
    root, run, now = tree
    ckpt = planned(root, OLD)
    (run / TRASH_DIR).write_text("")
    with pytest.raises(MoveFailed, match="not a directory") as info:
        move_to_trash(None, str(root), ckpt, now=now)
    assert info.value.entry is None and (root / OLD).is_dir()


def test_the_same_name_deleted_twice_in_one_second_gets_a_second_entry(tree):
    root, run, now = tree
    first = move_to_trash(None, str(root), planned(root, OLD), now=now)
    copy_tree(Path(first.path), root / OLD)        # a new checkpoint-2 (a re-run of the training)
    second = move_to_trash(None, str(root), planned(root, OLD), now=now + 0.5)
    assert second.name == first.name + "-1" and second.original_name == "checkpoint-2"
    assert [e.name for e in list_trash(str(run))] == [first.name, second.name]
    # both can come back, one at a time: the second finds the name taken
    assert restore(None, first.path) == str(root / OLD)
    with pytest.raises(RestoreFailed) as info:
        restore(None, second.path)
    assert second.path in str(info.value) and str(root / OLD) in str(info.value)
    assert os.path.isdir(second.path)


# --- list and purge -----------------------------------------------------------------------------

def test_bytes_count_hard_links_once_and_what_is_linked_from_outside_frees_nothing(tree):
    root, run, now = tree
    ckpt = planned(root, OLD)
    entry = move_to_trash(None, str(root), ckpt, now=now)
    inside = Path(entry.path)
    os.link(inside / "optimizer.pt", inside / "optimizer-again.pt")      # twice inside: counted once
    os.link(inside / "model.safetensors", run / "kept-outside.safetensors")
    model = os.lstat(inside / "model.safetensors").st_blocks * 512
    [listed] = list_trash(str(run))
    assert listed.allocated_bytes == entry.allocated_bytes
    assert listed.frees_bytes == entry.allocated_bytes - model

    result = purge(None, str(run), older_than_s=0, now=now)
    assert [e.name for e, _ in result.purged] == [entry.name] and result.ok
    assert result.freed_bytes == listed.frees_bytes
    assert (run / "kept-outside.safetensors").stat().st_size > 0


def test_purge_removes_only_what_is_older_than_the_grace_period_then_all_with_purge_now(tree):
    root, run, now = tree
    old = move_to_trash(None, str(root), planned(root, OLD), now=now - 8 * DAY)
    recent = move_to_trash(None, str(root), planned(root, NEW), now=now - 1 * DAY)
    stray = run / TRASH_DIR / "put-here-by-hand"
    stray.mkdir()
    result = purge(None, str(run), older_than_s=DEFAULT_PURGE_AFTER_S, now=now)
    assert [e.name for e, _ in result.purged] == [old.name]
    assert result.freed_bytes == old.frees_bytes > 0
    assert [e.name for e in result.waiting] == [recent.name]
    assert result.waiting_bytes == recent.frees_bytes
    assert len(result.warnings) == 1 and "put-here-by-hand" in result.warnings[0]
    assert not os.path.lexists(old.path) and os.path.isdir(recent.path) and stray.is_dir()

    result = purge(None, str(run), older_than_s=DEFAULT_PURGE_AFTER_S, now=now, purge_now=True)
    assert [e.name for e, _ in result.purged] == [recent.name]
    assert not os.path.lexists(recent.path) and stray.is_dir()


def test_an_emptied_trash_goes_and_the_run_directory_keeps_its_mtime(tree):
    root, run, now = tree
    move_to_trash(None, str(root), planned(root, OLD), now=now)
    run_mtime = mtime(run)
    assert purge(None, str(run), older_than_s=0, now=now).ok
    assert not os.path.lexists(run / TRASH_DIR) and mtime(run) == run_mtime
    assert purge(None, str(run), older_than_s=0, now=now) == purge(None, str(run), older_than_s=0, now=now)


def test_purge_never_follows_a_symlink(tree, tmp_path):
    root, run, now = tree
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    entry = move_to_trash(None, str(root), planned(root, OLD), now=now)
    os.symlink(outside, Path(entry.path) / "link-to-dir")
    os.symlink(outside / "precious", Path(entry.path) / "link-to-file")
    assert purge(None, str(run), older_than_s=0, now=now).ok
    assert not os.path.lexists(entry.path)
    assert (outside / "precious").read_text() == "keep me"

    # a trash replaced by a symlink is left alone, and so is what it points to
    os.symlink(outside, run / TRASH_DIR)
    (outside / "checkpoint-9.deleted-20200101T000000Z").mkdir()
    result = purge(None, str(run), older_than_s=0, now=now, purge_now=True)
    assert result.warnings and not result.purged
    assert (outside / "checkpoint-9.deleted-20200101T000000Z").is_dir()


# --- restore ------------------------------------------------------------------------------------

def test_restore_puts_the_checkpoint_back_whole_and_the_scan_sees_it_again(tree):
    root, run, now = tree
    ckpt = planned(root, OLD)
    before, run_mtime = files_of(root / OLD), mtime(run)
    entry = move_to_trash(None, str(root), ckpt, now=now)
    assert restore(None, entry.path) == str(root / OLD)
    assert files_of(root / OLD) == before and os.lstat(root / OLD).st_ino == ckpt.dir.ino
    assert mtime(run) == run_mtime
    assert planned(root, OLD).status == ckpt.status


def test_restore_refuses_what_is_not_a_whole_trash_entry(tree):
    root, run, now = tree
    with pytest.raises(NotATrashEntry, match="not in a run's trash"):
        restore(None, str(root / OLD))
    entry = move_to_trash(None, str(root), planned(root, OLD), now=now)
    partly = entry.path + PURGING_SUFFIX
    os.rename(entry.path, partly)
    with pytest.raises(NotATrashEntry, match="purge began"):
        restore(None, partly)
    odd = run / TRASH_DIR / "checkpoint-2.old"
    odd.mkdir()
    with pytest.raises(NotATrashEntry, match="not a name"):
        restore(None, str(odd))
    assert not (root / OLD).exists()


def test_the_restore_command_exit_codes_and_json(tree, capsys):
    root, run, now = tree
    entry = move_to_trash(None, str(root), planned(root, OLD), now=now)
    assert main(["restore", str(root / OLD)]) == 2                 # not a trash entry: nothing done
    assert os.path.isdir(entry.path)
    capsys.readouterr()
    assert main(["--json", "restore", entry.path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"restored": [{"from": entry.path, "to": str(root / OLD)}], "failed": 0}
    assert (root / OLD).is_dir()

    again = move_to_trash(None, str(root), planned(root, OLD), now=now)
    (root / OLD).mkdir()                                            # its name is taken
    assert main(["restore", again.path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and again.path in err[0] and str(root / OLD) in err[0]
    assert os.path.isdir(again.path)
    # the lock file the command left in the trash is no entry of it
    assert [e.name for e in list_trash(str(run))] == [again.name]


def test_restore_waits_for_a_prune_holding_the_roots_lock(tree, capsys):
    from ckpt_tools.locking import root_lock
    root, _run, now = tree
    entry = move_to_trash(None, str(root), planned(root, OLD), now=now)
    with root_lock([str(root)]):                    # as a running prune of the root holds it
        assert main(["restore", entry.path]) == 75
    assert "lock" in capsys.readouterr().err
    assert os.path.isdir(entry.path) and not (root / OLD).exists()
    assert main(["restore", entry.path]) == 0 and (root / OLD).is_dir()


def test_the_trash_and_the_restore_command_import_no_torch():
    code = ("import sys; import ckpt_tools.retention.trash, ckpt_tools.cli.restore; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    assert out.strip() == "[]"


# --- SIGKILL after each file operation ----------------------------------------------------------

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from faulty_fs import FaultyFileOps
from ckpt_tools import scanner
from ckpt_tools.retention import trash
spec, what, root, target, now = sys.argv[2:7]
fs = FaultyFileOps(spec)
if what == "move":
    checkpoints, _ = scanner.find_checkpoints(root)
    trash.move_to_trash(fs, root, next(c for c in checkpoints if c.path == target), now=float(now))
else:
    result = trash.purge(fs, target, older_than_s=0, now=float(now), purge_now=True)
    assert result.ok, result
print(json.dumps({"ops": fs.counts["after_op"]}))
"""
NEVER = 10 ** 9


def drive(spec: str, what: str, root: Path, target: str, now: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(TESTS), spec, what, str(root), target,
                           repr(now)], capture_output=True, text=True, cwd=REPO, timeout=120)


def operations(what: str, root: Path, target: str, now: float) -> int:
    """How many file operations an uninterrupted run makes (it runs, on this copy)."""
    proc = drive(f"after_op:{NEVER}", what, root, target, now)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["ops"]


def killed_after(k: int, what: str, root: Path, target: str, now: float) -> None:
    proc = drive(f"after_op:{k}", what, root, target, now)
    assert proc.returncode == -9, (k, proc.returncode, proc.stderr[-2000:])


def test_a_move_killed_after_any_of_its_operations_leaves_the_checkpoint_whole_in_one_place(
        results_tree, tmp_path):
    src, _, now = results_tree
    reference = copy_tree(src, tmp_path / "reference", only=(RUN,))
    n = operations("move", reference, OLD, now)
    assert n >= 3     # the trash made, the rename, the syncs
    failures = []
    for k in range(1, n + 1):
        root = copy_tree(src, tmp_path / f"kill-{k}", only=(RUN,))
        run, whole, other = root / RUN, files_of(root / OLD), files_of(root / NEW)
        killed_after(k, "move", root, OLD, now)
        entries = list_trash(str(run))
        places = [p for p in [root / OLD] + [Path(e.path) for e in entries] if p.exists()]
        if len(places) != 1 or files_of(places[0]) != whole:
            failures.append(f"kill {k}: the checkpoint is at {places}, not whole in one place")
        if files_of(root / NEW) != other:
            failures.append(f"kill {k}: the other checkpoint changed")
        scanned = {c.path for c in scan(str(root), min_age_s=0).checkpoints}
        if scanned != ({OLD, NEW} if (root / OLD).exists() else {NEW}):
            failures.append(f"kill {k}: the scan sees {sorted(scanned)}")
        # a re-run finishes with the uninterrupted result
        if (root / OLD).exists():
            move_to_trash(None, str(root), planned(root, OLD), now=now)
        final = list_trash(str(run))
        if [(e.original_name, files_of(Path(e.path))) for e in final] != [("checkpoint-2", whole)]:
            failures.append(f"kill {k}: after the re-run the trash holds {[e.name for e in final]}")
    assert not failures, failures


def test_a_purge_killed_after_any_of_its_operations_is_finished_by_the_next_purge(
        results_tree, tmp_path):
    src, _, now = results_tree
    reference = copy_tree(src, tmp_path / "reference", only=(RUN,))
    move_to_trash(None, str(reference), planned(reference, OLD), now=now - 30 * DAY)
    n = operations("purge", reference, str(reference / RUN), now)
    assert n > 10      # the mark, a sync, an unlink per file, an rmdir per directory
    assert not (reference / RUN / TRASH_DIR).exists()
    failures = []
    for k in range(1, n + 1):
        root = copy_tree(src, tmp_path / f"kill-{k}", only=(RUN,))
        run, other = root / RUN, files_of(root / NEW)
        entry = move_to_trash(None, str(root), planned(root, OLD), now=now - 30 * DAY)
        killed_after(k, "purge", root, str(run), now)
        left = list_trash(str(run))
        if [(e.original_name, e.purging) for e in left] not in ([], [("checkpoint-2", True)]):
            failures.append(f"kill {k}: the trash holds {[e.name for e in left]}")
        for e in left:
            try:
                restore(None, e.path)
                failures.append(f"kill {k}: a partly purged entry was restored")
            except NotATrashEntry:
                pass
        # the next purge finishes it, whatever the grace period
        result = purge(None, str(run), older_than_s=DEFAULT_PURGE_AFTER_S, now=now)
        if not result.ok or list_trash(str(run)) or os.path.lexists(entry.path):
            failures.append(f"kill {k}: the next purge left {[e.name for e in list_trash(str(run))]}")
        if files_of(root / NEW) != other or (root / OLD).exists():
            failures.append(f"kill {k}: the live checkpoints changed")
    assert not failures, failures
