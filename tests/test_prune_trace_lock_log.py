"""prune leaves no trace the Trainer reads, one lock guards a whole tree, and the files an
operator names (``--log``, ``--lock``) can neither hang a run nor lose what it did.

Issue 13: "What must hold" items 3, 4 and 8; red-team cases 9 (a FIFO ``--log`` / ``--lock``),
13 (a full log filesystem) and 16 (the Trainer's mtime rotation after a prune); the weak spot
"the lock is per root path".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fixtures.copying import copy_tree

import ckpt_tools.prune.execute as prune_exec
from ckpt_tools import plan_prune, scan
from ckpt_tools.prune import ActionLog, PruneEvent, Revalidator, execute_prune
from test_prune import ckpt_tools_exe, run_cli, small_root

HANG_GUARD_S = 300   # a run that hangs fails the test instead of the suite; never a timing assertion
DAY_NS = 86_400 * 10**9


def _mtimes(run: Path) -> dict[str, int]:
    """The mtime of each checkpoint directory: what the Trainer's rotation sorts by. (Their
    atimes move when a scan lists them, before any unlink: see docs/prune.md, Known limits.)"""
    return {p.name: os.lstat(p).st_mtime_ns for p in run.iterdir()}


# ------------------------------------------------------------------ the Trainer's rotation (item 3)

def _trainer_run(results_tree, where: Path) -> Path:
    """A root whose Trainer run has redundant checkpoints 2, 4, 6 saved two days ago, in that
    order (distinct directory mtimes, as successive saves leave them), and checkpoint-8 saved a
    minute ago (in progress for a 1 h --min-age: prune leaves it alone)."""
    root = small_root(results_tree, where, "run_trainer")
    run = root / "run_trainer"
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-6", symlinks=True)
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-8", symlinks=True)
    now_ns = time.time_ns()
    for dirpath, _, names in os.walk(run / "checkpoint-8"):
        for name in names:
            os.utime(os.path.join(dirpath, name), ns=(now_ns - 60 * 10**9,) * 2, follow_symlinks=False)
    saved = now_ns - 2 * DAY_NS
    for k, step in enumerate((2, 4, 6)):
        os.utime(run / f"checkpoint-{step}", ns=(saved + k * 10**9 * 600,) * 2)
    os.utime(run / "checkpoint-8", ns=(now_ns - 60 * 10**9,) * 2)
    return root


def _rotation(run: Path) -> tuple[list[str], list[str]]:
    """The Trainer's own choices on ``run``: its mtime order (oldest first), and what its
    rotation keeps with ``save_total_limit=2`` (on a copy: rotation deletes)."""
    from transformers.trainer_utils import rotate_checkpoints, sort_checkpoints

    order = [os.path.basename(p) for p in sort_checkpoints(str(run), use_mtime=True)]
    scratch = Path(tempfile.mkdtemp(dir=run.parent.parent))
    try:
        copy = scratch / run.name
        shutil.copytree(run, copy, symlinks=True)   # copystat keeps every directory's mtime
        rotate_checkpoints(str(copy), save_total_limit=2, use_mtime=True)
        kept = sorted(os.listdir(copy))
    finally:
        shutil.rmtree(scratch)
    return order, kept


@pytest.mark.parametrize("jobs", [1, 2], ids=["one-process", "two-workers"])
def test_the_trainers_rotation_chooses_the_same_after_a_prune(results_tree, tmp_path, monkeypatch,
                                                             forked, jobs):
    pruned = _trainer_run(results_tree, tmp_path / "pruned")
    untouched = _trainer_run(results_tree, tmp_path / "untouched")
    run = pruned / "run_trainer"
    before = _mtimes(run)
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)

    plan = plan_prune(scan(str(pruned), min_age_s=3600).checkpoints)
    result = execute_prune(plan, revalidate=Revalidator(min_age_s=3600), jobs=jobs)

    assert result.ok, result
    assert [d.path for d in result.deleted] == [f"run_trainer/checkpoint-{s}/model.safetensors"
                                                 for s in (2, 4, 6)]
    assert (len(forked) == 2) if jobs == 2 else (forked == [])
    assert _mtimes(run) == before
    expected = _rotation(untouched / "run_trainer")
    assert expected == (["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"],
                        ["checkpoint-6", "checkpoint-8"])
    assert _rotation(run) == expected


def test_the_command_leaves_the_checkpoint_directories_mtimes_as_they_were(results_tree, tmp_path):
    root = _trainer_run(results_tree, tmp_path)
    run = root / "run_trainer"
    before = _mtimes(run)
    proc = run_cli("prune", "--yes", "--no-progress", root, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert not (run / "checkpoint-6/model.safetensors").exists()
    assert _mtimes(run) == before


def _execute_as_nobody(plan) -> dict:
    """``execute_prune(plan)`` in a forked child whose effective user is ``nobody`` (the
    interpreter may live where nobody can run it, so no new process: a fork)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        code = 1
        try:
            os.close(r)
            os.setegid(65534)
            os.seteuid(65534)
            result = execute_prune(plan, revalidate=Revalidator(min_age_s=3600))
            os.write(w, json.dumps(result.to_dict()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_directory_whose_times_cannot_be_restored_keeps_its_merged_weights(results_tree):
    """A user who may delete from a checkpoint but not set its directory's times (not its
    owner) would leave the directory looking newest: prune refuses that checkpoint."""
    base = Path(tempfile.mkdtemp(prefix="ckpt-tools-nobody-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        root = copy_tree(results_tree[0], base / "results", only=("run_trainer",))
        for dirpath, _, names in os.walk(root):
            os.chmod(dirpath, 0o777)      # root's directories, writable by all: unlink allowed, utime not
            for name in names:
                os.chmod(os.path.join(dirpath, name), 0o644)
        run = root / "run_trainer"
        before = _mtimes(run)
        plan = plan_prune(scan(str(root), min_age_s=3600).checkpoints)
        assert len(plan.deletions) == 2

        result = _execute_as_nobody(plan)

        assert result["deleted"] == [] and len(result["failed"]) == 2, result
        assert all("modification time" in f["reason"] for f in result["failed"]), result
        assert (run / "checkpoint-2/model.safetensors").exists()
        assert (run / "checkpoint-4/model.safetensors").exists()
        assert _mtimes(run) == before
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------ one lock per tree (item 4)

HOLD_TREE = textwrap.dedent("""
    import sys
    from ckpt_tools.locking import root_lock
    with root_lock([sys.argv[1]], exclusive=sys.argv[2] == "exclusive"):
        print("locked", flush=True)
        sys.stdin.read()          # hold until the test closes our stdin
""")


class TreeHolder:
    """Another process holding the ckpt-tools lock of a root, as a running prune (or, shared,
    a dry run) does: started, then waited for until it says it holds the lock."""

    def __init__(self, root, mode: str = "exclusive", cwd=None):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_TREE, str(root), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        line = self.proc.stdout.readline().strip()
        assert line == "locked", self.proc.stderr.read()

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=HANG_GUARD_S)


@pytest.fixture
def hold():
    held: list[TreeHolder] = []

    def start(root, mode="exclusive", cwd=None) -> TreeHolder:
        h = TreeHolder(root, mode, cwd)
        held.append(h)
        return h

    yield start
    for h in held:
        h.release()


@pytest.fixture
def tree(results_tree, tmp_path):
    """``(root, run)``: a root holding the Trainer run, and a symlink to each outside it."""
    root = small_root(results_tree, tmp_path, "run_trainer")
    os.symlink(root, tmp_path / "root-link")
    os.symlink(root / "run_trainer", tmp_path / "run-link")
    return root, root / "run_trainer"


MERGED = "run_trainer/checkpoint-2/model.safetensors"


def _spellings(tmp_path: Path, target: Path) -> dict[str, tuple[str, Path]]:
    """Ways to name ``target`` on the command line: (argument, working directory)."""
    root = tmp_path / "results"
    rel = os.path.relpath(target, root)
    link = tmp_path / ("root-link" if target == root else "run-link")
    return {
        "absolute": (str(target), tmp_path),
        "relative": (rel if rel != "." else ".", root),
        "dotted": (str(root / "." / "run_trainer" / ".." / rel) + "/", tmp_path),
        "symlink": (str(link), tmp_path),
    }


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dotted", "symlink"])
@pytest.mark.parametrize("held", ["root", "run"])
def test_overlapping_roots_exclude_each_other(tree, tmp_path, hold, held, spelling):
    root, run = tree
    holder_root, other = (root, run) if held == "root" else (run, root)
    arg, cwd = _spellings(tmp_path, other)[spelling]
    h = hold(holder_root)
    proc = subprocess.run([ckpt_tools_exe(), "prune", "--yes", "--no-progress", arg], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 75, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{root} " in proc.stderr   # where the two trees meet
    assert (root / MERGED).exists()

    h.release()
    proc = subprocess.run([ckpt_tools_exe(), "prune", "--yes", "--no-progress", arg], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert not (root / MERGED).exists()


@pytest.mark.parametrize("spelling", ["relative", "symlink"])
def test_the_holder_may_name_its_root_any_way_too(tree, tmp_path, hold, spelling):
    root, run = tree
    arg, cwd = _spellings(tmp_path, run)[spelling]
    hold(arg, cwd=cwd)
    assert run_cli("prune", "--yes", root, timeout=HANG_GUARD_S).returncode == 75
    assert (root / MERGED).exists()


def test_a_dry_run_below_a_running_prune_waits_for_it(tree, hold):
    root, run = tree
    hold(root)
    assert run_cli("prune", "--dry-run", run, timeout=HANG_GUARD_S).returncode == 75


def test_an_explicit_lock_file_does_not_let_overlapping_trees_run_together(tree, tmp_path, hold):
    root, run = tree
    hold(run)
    proc = run_cli("prune", "--yes", "--lock", tmp_path / "team.lock", root, timeout=HANG_GUARD_S)
    assert proc.returncode == 75, proc.stderr
    assert (root / MERGED).exists()


def test_sibling_roots_and_shared_holders_do_not_exclude_each_other(results_tree, tmp_path, hold):
    root = small_root(results_tree, tmp_path, "run_trainer", "seed_v3")
    hold(root / "seed_v3")              # a prune of a sibling
    hold(root, mode="shared")           # a dry run of the whole tree
    proc = run_cli("prune", "--dry-run", root / "run_trainer", timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr


def test_a_sibling_prune_runs_while_another_holds_its_neighbour(results_tree, tmp_path, hold):
    root = small_root(results_tree, tmp_path, "run_trainer", "seed_v3")
    hold(root / "seed_v3")
    proc = run_cli("prune", "--yes", root / "run_trainer", timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert not (root / MERGED).exists()


def test_root_lock_of_overlapping_roots_in_one_call_does_not_block_itself(tmp_path):
    from ckpt_tools.locking import root_lock

    (tmp_path / "run").mkdir()
    with root_lock([str(tmp_path), str(tmp_path / "run")], timeout=0) as held:
        assert len(held) == 2
    with root_lock([str(tmp_path)], timeout=0, shared_roots=[str(tmp_path / "run")]):
        pass


@pytest.mark.parametrize("bad", ["nan", "inf", "-1"])
def test_root_lock_refuses_a_timeout_that_is_not_a_finite_duration(tmp_path, bad):
    from ckpt_tools.locking import root_lock

    with pytest.raises(ValueError):
        with root_lock([str(tmp_path)], timeout=float(bad)):
            pass


# ------------------------------------------------------------------ --log and --lock that are not files (case 9)

@contextlib.contextmanager
def _special(kind: str, path: Path):
    """A FIFO, a listening Unix socket or a device node at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
        yield str(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
            s.listen()
            yield str(path)
        finally:
            s.close()
    else:
        yield "/dev/zero"


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("option", ["--log", "--lock"])
@pytest.mark.parametrize("mode", ["--yes", "--dry-run"])
def test_a_log_or_lock_that_is_not_a_regular_file_is_refused(results_tree, tmp_path, kind, option, mode):
    root = small_root(results_tree, tmp_path, "run_trainer")
    with _special(kind, tmp_path / f"special-{kind}") as path:
        proc = run_cli("prune", mode, option, path, root, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "not a regular file" in lines[0], proc.stderr
    assert (root / MERGED).exists()


# ------------------------------------------------------------------ a failing log (item 8, case 13)

def _log_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"a cut last line: {data[-80:]!r}"
    return [json.loads(x) for x in data.decode().splitlines()]


class FailingWrite:
    """``os.write`` for an ``ActionLog`` that fails on the first line matching ``when``:
    ``short`` writes half the line (as a full disk does), else raises ``OSError(error)``."""

    def __init__(self, when, *, short: bool = False, error: int = errno.EIO):
        self.when, self.short, self.error = when, short, error

    def __call__(self, fd: int, data: bytes) -> int:
        record = json.loads(data)
        if self.when(record):
            self.when = lambda _: False
            if self.short:
                return os.write(fd, data[: len(data) // 2])
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)


def _deleted_on(root: Path, step: int) -> bool:
    return not (root / f"run_trainer/checkpoint-{step}/model.safetensors").exists()


@pytest.mark.parametrize("short", [True, False], ids=["short-write", "eio"])
def test_a_failing_log_line_stops_at_the_checkpoint_boundary(results_tree, tmp_path, short):
    root = _trainer_run(results_tree, tmp_path)
    plan = plan_prune(scan(str(root), min_age_s=3600).checkpoints)
    log_path = tmp_path / "prune.jsonl"
    log_path.write_text('{"earlier": "run"}\n')
    fail = FailingWrite(lambda r: r["action"] == "delete" and "checkpoint-2" in r["path"], short=short)
    with ActionLog(str(log_path), write=fail) as log:
        prune_exec.emit_plan(plan, log=log)
        result = execute_prune(plan, revalidate=Revalidator(min_age_s=3600), log=log)

    assert _deleted_on(root, 2) and not _deleted_on(root, 4) and not _deleted_on(root, 6)
    assert not result.ok
    assert str(log_path) in result.log_error
    cause = "the filesystem took only part of a line" if short else "Input/output error"
    assert result.log_error == f"cannot write log {log_path}: {cause}"
    assert [d.path for d in result.deleted] == ["run_trainer/checkpoint-2/model.safetensors"]
    assert [d.path for d in result.unlogged] == ["run_trainer/checkpoint-2/model.safetensors"]
    assert [s.path for s in result.stopped] == [f"run_trainer/checkpoint-{s}/model.safetensors"
                                                for s in (4, 6)]
    lines = _log_lines(log_path)
    assert lines[0] == {"earlier": "run"}
    assert [x["action"] for x in lines[1:]] == ["skip", "plan", "plan", "plan"]  # checkpoint-8 skipped


def test_a_log_failing_in_a_worker_stops_the_other_workers_too(results_tree, tmp_path, monkeypatch, forked):
    root = small_root(results_tree, tmp_path, "run_trainer")
    run = root / "run_trainer"
    for step in range(6, 26, 2):
        shutil.copytree(run / "checkpoint-4", run / f"checkpoint-{step}", symlinks=True)
    plan = plan_prune(scan(str(root), min_age_s=3600).checkpoints)
    assert len(plan.deletions) == 12
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    log_path = tmp_path / "prune.jsonl"
    fail = FailingWrite(lambda r: r["action"] == "delete", short=True)   # each worker's first line
    with ActionLog(str(log_path), write=fail) as log:
        result = execute_prune(plan, revalidate=Revalidator(min_age_s=3600), log=log, jobs=2)
    assert len(forked) == 2
    deleted = {d.path for d in result.deleted}
    # each worker deletes at most its checkpoint in flight once the log has failed
    assert 1 <= len(deleted) <= 2
    assert {p for p in deleted if not (root / p).exists()} == deleted
    assert all((root / d.path).exists() for d in plan.deletions if d.path not in deleted)
    logged = {os.path.relpath(x["path"], root) for x in _log_lines(log_path) if x["action"] == "delete"}
    assert logged | {d.path for d in result.unlogged} == deleted
    assert len(result.stopped) == 12 - len(deleted)
    assert result.log_error and not result.ok


def test_a_short_write_is_taken_back_when_nobody_wrote_after_it(tmp_path):
    from ckpt_tools.prune import LogWriteError

    log_path = tmp_path / "prune.jsonl"
    log_path.write_text('{"earlier": "run"}\n')
    fail = FailingWrite(lambda r: True, short=True)
    event = PruneEvent("plan", str(tmp_path), "a/model.safetensors", 1)
    with ActionLog(str(log_path), write=fail) as log:
        with pytest.raises(LogWriteError) as exc:
            log.record(event)
        with pytest.raises(LogWriteError):
            log.record(event)   # a log that failed takes no more lines
    assert str(log_path) in str(exc.value)
    assert log_path.read_text() == '{"earlier": "run"}\n'


@pytest.fixture
def tiny_fs(tmp_path):
    """A 16 KiB tmpfs of which one page is left for the log; skipped where it cannot be mounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                                 capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (mnt / "filler").write_bytes(b"\0" * 12288)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def test_a_full_log_filesystem_stops_the_run_with_one_clear_error(results_tree, tmp_path, tiny_fs):
    root = _trainer_run(results_tree, tmp_path)
    # room for the start record and the lines of the plan and not one more, measured on a dry
    # run ("dry_run": true, one byte shorter per line than the real run's "dry_run": false)
    # whose argv has the real run's length: -n for -y, a log path as long as the real one
    probe = tmp_path / "tinx" / "prune.jsonl"
    log_path = tiny_fs / "prune.jsonl"
    assert len(str(probe)) == len(str(log_path))
    assert run_cli("prune", "-n", "--no-progress", "--log", probe, root,
                   timeout=HANG_GUARD_S).returncode == 0
    planned = [x for x in probe.read_bytes().splitlines() if json.loads(x)["action"] != "end"]
    plan_bytes = sum(len(x) + 2 for x in planned)
    log_path.write_bytes(b"#" * (4096 - plan_bytes - 40 - 1) + b"\n")    # a page, nearly full

    proc = run_cli("prune", "-y", "--no-progress", "--log", log_path, root, timeout=HANG_GUARD_S)

    assert proc.returncode == 1, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("ckpt-tools: error:")]
    assert errors == [f"ckpt-tools: error: cannot write log {log_path}: No space left on device"]
    assert _deleted_on(root, 2) and not _deleted_on(root, 4) and not _deleted_on(root, 6)
    assert str(root / "run_trainer/checkpoint-2/model.safetensors") in proc.stderr   # unlogged, reported
    data = log_path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.decode().splitlines()[1:]
    # a log that failed mid-run gets no end record
    assert [json.loads(x)["action"] for x in lines] == ["start", "plan", "plan", "plan"]


def test_a_log_full_before_the_plan_deletes_nothing(results_tree, tmp_path, tiny_fs):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log_path = tiny_fs / "prune.jsonl"
    log_path.write_bytes(b"#" * 4000 + b"\n")
    proc = run_cli("prune", "--yes", "--no-progress", "--log", log_path, root, timeout=HANG_GUARD_S)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ckpt-tools: error: cannot write log {log_path}: No space left on device"]
    assert (root / MERGED).exists()
    assert log_path.read_bytes() == b"#" * 4000 + b"\n"
