"""What an operator or a hostile tree can hand the commands: special files, durations, empty
paths, directory symlinks, and what ``validate`` imports.

Every command runs as the program, in a subprocess under a hang guard: a regression that
blocks (a FIFO opened, a NaN timeout) fails its test instead of hanging the suite.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120
DURATION_OPTIONS = [("audit", "--min-age"), ("validate", "--min-age"), ("prune", "--min-age"),
                    ("prune", "--lock-timeout"), ("migrate", "--min-age"),
                    ("migrate", "--lock-timeout")]
BAD_DURATIONS = ["nan", "inf", "-inf", "-1", "1e400", "1e308w", "NaNh"]


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=cwd)


def copy_run(results_tree, run: str, dest: Path) -> Path:
    src, _, _ = results_tree
    shutil.copytree(src / run, dest, symlinks=True)
    return dest


def set_old(path: Path, like: Path) -> None:
    """Give a file made by the test the old mtime of the fixture's files (so that --min-age
    does not call its checkpoint in progress)."""
    old = os.stat(like).st_mtime
    os.utime(path, (old, old), follow_symlinks=False)


class BlockedWriter:
    """A thread blocked opening a FIFO for writing: its open returns only once some process
    opens the FIFO for reading. While it is still blocked, nobody has opened the FIFO."""

    def __init__(self, fifo: Path):
        self.fifo = fifo
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._open, daemon=True)
        self.thread.start()

    def _open(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)
        self.opened.set()
        os.close(fd)

    def was_opened_by_someone(self) -> bool:
        # a reader's open releases the writer at once; two seconds is plenty for the thread
        # to record it, and no wait at all is needed for the outcome that passes
        return self.opened.wait(2)

    def release(self) -> None:
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join(HANG_GUARD_S)
        os.close(fd)


def _problems(doc: dict, name: str) -> dict[str, tuple[str, str, str]]:
    ck = next(c for c in doc["checkpoints"] if c["path"].endswith(name) or c["path"] == name)
    return {p["path"].rsplit("/", 1)[-1]: (p["code"], p["message"], p["severity"])
            for p in ck["problems"]}


# --- special files are refused unopened ---------------------------------------------------------

def test_validate_deep_refuses_fifos_sockets_and_devices_without_opening_them(results_tree,
                                                                              tmp_path):
    run = copy_run(results_tree, "run canonical", tmp_path / "run")
    ckpt = run / "checkpoint-100"
    fifo = ckpt / "notes"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(ckpt / "agent.sock"))
    special = {"notes": "a FIFO", "agent.sock": "a socket"}
    try:
        os.mknod(ckpt / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero's numbers
        special["zero"] = "a character device"
    except PermissionError:
        pass    # not root: the FIFO and the socket still make the case
    for name in special:
        set_old(ckpt / name, ckpt / "config.json")
    writer = BlockedWriter(fifo)
    try:
        proc = cli("validate", "--deep", "--json", "--min-age", "0", run)
        assert not writer.was_opened_by_someone(), "validate --deep opened the FIFO"
    finally:
        writer.release()
        sock.close()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    found = _problems(json.loads(proc.stdout), "checkpoint-100")
    assert found == {name: ("unreadable", f"not a regular file ({kind})", "error")
                     for name, kind in special.items()}
    healthy = _problems(json.loads(proc.stdout), "checkpoint-200")
    assert healthy == {}


def test_migrate_goes_on_past_a_sibling_whose_config_is_a_fifo(results_tree, tmp_path):
    """The converter reads the configs of a checkpoint's siblings for its hyperparameters:
    a FIFO there is refused unopened; that sibling is skipped, naming it; the others migrate."""
    src = tmp_path / "src"
    run = copy_run(results_tree, "legacy_v1", src / "legacy_v1")
    fifo = run / "checkpoint-400" / "config.json"
    os.mkfifo(fifo)
    set_old(fifo, run / "checkpoint-400" / "trainer_state.json")
    writer = BlockedWriter(fifo)
    try:
        proc = cli("migrate", "--json", "--min-age", "0", src, tmp_path / "dst")
        assert not writer.was_opened_by_someone(), "migrate opened the FIFO"
    finally:
        writer.release()
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted(m["source"] for m in doc["migrated"]) == [
        f"legacy_v1/checkpoint-{s}" for s in (100, 200, 300)]
    assert doc["failed"] == []
    [skipped] = doc["skipped"]
    assert skipped["source"] == "legacy_v1/checkpoint-400"
    assert "config.json" in skipped["reason"] and "not a regular file (a FIFO)" in skipped["reason"]
    assert not (tmp_path / "dst" / "legacy_v1" / "checkpoint-400").exists()


def test_migrate_goes_on_past_a_sibling_whose_config_is_nested_too_deeply(results_tree, tmp_path):
    src = tmp_path / "src"
    run = copy_run(results_tree, "legacy_v1", src / "legacy_v1")
    nested = run / "checkpoint-400" / "config.json"
    nested.write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    set_old(nested, run / "checkpoint-400" / "trainer_state.json")
    proc = cli("migrate", "--json", "--min-age", "0", src, tmp_path / "dst")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted(m["source"] for m in doc["migrated"]) == [
        f"legacy_v1/checkpoint-{s}" for s in (100, 200, 300)]
    assert [(s["source"], "bad-json" in s["reason"]) for s in doc["skipped"]] == [
        ("legacy_v1/checkpoint-400", True)]


# --- durations and timeouts -------------------------------------------------------------------

def _command(cmd: str, option: str, value: str, tree: Path, tmp_path: Path) -> list:
    args = {"audit": ["audit"], "validate": ["validate"], "prune": ["prune", "--yes"],
            "migrate": ["migrate"]}[cmd]
    paths = [tree, tmp_path / "dst"] if cmd == "migrate" else [tree]
    return [*args, f"{option}={value}", *paths]


@pytest.mark.parametrize(("cmd", "option"), DURATION_OPTIONS)
def test_a_duration_must_be_finite_and_not_negative(cmd, option, results_tree, tmp_path):
    tree = copy_run(results_tree, "run_trainer", tmp_path / "tree" / "run_trainer").parent
    merged = sorted(tree.glob("*/*/model.safetensors"))
    assert merged
    for value in BAD_DURATIONS:
        proc = cli(*_command(cmd, option, value, tree, tmp_path))
        assert proc.returncode == 2, (value, proc.stdout, proc.stderr)
        assert option in proc.stderr and "Traceback" not in proc.stderr, (value, proc.stderr)
        assert proc.stdout == ""
    assert all(p.exists() for p in merged)          # prune deleted nothing
    assert not (tmp_path / "dst").exists()          # migrate wrote nothing
    assert not (tree / ".ckpt-tools.lock").exists()  # nobody even took the lock
    ok = cli(*_command(cmd, option, "90s" if option == "--lock-timeout" else "0", tree, tmp_path))
    assert ok.returncode in (0, 1), ok.stderr       # a sound value is accepted


def test_lock_timeout_nan_with_the_lock_held_is_a_usage_error_not_a_wait(results_tree, tmp_path):
    tree = copy_run(results_tree, "run_trainer", tmp_path / "tree" / "run_trainer").parent
    dst = tmp_path / "dst"
    dst.mkdir()
    held = []
    for where in (tree, dst):
        fd = os.open(where / ".ckpt-tools.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        # the lock is really held: a run that will not wait gives up with 75
        assert cli("prune", "--yes", "--lock-timeout", "0", tree).returncode == 75
        assert cli("migrate", "--lock-timeout", "0", tree, dst).returncode == 75
        for args in (("prune", "--yes", "--lock-timeout", "nan", tree),
                     ("migrate", "--lock-timeout", "nan", tree, dst)):
            proc = cli(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "--lock-timeout" in proc.stderr
    finally:
        for fd in held:
            os.close(fd)


# --- empty paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [("audit", ""), ("validate", ""), ("prune", "--dry-run", ""),
                                  ("prune", "--yes", ""), ("migrate", "", "dst"),
                                  ("migrate", "run_trainer", ""), ("audit", "run_trainer", "")])
def test_an_empty_path_is_a_usage_error_not_the_current_directory(args, results_tree, tmp_path):
    cwd = tmp_path / "cwd"
    copy_run(results_tree, "run_trainer", cwd / "run_trainer")
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    proc = cli(*args, cwd=cwd)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "empty path" in proc.stderr
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before


# --- directory symlinks inside a checkpoint -----------------------------------------------------

def _link(target: str, at: Path, like: Path) -> None:
    at.symlink_to(target)
    set_old(at, like)


def test_directory_symlinks_and_loops_do_not_fail_a_healthy_checkpoint(results_tree, tmp_path):
    tree = tmp_path / "tree"
    run = copy_run(results_tree, "run_trainer", tree / "run_trainer")
    ckpt = run / "checkpoint-4"
    like = ckpt / "config.json"
    _link("..", ckpt / "peft_adapters" / "up", like)                        # to its parent
    _link("../../checkpoint-2", ckpt / "dylo_moe_state" / "sibling", like)  # to a sibling
    _link("loop", ckpt / "loop", like)                                      # to itself
    for args in (("audit", "--json"), ("validate", "--json"), ("validate", "--deep", "--json")):
        proc = cli(*args, "--min-age", "0", tree)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        doc = json.loads(proc.stdout)
        assert {c["path"].rsplit("/", 1)[-1]: (c["status"], c["problems"])
                for c in doc["checkpoints"]} == {"checkpoint-2": ("redundant", []),
                                                 "checkpoint-4": ("redundant", [])}, args
    # migrate carries files by their bytes: a directory link or a loop has none to carry
    proc = cli("migrate", "--json", "--min-age", "0", tree, tmp_path / "dst")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert [m["source"] for m in doc["migrated"]] == ["run_trainer/checkpoint-2"]
    [failed] = doc["failed"]
    assert failed["source"] == "run_trainer/checkpoint-4"
    assert failed["reason"].startswith("run_trainer/checkpoint-4/")
    assert ("not a regular file (a directory)" in failed["reason"]
            or "a symlink loop" in failed["reason"]), failed
    assert "Errno" not in failed["reason"]


def test_an_expert_linked_in_from_another_checkpoint_is_not_this_checkpoints_own(results_tree,
                                                                                 tmp_path):
    tree = tmp_path / "tree"
    run = copy_run(results_tree, "run_trainer", tree / "run_trainer")
    expert = run / "checkpoint-4" / "peft_adapters" / "expert_1"
    shutil.rmtree(expert)
    _link("../../checkpoint-2/peft_adapters/expert_1", expert, run / "checkpoint-4" / "config.json")
    proc = cli("validate", "--json", "--min-age", "0", tree)
    assert proc.returncode == 1
    found = _problems(json.loads(proc.stdout), "checkpoint-4")
    code, message, severity = found["expert_1"]
    assert (code, severity) == ("expert-missing", "error") and "symlink" in message
    plan = cli("prune", "--dry-run", "--json", "--min-age", "0", tree)
    assert plan.returncode == 0
    assert "checkpoint-4/model.safetensors" not in plan.stdout
    assert "checkpoint-2/model.safetensors" in plan.stdout


# --- what validate imports ----------------------------------------------------------------------

HEAVY = ("torch", "transformers", "peft")
IMPORTS = textwrap.dedent("""
    import contextlib, io, json, sys
    from ckpt_tools.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(sys.argv[1:])
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
    print(json.dumps({"rc": rc, "heavy": heavy, "stdout": out.getvalue()}))
""")


def _run_for_imports(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", IMPORTS, *map(str, args)], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _with_adapter_config(ckpt: Path, expert: int, **changes) -> None:
    path = ckpt / "peft_adapters" / f"expert_{expert}" / "adapter_config.json"
    stat_ = path.stat()
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    os.utime(path, ns=(stat_.st_atime_ns, stat_.st_mtime_ns))


def test_validate_without_deep_imports_neither_torch_transformers_nor_peft(results_tree, tmp_path):
    root, _, _ = results_tree
    got = _run_for_imports("validate", "--json", "--min-age", "0", root)
    assert got["rc"] == 1 and got["heavy"] == []
    # its config checks are plain Python, and find what they found through peft
    run = copy_run(results_tree, "run_trainer", tmp_path / "run_trainer")
    bad = {"lora_alpha": float("nan"), "lora_dropout": 5, "r": "8", "target_modules": [1],
           "rank_pattern": {"q_proj": -1}}
    for i, (key, value) in enumerate(bad.items()):
        _with_adapter_config(run / f"checkpoint-{2 if i < 3 else 4}", i % 3, **{key: value})
    got = _run_for_imports("validate", "--json", "--min-age", "0", run)
    assert got["rc"] == 1 and got["heavy"] == []
    doc = json.loads(got["stdout"])
    flagged = sorted((c["path"], p["path"].split("/")[-2], p["code"]) for c in doc["checkpoints"]
                     for p in c["problems"] if p["path"].endswith("adapter_config.json"))
    assert flagged == [("checkpoint-2", "expert_0", "bad-config"),
                       ("checkpoint-2", "expert_1", "bad-config"),
                       ("checkpoint-2", "expert_2", "bad-config"),
                       ("checkpoint-4", "expert_0", "bad-config"),
                       ("checkpoint-4", "expert_1", "bad-config")]
    assert _run_for_imports("--help")["heavy"] == []


def test_validate_deep_still_runs_peft_s_own_config_class(results_tree, tmp_path):
    run = copy_run(results_tree, "run_trainer", tmp_path / "run_trainer")
    # sound to the plain checks; PEFT refuses a layers_pattern without layers_to_transform
    _with_adapter_config(run / "checkpoint-2", 0, layers_pattern="layers")
    got = _run_for_imports("validate", "--deep", "--json", "--min-age", "0", run)
    assert got["rc"] == 1 and "peft" in got["heavy"]
    found = _problems(json.loads(got["stdout"]), "checkpoint-2")
    code, message, _ = found["adapter_config.json"]
    assert code == "bad-config" and "peft.LoraConfig" in message
