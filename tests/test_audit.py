"""Classification of the fixture tree, the audit CLI and its output contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckpt_tools
from ckpt_tools.validator import DEEP, FULL
from fixtures.cron_week import allocated_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scanned(results_tree):
    root, manifest, now = results_tree
    return ckpt_tools.scan(str(root), now=now), manifest


def _by_path(result):
    return {c.path: c for c in result.checkpoints}


def test_every_checkpoint_is_found_and_nothing_else(scanned):
    result, manifest = scanned
    assert set(_by_path(result)) == set(manifest)


@pytest.mark.parametrize("field", ["status", "layout"])
def test_every_checkpoint_gets_the_status_and_layout_its_construction_implies(scanned, field):
    result, manifest = scanned
    found = _by_path(result)
    expected_attr = "status_as_root" if field == "status" and os.geteuid() == 0 else field
    wrong = {p: (getattr(e, expected_attr), getattr(found[p], field))
             for p, e in manifest.items() if getattr(found[p], field) != getattr(e, expected_attr)}
    assert wrong == {}


def test_every_expected_problem_code_is_reported_on_its_file(scanned):
    result, manifest = scanned
    found = _by_path(result)
    missing = {}
    for path, entry in manifest.items():
        if entry.needs_non_root and os.geteuid() == 0:
            continue
        codes = {p.code for p in found[path].problems if p.is_error}
        if not entry.problem_codes <= codes:
            missing[path] = sorted(entry.problem_codes - codes)
        for code, file in entry.problem_paths.items():
            paths = {p.path for p in found[path].problems if p.code == code}
            if code in entry.problem_codes and file not in paths:
                missing[f"{path}:{code}"] = (file, sorted(paths))
    assert missing == {}


def test_healthy_checkpoints_have_no_errors(scanned):
    result, manifest = scanned
    for c in result.checkpoints:
        if manifest[c.path].status in ("healthy", "redundant", "legacy"):
            assert c.errors == (), (c.path, c.errors)


def test_expert_counts(scanned):
    result, manifest = scanned
    for c in result.checkpoints:
        e = manifest[c.path]
        if e.status in ("healthy", "redundant") and e.num_experts is not None:
            assert c.num_experts == e.num_experts, c.path


def test_reclaimable_bytes_are_the_merged_files_of_redundant_checkpoints(scanned):
    result, manifest = scanned
    root = Path(result.roots[0])
    as_root = os.geteuid() == 0
    for c in result.checkpoints:
        e = manifest[c.path]
        # a fresh checkpoint (younger than --min-age) is left alone by prune: nothing to reclaim yet
        if (e.status_as_root if as_root else e.status) == "redundant" and "young" not in e.flags:
            blocks = sum((root / f).lstat().st_blocks * 512 for f in e.merged_files)
            assert c.reclaimable_bytes == blocks > 0, c.path
        else:
            assert c.reclaimable_bytes == 0, c.path


def test_hard_linked_files_count_once_in_totals(results_tree, tmp_path):
    root, manifest, now = results_tree
    assert manifest.hardlinks, "the fixture tree has a hard link"
    result = ckpt_tools.scan(str(root), now=now)
    per_ckpt = sum(c.size_bytes for c in result.checkpoints)
    total = allocated_bytes(root)   # like du: each inode once
    assert result.size_bytes < per_ckpt
    assert result.size_bytes <= total


def test_deep_mode_finds_nan(results_tree):
    root, manifest, now = results_tree
    entries = manifest.with_code("nan-or-inf")
    assert entries
    for e in entries:
        shallow = ckpt_tools.scan(str(root / e.path), now=now, level=FULL).checkpoints[0]
        deep = ckpt_tools.scan(str(root / e.path), now=now, level=DEEP).checkpoints[0]
        assert "nan-or-inf" not in {p.code for p in shallow.problems}
        assert shallow.status == e.status
        assert "nan-or-inf" in {p.code for p in deep.problems}
        assert deep.status == e.deep_status == "broken"
        assert deep.facts.hashes


def test_in_progress_follows_min_age_and_tmp_name(results_tree, tmp_path):
    root, manifest, now = results_tree
    young = [e for e in manifest.values() if "young" in e.flags]
    assert young
    for e in young:
        # the Trainer wrote trainer_state.json last, naming this step: complete, judged by content
        c = ckpt_tools.scan(str(root / e.path), now=now).checkpoints[0]
        assert c.status == e.status != "in-progress" and c.fresh and c.to_dict()["fresh"] is True
        later = ckpt_tools.scan(str(root / e.path), now=now + 7200).checkpoints[0]
        assert later.status == e.status and not later.fresh
        # without that file, or with one naming another step, it may still be being written
        for change in ("remove", "other-step"):
            copy = tmp_path / change / e.name
            shutil.copytree(root / e.path, copy, symlinks=True)
            for f in copy.rglob("*"):
                os.utime(f, follow_symlinks=False)   # written just now
            state = copy / "trainer_state.json"
            if change == "remove":
                state.unlink()
            else:
                doc = json.loads(state.read_text())
                state.write_text(json.dumps(dict(doc, global_step=doc["global_step"] + 1)))
            c = ckpt_tools.scan(str(copy), now=time.time()).checkpoints[0]
            assert c.status == "in-progress" and not c.fresh, change
            why = [p for p in c.problems if p.code == "in-progress"]
            assert len(why) == 1 and "--min-age 0" in why[0].message, change
            assert ckpt_tools.scan(str(copy), now=time.time() + 7200).checkpoints[0].status == e.status
    for e in manifest.values():
        if e.name.startswith("tmp-checkpoint-"):
            c = ckpt_tools.scan(str(root / e.path), now=now + 10**7).checkpoints[0]
            assert c.status == "in-progress"


# --- CLI ---------------------------------------------------------------------------

def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO)


def test_audit_json_contract(results_tree):
    root, manifest, now = results_tree
    proc = run_cli("audit", "--json", str(root))
    assert proc.returncode == 1  # the tree holds broken checkpoints
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"checkpoints", "totals"}
    assert set(doc["totals"]) >= {"checkpoints", "by_status", "size_bytes", "reclaimable_bytes"}
    assert doc["totals"]["checkpoints"] == len(manifest)
    for c in doc["checkpoints"]:
        assert set(c) >= {"path", "run", "step", "status", "layout", "size_bytes",
                          "reclaimable_bytes", "problems"}
        assert isinstance(c["size_bytes"], int) and isinstance(c["reclaimable_bytes"], int)
        assert c["path"] in manifest
        for p in c["problems"]:
            assert set(p) == {"code", "path", "message", "severity"}
            assert "\n" not in p["message"]
    assert sum(doc["totals"]["by_status"].values()) == len(manifest)
    assert doc["totals"]["reclaimable_bytes"] == sum(c["reclaimable_bytes"] for c in doc["checkpoints"])
    assert proc.stderr == ""


def test_audit_table_names_runs_and_has_a_footer(results_tree):
    root, manifest, _ = results_tree
    proc = run_cli("audit", "--no-progress", str(root))
    out = proc.stdout
    assert f"{len(manifest)} checkpoints in {len(manifest.runs)} runs" in out.splitlines()[-1]
    assert "reclaimable by prune" in out.splitlines()[-1]
    assert "run canonical" in out and "naïve" in out  # a space and a non-ASCII name
    assert "Traceback" not in proc.stdout + proc.stderr


def test_audit_exit_codes(results_tree, tmp_path):
    root, manifest, now = results_tree
    healthy = [e for e in manifest.values() if e.status == "healthy" and e.run == "run canonical"]
    redundant = [e for e in manifest.values() if e.status == "redundant"]
    assert run_cli("audit", str(root / healthy[0].path)).returncode == 0
    assert run_cli("audit", str(root / redundant[0].path)).returncode == 0
    assert run_cli("audit", "--strict", str(root / redundant[0].path)).returncode == 1
    assert run_cli("audit", str(root)).returncode == 1
    missing = run_cli("audit", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_audit_of_an_empty_directory(tmp_path):
    proc = run_cli("audit", "--json", str(tmp_path))
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["totals"]["checkpoints"] == 0


def test_global_options_work_before_and_after_the_command(results_tree):
    root, manifest, _ = results_tree
    path = str(root / next(iter(manifest)))
    a = run_cli("--json", "audit", path)
    b = run_cli("audit", path, "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    q = run_cli("audit", "-q", str(root))
    assert len(q.stdout.strip().splitlines()) <= 1 + sum(1 for _ in [])


def test_validate_reports_each_problem_and_exits_1(results_tree):
    root, manifest, _ = results_tree
    broken = [e for e in manifest.values() if e.status == "broken" and not e.needs_non_root]
    proc = run_cli("validate", "--json", *(str(root / e.path) for e in broken))
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert not doc["valid"]
    found = {os.path.join(c["root"], c["path"]) if c["path"] != "." else c["root"]: c
             for c in doc["checkpoints"]}
    for e in broken:
        c = found[str(root / e.path)]
        codes = {p["code"] for p in c["problems"]}
        assert e.problem_codes <= codes, (e.path, codes)
        assert c["valid"] is False
    ok = [e for e in manifest.values() if e.status == "healthy"][0]
    assert run_cli("validate", str(root / ok.path)).returncode == 0


def test_audit_and_validate_never_import_torch(results_tree, tmp_path):
    """Run the CLI where `import torch` (and transformers, peft) fails."""
    root, manifest, _ = results_tree
    guard = tmp_path / "guard"
    guard.mkdir()
    for mod in ("torch", "transformers", "peft", "numpy", "safetensors"):
        (guard / f"{mod}.py").write_text(f"raise ImportError('{mod} must not be imported here')\n")
    env = dict(os.environ, PYTHONPATH=f"{guard}{os.pathsep}{REPO}")
    for args in (["--help"], ["audit", "--json", str(root)], ["validate", str(root / next(iter(manifest)))]):
        proc = run_cli(*args, env=env)
        assert proc.returncode in (0, 1), (args, proc.stderr)
        assert "must not be imported" not in proc.stderr
        assert "Traceback" not in proc.stderr


def test_unsafe_pickle_is_never_executed(results_tree):
    root, manifest, now = results_tree
    ckpt_tools.scan(str(root), now=now, level=FULL)
    assert not manifest.unsafe_pickle_marker.exists()


def test_permission_denied_is_a_problem_not_a_crash(results_tree, monkeypatch):
    """The OS refusing to open a file (as it does for a non-root user) → permission-denied."""
    import builtins
    root, manifest, now = results_tree
    entry = next(e for e in manifest.values() if e.needs_non_root)
    denied = {str(root / rel) for rel in manifest.mode_000_files}
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *a, **k):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_os_open(path, *a, **k)

    def open_(path, *a, **k):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    c = ckpt_tools.scan(str(root / entry.path), now=now).checkpoints[0]
    assert c.status == "broken"
    assert "permission-denied" in {p.code for p in c.errors}
    others = ckpt_tools.scan(str(root / "run canonical"), now=now).checkpoints
    assert all(o.status != "broken" for o in others)


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c", "import click, humanize, ckpt_tools"],
                               capture_output=True, cwd="/", env=dict(os.environ, PYTHONPATH=str(REPO)))
    except OSError:
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _nobody_can_run_python(),
                    reason="needs root and an interpreter another user may run")
def test_permission_denied_as_another_user(results_tree):
    import tempfile
    root, manifest, _ = results_tree
    tmp_path = Path(tempfile.mkdtemp(prefix="ckpt-perm-", dir="/tmp"))
    entries = [e for e in manifest.values() if e.needs_non_root]
    assert entries
    copy = tmp_path / "tree"
    shutil.copytree(root / entries[0].path, copy / "ckpt", symlinks=True)
    for rel in manifest.mode_000_files:
        if rel.startswith(entries[0].path + "/"):
            os.chmod(copy / "ckpt" / rel[len(entries[0].path) + 1:], 0)
    os.chmod(tmp_path, 0o755)
    for dirpath, dirnames, filenames in os.walk(copy):
        os.chmod(dirpath, 0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "ckpt_tools.cli", "audit", "--json",
                           "--min-age", "0", str(copy)],
                          capture_output=True, text=True, env=env, cwd="/")
    doc = json.loads(proc.stdout)
    codes = {p["code"] for c in doc["checkpoints"] for p in c["problems"]}
    assert "permission-denied" in codes
    assert doc["checkpoints"][0]["status"] == "broken"
    assert proc.returncode == 1


def test_progress_bar_only_on_a_terminal(results_tree):
    """A bar on stderr when stderr is a terminal; none with --no-progress or into a pipe."""
    import pty
    root, _, _ = results_tree

    def stderr_of(*args, tty: bool) -> str:
        if not tty:
            return run_cli(*args).stderr
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "ckpt_tools.cli", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate()
        os.close(master)
        json.loads(out)  # stdout stays pure JSON
        return b"".join(chunks).decode(errors="replace")

    assert "validating" in stderr_of("audit", "--json", str(root), tty=True)
    assert "validating" not in stderr_of("audit", "--json", "--no-progress", str(root), tty=True)
    assert stderr_of("audit", "--json", str(root), tty=False) == ""
