"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# The fixture builders live in the repository's top-level ``fixtures`` package, not in ckpt_tools.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    from scorecard import FUZZ_MARKER, FuzzCounter

    config.addinivalue_line("markers", f"{FUZZ_MARKER}: a hypothesis property test whose examples "
                                       "the scorecard counts (scenario 8)")
    config.pluginmanager.register(FuzzCounter(), "ckpt-tools-fuzz-counter")


@pytest.fixture(scope="session")
def results_tree(tmp_path_factory):
    """The fixture results tree, built once per session: ``(root, manifest, now)``.

    ``now`` is taken once, at session start, and every file's mtime is set relative to it
    (``now - 2 days``; ``manifest.young_files`` at ``now - 60 s``). Pass it to the library's
    ``now`` parameters; the CLI's real clock agrees with it for the rest of the session
    (the young checkpoint stays younger than a 1 h ``--min-age`` for 59 minutes).
    Tests must not modify this tree: copy it first (``shutil.copytree(root, ..., symlinks=True)``).
    """
    from fixtures import build_results_tree

    base = tmp_path_factory.mktemp("fixture-tree")
    root = base / "results"
    now = float(int(time.time()))
    manifest = build_results_tree(root, now=now)
    return root, manifest, now


@pytest.fixture
def make_results_tree(tmp_path):
    """Factory for a private, mutable copy of the tree (≈3 s each): ``make_results_tree(now=None)``
    returns ``(root, manifest, now)``. Use it for tests that prune, chmod or otherwise change files."""
    from fixtures import build_results_tree

    def make(now: float | None = None):
        now = float(int(time.time())) if now is None else now
        root = tmp_path / "results"
        return root, build_results_tree(root, now=now), now

    return make


@pytest.fixture(scope="session")
def undisturbed_migration(results_tree, tmp_path_factory):
    """Factory: ``undisturbed_migration(name, runs)`` copies ``runs`` of the fixture tree into a
    new directory ``name`` and migrates them once through the CLI; returns (that directory,
    ``reliability.ReferenceMigration``)."""
    from reliability import reference_migration

    def make(name: str, runs: tuple[str, ...]):
        base = tmp_path_factory.mktemp(name)
        return base, reference_migration(results_tree[0], base, runs)

    return make


@pytest.fixture
def private_unlistable(monkeypatch):
    """The scanner's listing of a directory whose name ends in ``private`` fails with EACCES,
    as it does for a user without read permission there (root could list it)."""
    from ckpt_tools import scanner

    real = scanner._list

    def deny(path):
        if path.endswith("private"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(scanner, "_list", deny)


@pytest.fixture
def forked(monkeypatch):
    """The pids of the processes the test forks; at the end, none of them may be left."""
    pids = []
    real = os.fork

    def fork():
        pid = real()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    yield pids
    monkeypatch.undo()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already


@pytest.fixture(scope="session")
def ordinary_runs(tmp_path_factory):
    """Ordinary Trainer runs (PEFT adapters, full and sharded fine-tunes, best-model tracking,
    DeepSpeed/FSDP layouts, damaged copies), built once per session: ``(root, manifest)``, the
    manifest ``{relative path: fixtures.ordinary_runs.OrdinaryCheckpoint}``. Tests must not modify
    this tree: copy what they change first."""
    from fixtures.ordinary_runs import build_ordinary_runs

    root = tmp_path_factory.mktemp("ordinary") / "runs"
    return root, build_ordinary_runs(root)
