"""prune against other processes: a run holding the lock, and a trainer writing a checkpoint."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ckpt_tools.locking import LockError, LockHeld, lock_path_for, root_lock
from test_prune import LOCK_NAME, ckpt_tools_exe, listing, run_cli, small_root

HANG_GUARD_S = 120     # only a guard against a hang: nothing below waits for time to pass


def wait_until(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition()`` until it is true; fail if ``proc`` exits first or after HANG_GUARD_S."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}: {(err or '')[-600:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {HANG_GUARD_S} s (hang guard)")
        time.sleep(0.01)


def has_open(pid: int, path) -> bool:
    """Whether process ``pid`` holds a file descriptor of ``path`` (the same inode) open."""
    target = os.stat(path)
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            st = os.stat(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


HOLD = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()          # hold until the test closes our stdin
""")


class Holder:
    """Another process holding the ckpt-tools lock exclusively, as a running prune would."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def holder():
    held = []

    def hold(path):
        h = Holder(path)
        held.append(h)
        return h

    yield hold
    for h in held:
        h.release()


def test_a_second_prune_exits_75_while_the_lock_is_held(results_tree, tmp_path, holder):
    root = small_root(results_tree, tmp_path, "run_trainer")
    merged = root / "run_trainer/checkpoint-2/model.safetensors"
    h = holder(root / LOCK_NAME)

    proc = run_cli("prune", "--yes", root)
    assert proc.returncode == 75
    assert len(proc.stderr.strip().splitlines()) == 1 and LOCK_NAME in proc.stderr
    assert merged.exists()

    start = time.monotonic()
    proc = run_cli("prune", "--yes", "--lock-timeout", "1", root)
    # a lower bound only: its 1 s starts inside the child, after `start`, so load cannot break it
    assert proc.returncode == 75 and time.monotonic() - start >= 1.0
    assert run_cli("prune", "--dry-run", root).returncode == 75   # a dry run waits for a real one
    assert merged.exists()

    h.release()
    proc = run_cli("prune", "--yes", root)
    assert proc.returncode == 0, proc.stderr
    assert not merged.exists()


def test_a_waiting_prune_runs_once_the_lock_is_released(results_tree, tmp_path, holder):
    root = small_root(results_tree, tmp_path, "run_trainer")
    merged = root / "run_trainer/checkpoint-2/model.safetensors"
    h = holder(root / LOCK_NAME)
    waiting = subprocess.Popen([ckpt_tools_exe(), "prune", "--yes", "--lock-timeout", str(HANG_GUARD_S),
                                str(root)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        # prune takes the lock before anything else: once it has the lock file open it is
        # waiting for the lock (polling it), and can do nothing more until the holder lets go
        wait_until(lambda: has_open(waiting.pid, root / LOCK_NAME), "waiting on the lock file",
                   waiting)
        assert waiting.poll() is None, "it must wait for the lock"
        assert merged.exists()
        h.release()
        out, err = waiting.communicate(timeout=HANG_GUARD_S)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert not merged.exists()


def test_an_explicit_lock_path_is_honoured(results_tree, tmp_path, holder):
    root = small_root(results_tree, tmp_path, "run_trainer")
    shared_lock = tmp_path / "team.lock"
    holder(shared_lock)
    assert run_cli("prune", "--yes", "--lock", shared_lock, root).returncode == 75
    assert (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    assert not (root / LOCK_NAME).exists()


def test_root_lock_holds_each_file_once_and_gives_up_after_the_timeout(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    alias = tmp_path / "alias"
    os.symlink(a, alias)
    with root_lock([str(a), str(alias)], timeout=0) as held:   # the same file twice: no self-deadlock
        assert len(held) == 1
        other = os.open(lock_path_for(str(a)), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(other)
        start = time.monotonic()
        with pytest.raises(LockHeld):
            with root_lock([str(a)], timeout=0.3):
                pass
        assert time.monotonic() - start >= 0.3     # a lower bound: its deadline starts after `start`
    with root_lock([str(a)], timeout=0):    # released on exit
        pass


def test_a_shared_lock_creates_nothing(tmp_path):
    with root_lock([str(tmp_path)], exclusive=False) as held:
        assert held == ()
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(LockError):
        with root_lock([str(tmp_path / "missing")]):
            pass


# Writes checkpoint-<1000+k> (k < count) file by file in the Trainer's order. After the first
# file of its last checkpoint it prints "holding" and waits for a line on stdin: the test lets it
# go once two prunes have run, so that they certainly ran against an incomplete checkpoint,
# however slow or fast the machine.
WRITER = textwrap.dedent("""
    import os, shutil, sys, time
    template, run, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    files = []
    for dirpath, _, names in os.walk(template):
        files += [os.path.relpath(os.path.join(dirpath, n), template) for n in names]
    # the Trainer's order: its weights first, then optimizer and trainer state, the PEFT tree last
    first = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
             "training_args.bin"]
    order = [f for f in first if f in files] + sorted(f for f in files if f not in first)
    for k in range(count):
        ck = os.path.join(run, f"checkpoint-{1000 + k}")
        for i, rel in enumerate(order):
            dst = os.path.join(ck, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(template, rel), dst)   # fresh mtimes, like a real save
            print(dst, os.path.getsize(dst), flush=True)
            if k == count - 1 and i == 0:
                print("holding", flush=True)
                sys.stdin.readline()
            time.sleep(0.02)
        print("done", ck, flush=True)
""")


def test_a_checkpoint_being_written_during_a_prune_loses_nothing(results_tree, tmp_path):
    src, _, _ = results_tree
    root = small_root(results_tree, tmp_path, "run_trainer")
    template = src / "run_trainer" / "checkpoint-4"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(template), str(root / "run_trainer"), "6"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    written: dict[str, int] = {}
    try:
        line = writer.stdout.readline()
        while not line.startswith("done"):      # the first checkpoint is complete before prune starts
            path, size = line.rsplit(" ", 1)
            written[path] = int(size)
            line = writer.stdout.readline()
        runs = []
        # prunes run while the writer writes; it holds, its last checkpoint begun, until two have
        # run, so that both certainly ran from start to end while it was still at work; then
        # they go on until it has finished
        while writer.poll() is None or len(runs) < 2:
            runs.append(run_cli("prune", "--yes", "--no-progress", root))
            if len(runs) == 2:
                try:
                    writer.stdin.write("go\n")
                    writer.stdin.close()
                except BrokenPipeError:     # it died: its exit status says so below
                    pass
        writer.wait(timeout=HANG_GUARD_S)
        held = False
        for line in writer.stdout:
            if line.startswith("holding"):
                held = True
            elif not line.startswith("done"):
                path, size = line.rsplit(" ", 1)
                written[path] = int(size)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.wait() == 0
    assert held, "the writer never waited with its last checkpoint incomplete"
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert len(runs) >= 2 and len({p.rsplit("/checkpoint-", 1)[1].split("/")[0] for p in written}) == 6
    for path, size in written.items():
        assert os.path.getsize(path) == size, f"{path} was deleted or changed"
    # the old, complete checkpoints were pruned meanwhile
    assert not (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    assert not (root / "run_trainer/checkpoint-4/model.safetensors").exists()
    assert set(listing(root / "run_trainer")) >= {os.path.relpath(p, root / "run_trainer") for p in written}
