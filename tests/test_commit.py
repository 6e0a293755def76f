"""The file-operations seam (ckpt_tools.fs) and the commit protocol (ckpt_tools.commit), on their
own: what is on disk after a commit, after each kind of failure, and on storage without rename."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_tools import commit, layout
from ckpt_tools.fs import LocalFileOps, SyncError, fsync_tree, remove_tree
from faulty_fs import FaultyFileOps

REPO = Path(__file__).resolve().parents[1]


def write_two(tmp: str, fs=None) -> None:
    fs = fs or LocalFileOps()
    fs.makedirs(os.path.join(tmp, "sub"))
    fs.write_bytes(os.path.join(tmp, "a.txt"), b"a")
    fs.write_bytes(os.path.join(tmp, "sub", "b.txt"), b"b")


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- RenameCommit ---------------------------------------------------------------------------------

def test_rename_commit_puts_the_whole_directory_in_place_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "run" / "checkpoint-1"
    staging = commit.RenameCommit(str(final))
    commit.commit(staging, write_two)
    assert listing(tmp_path) == ["run", "run/checkpoint-1", "run/checkpoint-1/a.txt",
                                 "run/checkpoint-1/sub", "run/checkpoint-1/sub/b.txt"]


def test_a_failed_validation_rolls_back_and_leaves_nothing(tmp_path):
    final = tmp_path / "checkpoint-1"

    def refuse(path: str) -> None:
        assert os.path.exists(os.path.join(path, "sub", "b.txt"))   # validated before the rename
        raise ValueError("does not validate")

    with pytest.raises(ValueError):
        commit.commit(commit.RenameCommit(str(final)), write_two, validate=refuse)
    assert listing(tmp_path) == []


def test_replace_parks_the_old_version_and_cleanup_removes_it(tmp_path):
    final = tmp_path / "checkpoint-1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = commit.RenameCommit(str(final), replace=True)
    commit.commit(staging, write_two)
    assert staging.parked is not None and os.path.isdir(staging.parked)
    assert staging.cleanup() is None
    assert listing(tmp_path) == ["checkpoint-1", "checkpoint-1/a.txt", "checkpoint-1/sub",
                                 "checkpoint-1/sub/b.txt"]


def test_a_failed_parent_fsync_after_the_rename_puts_the_old_version_back(tmp_path):
    final = tmp_path / "checkpoint-1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    # fsyncs: a.txt, sub/b.txt, sub, the staging dir, the parent (before), the parent (after)
    fs = FaultyFileOps("eio@fsync:6")
    staging = commit.RenameCommit(str(final), fs, replace=True)
    with pytest.raises(SyncError) as info:
        commit.commit(staging, lambda tmp: write_two(tmp, fs))
    assert info.value.errno == errno.EIO and info.value.filename == str(tmp_path)
    assert info.value.directory
    assert listing(tmp_path) == ["checkpoint-1", "checkpoint-1/old.txt"]


def test_fsync_tree_syncs_every_file_and_directory_and_names_what_failed(tmp_path):
    write_two(str(tmp_path))
    synced = []

    class Recording(LocalFileOps):
        def fsync(self, path, *, directory=False):
            synced.append((os.path.relpath(path, tmp_path), directory))
            super().fsync(path, directory=directory)

    fsync_tree(str(tmp_path), Recording())
    assert sorted(synced) == [(".", True), ("a.txt", False), ("sub", True), ("sub/b.txt", False)]
    assert synced.index(("sub/b.txt", False)) < synced.index(("sub", True)) < synced.index((".", True))
    with pytest.raises(SyncError) as info:
        fsync_tree(str(tmp_path), FaultyFileOps("enospc@fsync:1"))
    assert info.value.errno == errno.ENOSPC and os.path.exists(info.value.filename)


def test_remove_tree_goes_on_past_an_error_and_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    write_two(str(tree))
    (tree / "link").symlink_to(outside, target_is_directory=True)
    error = remove_tree(str(tree), FaultyFileOps("eio@remove:1"))
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert tree.exists()
    assert remove_tree(str(tree)) is None and not tree.exists()
    assert (outside / "keep.txt").read_text() == "keep"


def test_remove_stale_removes_the_temporaries_of_a_dead_run_only(tmp_path):
    for name in (".ckpt-tools-tmp-checkpoint-1-999", ".ckpt-tools-old-checkpoint-2-999", "checkpoint-3"):
        write_two(str(tmp_path / name))
    assert all(commit.is_temporary(n) for n in (".ckpt-tools-tmp-checkpoint-1-999",
                                                 ".ckpt-tools-old-checkpoint-2-999"))
    removed = commit.remove_stale(str(tmp_path), (layout.MIGRATE_TMP_PREFIX, layout.MIGRATE_OLD_PREFIX))
    assert len(removed) == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]


# --- EntriesCommit --------------------------------------------------------------------------------

def test_entries_commit_replaces_its_entries_and_touches_nothing_else(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "sub" / "stale.txt").write_text("stale")
    (ckpt / "optimizer.pt").write_text("mine")
    (ckpt / "a.txt").write_text("old a")
    staging = commit.EntriesCommit(str(ckpt), ("sub", "a.txt"), tmp_prefix=layout.PEFT_TREE_TMP_PREFIX)
    commit.commit(staging, write_two)
    assert staging.cleanup() is None
    assert listing(ckpt) == ["a.txt", "optimizer.pt", "sub", "sub/b.txt"]
    assert (ckpt / "a.txt").read_text() == "a" and (ckpt / "optimizer.pt").read_text() == "mine"


def test_entries_commit_that_fails_to_write_leaves_the_directory_as_it_was(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "a.txt").write_text("old a")
    fs = FaultyFileOps("enospc@write:2")
    with pytest.raises(OSError):
        commit.commit(commit.EntriesCommit(str(ckpt), ("sub", "a.txt"), fs), lambda t: write_two(t, fs))
    assert listing(ckpt) == ["a.txt"] and (ckpt / "a.txt").read_text() == "old a"


# --- MarkerCommit: storage that cannot rename ------------------------------------------------------

class NoRenameFileOps(LocalFileOps):
    """Object storage, as far as committing goes: no rename, fsync means nothing."""

    atomic_rename = False
    durable_fsync = False

    def __init__(self):
        self.fsyncs = 0

    def rename(self, src, dst):
        raise AssertionError("this storage has no rename")

    def fsync(self, path, *, directory=False):
        self.fsyncs += 1


def test_storage_without_rename_commits_with_a_marker_written_last(tmp_path):
    fs = NoRenameFileOps()
    final = tmp_path / "checkpoint-1"
    seen = {}

    def check(path: str) -> None:   # validation sees the files in place, not yet committed
        seen["committed_at_validation"] = commit.is_committed(path, fs)

    staging = commit.staging_for(str(final), fs)
    assert isinstance(staging, commit.MarkerCommit)
    commit.commit(staging, lambda t: write_two(t, fs), validate=check)
    assert seen == {"committed_at_validation": False}
    assert commit.is_committed(str(final), fs)
    assert listing(final) == [commit.COMMIT_MARKER, "a.txt", "sub", "sub/b.txt"]
    assert fs.fsyncs == 0            # not durable: fsync is not asked for
    with pytest.raises(FileExistsError):
        commit.commit(commit.staging_for(str(final), fs), lambda t: write_two(t, fs))
    with pytest.raises(NotImplementedError):
        commit.staging_for(str(final), fs, replace=True)


def test_without_rename_a_failure_leaves_no_marker_and_a_rerun_redoes_it(tmp_path):
    fs = NoRenameFileOps()
    final = tmp_path / "checkpoint-1"
    final.mkdir()
    (final / "half.txt").write_text("from a killed run")      # no marker: in progress
    assert not commit.is_committed(str(final), fs)

    def refuse(path: str) -> None:
        raise ValueError("does not validate")

    with pytest.raises(ValueError):
        commit.commit(commit.MarkerCommit(str(final), fs), lambda t: write_two(t, fs), validate=refuse)
    assert not final.exists()
    commit.commit(commit.MarkerCommit(str(final), fs), lambda t: write_two(t, fs))
    assert commit.is_committed(str(final), fs) and "half.txt" not in os.listdir(final)


# --- no fault from the environment ----------------------------------------------------------------

def test_ckpt_tools_fault_in_the_environment_changes_nothing(results_tree, tmp_path):
    """A real migrate and a real prune, run with CKPT_TOOLS_FAULT set to what used to kill the
    library or cut its files, finish as without it."""
    from fixtures.copying import copy_tree
    root, _, _ = results_tree
    src = copy_tree(root / "legacy_v1" / "checkpoint-100", tmp_path / "src" / "checkpoint-100")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CKPT_TOOLS_FAULT="after_write:1,enospc@write:1,eio@fsync:1,after_unlink:1")
    cli = [sys.executable, "-m", "ckpt_tools.cli"]
    mig = subprocess.run([*cli, "migrate", str(src.parent), str(tmp_path / "dst"), "--min-age", "0",
                          "--json", "--no-progress"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert mig.returncode == 0, mig.stderr[-2000:]
    doc = json.loads(mig.stdout)
    assert [m["target"] for m in doc["migrated"]] == ["checkpoint-100"] and not doc["failed"]
    run = copy_tree(root / "run_trainer", tmp_path / "prune" / "run_trainer")
    pr = subprocess.run([*cli, "prune", "--yes", "--min-age", "0", "--json", "--no-progress",
                         str(run)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert pr.returncode == 0, pr.stderr[-2000:]
    doc = json.loads(pr.stdout)
    assert doc["deleted"] and doc["freed_bytes"] > 0
    assert all(not (run / d["path"]).exists() for d in doc["deleted"])
