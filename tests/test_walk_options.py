"""--exclude GLOB and --one-file-system on every command that walks a tree (audit, validate,
prune, migrate), through the command line: what is left out is neither reported nor touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.copying import copy_tree

from ckpt_tools import api
from ckpt_tools.cli import cli

RUN = "run_trainer"   # two redundant checkpoints: prune deletes their model.safetensors
CHECKPOINTS = ("checkpoint-2", "checkpoint-4")


def _copy_run(results_tree, dst: Path) -> None:
    copy_tree(results_tree[0], dst, only=(RUN,))


@pytest.fixture
def tree(results_tree, tmp_path):
    """A root holding the Trainer run three times: at the top, in ``scratch/`` and in
    ``old.bak/``."""
    root = tmp_path / "root"
    _copy_run(results_tree, root)
    _copy_run(results_tree, root / "scratch")
    _copy_run(results_tree, root / "old.bak")
    return root


def _paths(prefix: str) -> set[str]:
    return {f"{prefix}{RUN}/{c}" for c in CHECKPOINTS}


EVERYTHING = _paths("") | _paths("scratch/") | _paths("old.bak/")


def invoke(*args: str):
    return CliRunner().invoke(cli, [*args, "--no-progress"], catch_exceptions=False)


def audited(*args: str) -> set[str]:
    res = invoke("audit", "--json", *args)
    assert res.exit_code == 0, res.output
    return {c["path"] for c in json.loads(res.stdout)["checkpoints"]}


def validated(*args: str) -> set[str]:
    res = invoke("validate", "--json", *args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    return {c["path"] for c in doc["checkpoints"]}


def migrate_sources(src: Path, dst: Path, *args: str) -> set[str]:
    res = invoke("migrate", "--dry-run", "--json", str(src), str(dst), *args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    return {i["source"] for i in doc["planned"] + doc["skipped"]}


def merged_files(root: Path, prefix: str) -> list[Path]:
    return [root / f"{prefix}{RUN}" / c / "model.safetensors" for c in CHECKPOINTS]


@pytest.mark.parametrize("patterns, left_out", [
    (("scratch",), _paths("scratch/")),                                  # a directory by name
    (("scratch/run_trainer",), _paths("scratch/")),                      # a nested directory by path
    (("./scratch/",), _paths("scratch/")),                               # written as a path to a dir
    (("*.bak",), _paths("old.bak/")),                                    # a glob on the name
    (("*.bak", "scratch"), _paths("old.bak/") | _paths("scratch/")),     # repeated
    ((RUN,), EVERYTHING),                                                # a run, wherever it lies
    (("old.bak/*/checkpoint-2",), {f"old.bak/{RUN}/checkpoint-2"}),      # one checkpoint
    (("Scratch",), set()),                                               # case-sensitive
], ids=["name", "nested-path", "dot-slash", "glob", "repeated", "run", "checkpoint", "case"])
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_audit_leaves_out_what_exclude_matches(tree, monkeypatch, patterns, left_out, jobs):
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)   # --jobs 2: forked workers even here
    assert audited(str(tree), "--jobs", jobs) == EVERYTHING
    excludes = [a for p in patterns for a in ("--exclude", p)]
    assert audited(str(tree), "--jobs", jobs, *excludes) == EVERYTHING - left_out


def test_a_root_is_never_excluded_by_its_own_name(tree):
    assert audited(str(tree / "scratch"), "--exclude", "scratch") == _paths("")
    assert audited(str(tree / RUN / "checkpoint-2"), "--exclude", "checkpoint-*") == {"."}


def test_validate_leaves_out_what_exclude_matches(tree):
    assert validated(str(tree), "--exclude", "scratch", "--exclude", "*.bak") == _paths("")


def test_migrate_plans_nothing_under_an_excluded_directory(tree, tmp_path):
    dst = tmp_path / "migrated"
    assert migrate_sources(tree, dst) == EVERYTHING
    assert migrate_sources(tree, dst, "--exclude", "scratch", "--exclude", "*.bak") == _paths("")


def test_prune_never_deletes_under_an_excluded_path(tree):
    res = invoke("prune", "--yes", str(tree), "--exclude", "scratch", "--exclude", "old.*")
    assert res.exit_code == 0, res.output
    assert not any(f.exists() for f in merged_files(tree, ""))
    assert all(f.exists() for f in merged_files(tree, "scratch/") + merged_files(tree, "old.bak/"))


# ------------------------------------------------------------------ --one-file-system

@pytest.fixture
def mounted(tree):
    """``tree`` with a tmpfs mounted at ``mnt/`` holding a fourth copy of the run; root only."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tree / "mnt"
    mnt.mkdir()
    name = f"ckpt-tools-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", name, str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        assert os.stat(mnt).st_dev != os.stat(tree).st_dev
        yield tree
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def mounted_run(mounted, results_tree):
    _copy_run(results_tree, mounted / "mnt")
    return mounted


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_audit_does_not_cross_a_mount_point(mounted_run, monkeypatch, jobs):
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)
    assert audited(str(mounted_run), "--jobs", jobs) == EVERYTHING | _paths("mnt/")
    assert audited(str(mounted_run), "--jobs", jobs, "--one-file-system") == EVERYTHING
    # a root on the other file system is walked: only what lies below it is compared with it
    assert audited(str(mounted_run / "mnt"), "-x") == _paths("")


def test_validate_does_not_cross_a_mount_point(mounted_run):
    assert validated(str(mounted_run), "-x") == EVERYTHING


def test_migrate_does_not_cross_a_mount_point(mounted_run, tmp_path):
    dst = tmp_path / "migrated"
    assert migrate_sources(mounted_run, dst) == EVERYTHING | _paths("mnt/")
    assert migrate_sources(mounted_run, dst, "--one-file-system") == EVERYTHING


def test_prune_never_deletes_on_another_file_system(mounted_run):
    res = invoke("prune", "--yes", "--one-file-system", str(mounted_run))
    assert res.exit_code == 0, res.output
    assert not any(f.exists() for f in merged_files(mounted_run, "scratch/"))
    assert all(f.exists() for f in merged_files(mounted_run, "mnt/"))


def test_help_of_every_walking_command_names_the_options():
    for command in ("audit", "validate", "prune", "migrate"):
        res = CliRunner().invoke(cli, [command, "--help"])
        assert res.exit_code == 0
        assert "--one-file-system" in res.output and "--exclude GLOB" in res.output
