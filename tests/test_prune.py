"""``ckpt-tools prune``: deletes exactly the redundant merged weights, and nothing it must not.

Every test works on a private copy of the session's fixture tree (or of a few of its runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.copying import copy_tree
from fixtures.tree import YOUNG_AGE_S

import ckpt_tools.cli.prune as cli_prune
import ckpt_tools.prune.execute as prune_exec
from ckpt_tools import plan_prune, scan
from ckpt_tools.cli import cli
from ckpt_tools.prune import ActionLog, PruneResult, Revalidator, execute_prune

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
LOCK_NAME = ".ckpt-tools.lock"


def effective_status(entry) -> str:
    """The status the validator must find here: root ignores file modes (see the manifest)."""
    status = entry.status_as_root if os.geteuid() == 0 else entry.status
    # complete but younger than --min-age: judged by content, left alone by prune
    return f"{status} (fresh)" if "young" in entry.flags else status


def redundant_merged(manifest) -> set[str]:
    """Root-relative paths of every merged file prune must delete from the fixture tree."""
    return {m for e in manifest.values() if effective_status(e) == "redundant" for m in e.merged_files}


def listing(root: Path, *, dirs: bool = False, content: bool = False) -> dict[str, tuple]:
    """path → (type, size, mtime_ns, inode[, sha256 | link target]) of everything under root."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = filenames + dirnames
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) and not dirs:
                continue
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            item: tuple = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
            if content and stat.S_ISLNK(st.st_mode):
                item += (os.readlink(p),)
            elif content and stat.S_ISREG(st.st_mode) and st.st_mode & 0o444:
                h = hashlib.sha256()
                try:
                    with open(p, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            h.update(chunk)
                    item += (h.hexdigest(),)
                except PermissionError:
                    item += ("unreadable",)
            out[rel] = item
    if dirs:
        st = os.lstat(root)
        out["."] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def allocated_bytes(*roots: Path) -> int:
    """Allocated bytes of every file and symlink under roots, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames + dirnames:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def ckpt_tools_exe() -> str:
    """The venv's console script, as cron would run it."""
    path = os.pathsep.join([str(VENV_BIN), str(Path(sys.executable).parent)])
    exe = shutil.which("ckpt-tools", path=path)
    if exe is None:
        pytest.fail("the ckpt-tools console script is not installed in the venv: "
                    "run `make venv` (pip install -e .)")
    return exe


def run_cli(*args, input: str | None = None, timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``ckpt-tools ARGS`` in a subprocess whose stdin is not a terminal."""
    return subprocess.run([ckpt_tools_exe(), *map(str, args)], input=input if input is not None else "",
                          capture_output=True, text=True, timeout=timeout, env=env)


def restamp_young(root: Path, manifest) -> None:
    """Make the young files of a copy of the fixture tree young again by the real clock
    (``now - YOUNG_AGE_S``), as the tree's builder made them against the session's ``now``.

    Call it right before running the CLI (which reads the real clock) on a copy that holds them:
    the young checkpoint then is in progress for a 1 h ``--min-age`` however long the session
    has been running, and however slow the machine is.
    """
    t = time.time() - YOUNG_AGE_S
    for rel in manifest.young_files:
        if os.path.lexists(root / rel):
            os.utime(root / rel, (t, t), follow_symlinks=False)


def small_root(results_tree, tmp_path: Path, *runs: str) -> Path:
    """A root holding copies of some runs of the fixture tree (quick to scan)."""
    src, _, _ = results_tree
    return copy_tree(src, tmp_path / "results", only=runs)


def plan_of(root: Path, now: float, min_age_s: float = 3600):
    return plan_prune(scan(str(root), now=now, min_age_s=min_age_s).checkpoints)


# execute()'s worker processes; trainer_root runs each of its tests with 1 and with 2
JOBS = 1


def execute(plan, min_age_s: float = 3600, **kw) -> PruneResult:
    return execute_prune(plan, revalidate=Revalidator(min_age_s=min_age_s), jobs=JOBS, **kw)


def set_mtime_ns(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def link_twin(root: Path, src: str, dst: str) -> None:
    """``dst`` made a twin of ``src``: the same PEFT tree (copied, mtimes kept) and its merged
    file a hard link of ``src``'s, as a dedup tool leaves two identical saves. prune proves
    each merged file by content, so both checkpoints must hold the tensors it holds."""
    for sub in ("peft_adapters", "dylo_moe_state"):
        shutil.rmtree(root / dst / sub)
        shutil.copytree(root / src / sub, root / dst / sub)
    (root / dst / "model.safetensors").unlink()
    os.link(root / src / "model.safetensors", root / dst / "model.safetensors")


# ------------------------------------------------------------------ the whole fixture tree

@pytest.fixture(scope="module")
def pruned(results_tree, tmp_path_factory):
    """The fixture tree copied and pruned once by the real CLI: (root, manifest, before, after, proc, log)."""
    src, manifest, _ = results_tree
    base = tmp_path_factory.mktemp("pruned")
    root = copy_tree(src, base / "results")
    log = base / "prune.jsonl"
    restamp_young(root, manifest)      # the CLI's clock: the young checkpoint stays in progress
    before = listing(root)
    proc = run_cli("prune", "--yes", "--no-progress", "--log", log, root)
    after = listing(root)
    return root, manifest, before, after, proc, log


def test_prune_deletes_exactly_the_redundant_merged_files(pruned):
    root, manifest, before, after, proc, _ = pruned
    assert proc.returncode == 0, proc.stderr
    expected = redundant_merged(manifest)
    assert expected, "the fixture tree holds redundant checkpoints"
    assert set(before) - set(after) == expected
    assert set(after) - set(before) == {LOCK_NAME}   # the one write besides the unlinks
    changed = {p for p in set(before) & set(after) if before[p] != after[p]}
    assert changed == set(), "files that were not deleted must be untouched (size, mtime_ns, inode)"


def test_every_other_checkpoint_keeps_its_merged_weights(pruned):
    root, manifest, _, after, _, _ = pruned
    for e in manifest.values():
        if effective_status(e) != "redundant":
            for m in e.merged_files:
                assert m in after, f"{m} ({effective_status(e)}) was deleted"


def test_broken_checkpoints_keep_their_merged_weights_for_every_problem_code(pruned):
    _, manifest, _, after, _, _ = pruned
    broken = [e for e in manifest.values() if effective_status(e) == "broken"]
    codes = {code for e in broken for code in e.problem_codes}
    assert {"missing-file", "truncated", "bad-header", "bad-json", "bad-archive", "unsafe-pickle",
            "shape-mismatch", "rank-mismatch", "expert-missing", "expert-count-mismatch",
            "target-mismatch", "dtype-unknown", "symlink-escape"} <= codes
    for code in codes:
        holders = [e for e in broken if code in e.problem_codes and e.merged_files]
        assert holders, code
        for e in holders:
            assert all(m in after for m in e.merged_files), f"{e.path} ({code}) lost its merged weights"


def test_young_and_tmp_checkpoints_of_the_tree_keep_their_merged_weights(pruned):
    _, manifest, _, after, _, _ = pruned
    protected = [e for e in manifest.values() if {"young", "tmp-checkpoint"} & e.flags]
    assert len(protected) == 2
    for e in protected:
        assert e.merged_files and all(m in after for m in e.merged_files), e.path


def test_the_log_has_one_json_line_per_action(pruned):
    root, manifest, _, _, _, log = pruned
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["action"] for x in records[:1] + records[-1:]] == ["start", "end"]
    lines = records[1:-1]   # the action lines, between the run's start and end records
    assert all(set(x) >= {"time", "run_id", "action", "path", "bytes", "reason"} for x in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", x["time"]) for x in lines)
    assert all(os.path.isabs(x["path"]) for x in lines)
    expected = {str(root / m) for m in redundant_merged(manifest)}
    assert {x["path"] for x in lines if x["action"] == "delete"} == expected
    assert {x["path"] for x in lines if x["action"] == "plan"} == expected
    # what the plan left alone is counted by reason in the end record, not written line by line
    assert not [x for x in lines if x["action"] == "skip"]
    assert records[-1]["left_alone"]["fresh"] == 1     # run canonical/checkpoint-300
    assert not [x for x in lines if x["action"] == "fail"]


# ------------------------------------------------------------------ dry run and exact bytes

def test_dry_run_changes_nothing_and_promises_exactly_what_the_real_run_frees(results_tree, tmp_path):
    src, manifest, _ = results_tree
    root = copy_tree(src, tmp_path / "results")
    # one merged file hard-linked into two redundant checkpoints: freed once, by the second unlink
    a = root / "run_trainer/checkpoint-2/model.safetensors"
    link_twin(root, "run_trainer/checkpoint-2", "run_trainer/checkpoint-4")
    # one hard-linked to a file outside the plan: deleted from the checkpoint, frees nothing
    held = root / "seed_v3/checkpoint-100/model.safetensors"
    (root / "archive").mkdir()
    os.link(held, root / "archive" / "seed_v3-model.safetensors")
    held_alloc = os.lstat(held).st_blocks * 512
    assert held_alloc > 0

    restamp_young(root, manifest)      # the CLI's clock: the young checkpoint stays in progress
    before = listing(root, dirs=True, content=True)
    dry = run_cli("prune", "--dry-run", "--json", root)
    assert dry.returncode == 0, dry.stderr
    assert listing(root, dirs=True, content=True) == before, "a dry run changed the tree"
    assert not (root / LOCK_NAME).exists()
    promised = json.loads(dry.stdout)
    assert promised["dry_run"] is True
    assert promised["held_bytes"] == held_alloc
    by_path = {d["path"]: d["bytes"] for d in promised["deleted"]}
    assert sorted([by_path["run_trainer/checkpoint-2/model.safetensors"],
                   by_path["run_trainer/checkpoint-4/model.safetensors"]]) == [0, os.lstat(a).st_blocks * 512]
    assert by_path["seed_v3/checkpoint-100/model.safetensors"] == 0

    blocks_before = allocated_bytes(root)
    real = run_cli("prune", "--yes", "--json", root)
    assert real.returncode == 0, real.stderr
    done = json.loads(real.stdout)
    assert blocks_before - allocated_bytes(root) == promised["freed_bytes"] > 0
    assert done["freed_bytes"] == promised["freed_bytes"]
    assert done["held_bytes"] == promised["held_bytes"]
    assert done["deleted"] == promised["deleted"]     # the same files, in the same order, same bytes
    assert (root / "archive" / "seed_v3-model.safetensors").exists()
    assert {d["path"] for d in done["deleted"]} == redundant_merged(manifest)


def test_plan_credits_a_file_once_and_only_when_all_its_links_go(results_tree, tmp_path):
    _, _, now = results_tree
    root = small_root(results_tree, tmp_path, "run_trainer")
    a = root / "run_trainer/checkpoint-2/model.safetensors"
    link_twin(root, "run_trainer/checkpoint-2", "run_trainer/checkpoint-4")
    plan = plan_of(root, now)
    alloc = os.lstat(a).st_blocks * 512
    assert [d.frees_bytes for d in plan.deletions] == [0, alloc]
    assert plan.freed_bytes == alloc and plan.held_bytes == 0
    os.link(a, tmp_path / "outside-link")
    plan = plan_of(root, now)
    assert plan.freed_bytes == 0 and plan.held_bytes == alloc
    assert [d.other_links for d in plan.deletions] == [1, 1]


# ------------------------------------------------------------------ in progress

def test_a_checkpoint_younger_than_min_age_keeps_its_merged_weights(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    ck = root / "run_trainer/checkpoint-4"
    (ck / "trainer_state.json").touch()          # written to a moment ago
    proc = run_cli("prune", "--yes", root)
    assert proc.returncode == 0, proc.stderr
    assert (ck / "model.safetensors").exists()
    assert not (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    proc = run_cli("prune", "--yes", "--min-age", "0", root)     # the age alone protected it
    assert proc.returncode == 0, proc.stderr
    assert not (ck / "model.safetensors").exists()


def test_a_tmp_checkpoint_is_never_pruned(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    complete = root / "run_trainer/checkpoint-2"
    tmp = root / "run_trainer/tmp-checkpoint-6"
    shutil.copytree(complete, tmp, symlinks=True)    # complete, old, redundant in all but its name
    proc = run_cli("prune", "--yes", "--min-age", "0", root)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "model.safetensors").exists()
    assert not (complete / "model.safetensors").exists()


# ------------------------------------------------------------------ between plan and execute

@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def trainer_root(request, results_tree, tmp_path, monkeypatch):
    """A root with the two redundant checkpoints of the Trainer run, and a directory outside it.
    Each test runs twice: ``execute`` in this process, then in two forked workers (one
    checkpoint each)."""
    monkeypatch.setattr(sys.modules[__name__], "JOBS", request.param)
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    root = small_root(results_tree, tmp_path, "run_trainer")
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside, results_tree[2]


def _target(root):
    return root / "run_trainer/checkpoint-4", root / "run_trainer/checkpoint-4/model.safetensors"


def _assert_only_control_pruned(root, result, reason_re):
    ck, target = _target(root)
    assert target.exists(), "a file that changed since the plan was deleted"
    assert not (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    assert [d.path for d in result.deleted] == ["run_trainer/checkpoint-2/model.safetensors"]
    assert [s.path for s in result.changed] == ["run_trainer/checkpoint-4/model.safetensors"]
    assert re.search(reason_re, result.changed[0].reason), result.changed[0].reason
    assert not result.ok and not result.failed


def test_a_file_modified_since_the_plan_is_skipped(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    _, target = _target(root)
    set_mtime_ns(target, os.lstat(target).st_mtime_ns + 1_000_000_000)   # still two days old
    _assert_only_control_pruned(root, execute(plan), r"changed since the plan \(modified\)")


def test_a_file_whose_size_changed_since_the_plan_is_skipped(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    _, target = _target(root)
    st = os.lstat(target)
    raw = target.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    with open(target, "r+b") as fh:   # the same inode, a longer (still valid) header, the old mtime
        fh.write(struct.pack("<Q", n + 8) + raw[8:8 + n] + b" " * 8 + raw[8 + n:])
    set_mtime_ns(target, st.st_mtime_ns)
    assert os.lstat(target).st_ino == st.st_ino
    _assert_only_control_pruned(root, execute(plan), r"size \d+ → \d+")


def test_a_file_replaced_by_a_new_inode_is_skipped(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    _, target = _target(root)
    new = target.with_name("model.safetensors.new")
    shutil.copy2(target, new)                  # same bytes, same size, same mtime: only the inode differs
    os.replace(new, target)
    _assert_only_control_pruned(root, execute(plan), r"replaced by another file")


def test_a_peft_tree_broken_since_the_plan_keeps_the_merged_weights(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    ck, _ = _target(root)
    adapter = ck / "peft_adapters/expert_1/adapter_model.safetensors"
    st = os.lstat(adapter)
    os.truncate(adapter, st.st_size // 2)
    set_mtime_ns(adapter, st.st_mtime_ns)     # not young: only re-validation can catch it
    _assert_only_control_pruned(root, execute(plan), r"no longer redundant: broken.*truncated")


def test_a_checkpoint_written_to_since_the_plan_is_skipped(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    ck, _ = _target(root)
    (ck / "trainer_state.json").write_text("{}")  # a trainer resumed into it
    _assert_only_control_pruned(root, execute(plan), r"no longer redundant: in-progress")


@pytest.mark.parametrize("swapped", ["run_trainer/checkpoint-4", "run_trainer"])
def test_a_directory_swapped_for_a_symlink_to_outside_is_not_followed(trainer_root, swapped):
    root, outside, now = trainer_root
    plan = plan_of(root, now)
    # the real directory moves out of the root; a symlink to it takes its place
    shutil.move(root / swapped, outside / "moved")
    os.symlink(outside / "moved", root / swapped)
    before_outside = listing(outside, dirs=True, content=True)
    result = execute(plan)
    assert listing(outside, dirs=True, content=True) == before_outside, "a file outside the root changed"
    under = {d.path for d in plan.deletions if d.path.startswith(swapped + "/")}
    assert under and not result.failed
    assert {s.path for s in result.changed} == under
    assert {d.path for d in result.deleted} == {d.path for d in plan.deletions} - under
    assert all("symlink" in s.reason for s in result.changed)


def test_a_directory_swapped_after_revalidation_is_not_followed(trainer_root):
    root, outside, now = trainer_root
    plan = plan_of(root, now)
    ck, _ = _target(root)
    real = Revalidator(min_age_s=3600)
    seen = {}

    def revalidate_then_swap(r, path):
        fresh = real(r, path)
        if path == "run_trainer/checkpoint-4":   # validated; now the directory goes, a symlink comes
            shutil.copytree(ck, outside / "copy", symlinks=True)
            os.rename(ck, ck.with_name("checkpoint-4.moved"))
            os.symlink(outside / "copy", ck)
            seen["outside"] = listing(outside, dirs=True, content=True)
        return fresh

    result = execute_prune(plan, revalidate=revalidate_then_swap)
    assert listing(outside, dirs=True, content=True) == seen["outside"], "a file outside the root changed"
    assert (root / "run_trainer/checkpoint-4.moved/model.safetensors").exists()
    assert [s.path for s in result.changed] == ["run_trainer/checkpoint-4/model.safetensors"]
    assert "moved or replaced" in result.changed[0].reason
    assert [d.path for d in result.deleted] == ["run_trainer/checkpoint-2/model.safetensors"]


def test_a_merged_file_that_is_a_symlink_is_unlinked_itself_never_its_target(trainer_root):
    root, outside, now = trainer_root
    ck, target = _target(root)
    elsewhere = outside / "model.safetensors"
    shutil.move(target, elsewhere)
    os.symlink(elsewhere, target)
    set_mtime_ns(target, os.lstat(elsewhere).st_mtime_ns)
    plan = plan_of(root, now)
    assert "run_trainer/checkpoint-4/model.safetensors" in [d.path for d in plan.deletions]
    digest = hashlib.sha256(elsewhere.read_bytes()).hexdigest()
    result = execute(plan)
    assert result.ok, result
    assert not os.path.lexists(target)
    assert hashlib.sha256(elsewhere.read_bytes()).hexdigest() == digest


def test_a_link_added_since_the_plan_is_reported_as_held_not_freed(trainer_root):
    root, outside, now = trainer_root
    plan = plan_of(root, now)
    _, target = _target(root)
    alloc = os.lstat(target).st_blocks * 512
    os.link(target, outside / "dedup-link")   # ctime changes, identity does not
    result = execute(plan)
    assert result.ok
    assert {d.path: d.bytes for d in result.deleted}["run_trainer/checkpoint-4/model.safetensors"] == 0
    assert result.held_bytes == alloc
    assert result.freed_bytes == plan.freed_bytes - alloc


def test_a_root_that_is_a_symlink_to_a_checkpoint_is_pruned(trainer_root, tmp_path):
    root, _, now = trainer_root
    link = tmp_path / "latest"
    os.symlink(root / "run_trainer/checkpoint-2", link)   # the user named it: it is followed
    plan = plan_of(link, now)
    assert [(d.checkpoint, d.relpath) for d in plan.deletions] == [(".", "model.safetensors")]
    result = execute(plan)
    assert result.ok, result
    assert not (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    assert os.path.islink(link)


def test_execute_reports_to_the_log_and_on_event(trainer_root, tmp_path):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    events = []
    with ActionLog(str(tmp_path / "log.jsonl")) as log:
        result = execute(plan, log=log, on_event=events.append)
    assert result.ok
    # from workers, events and log lines come as each checkpoint is done: in any order
    order = list if JOBS == 1 else sorted
    assert order((e.action, e.path) for e in events) == order(("delete", d.path) for d in plan.deletions)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert order(x["path"] for x in lines) == order(str(root / d.path) for d in plan.deletions)
    assert [d.path for d in result.deleted] == [d.path for d in plan.deletions]   # plan order


# ------------------------------------------------------------------ the command line

def test_no_terminal_and_no_yes_refuses_and_deletes_nothing(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    before = listing(root, dirs=True)
    proc = run_cli("prune", root)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--yes" in proc.stderr
    assert listing(root, dirs=True) == before       # not even a lock file


def test_on_a_terminal_it_asks_and_no_means_nothing_deleted(results_tree, tmp_path, monkeypatch):
    root = small_root(results_tree, tmp_path, "run_trainer")
    monkeypatch.setattr(cli_prune, "_stdin_is_terminal", lambda: True)
    res = CliRunner().invoke(cli, ["prune", "--no-progress", str(root)], input="n\n")
    assert res.exit_code == 0, res.output   # "n" is an answer, not a usage error
    assert (root / "run_trainer/checkpoint-2/model.safetensors").exists()
    res = CliRunner().invoke(cli, ["prune", "--no-progress", str(root)], input="y\n")
    assert res.exit_code == 0, res.output
    assert not (root / "run_trainer/checkpoint-2/model.safetensors").exists()


def test_dry_run_json_has_the_documented_shape(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer", "legacy_v1")
    proc = run_cli("prune", "--dry-run", "--json", root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"dry_run", "deleted", "skipped", "failed", "freed_bytes", "held_bytes", "retention"}
    assert doc["dry_run"] is True and doc["failed"] == []
    # no policy asked for: no decision, nothing in any trash
    assert doc["retention"]["decisions"] == [] and doc["retention"]["purge"] == []
    assert all(set(d) == {"path", "bytes"} and isinstance(d["bytes"], int) for d in doc["deleted"])
    assert all(set(s) == {"path", "reason"} for s in doc["skipped"])
    assert [d["path"] for d in doc["deleted"]] == ["run_trainer/checkpoint-2/model.safetensors",
                                                  "run_trainer/checkpoint-4/model.safetensors"]
    assert {s["path"] for s in doc["skipped"]} == {f"legacy_v1/checkpoint-{n}" for n in (100, 200, 300, 400)}
    assert all(s["reason"].startswith("legacy") for s in doc["skipped"])
    assert doc["freed_bytes"] == sum(d["bytes"] for d in doc["deleted"]) > 0


def test_several_roots_name_the_root_of_each_item(results_tree, tmp_path):
    a = small_root(results_tree, tmp_path / "a", "run_trainer")
    b = small_root(results_tree, tmp_path / "b", "seed_v3")
    proc = run_cli("prune", "--dry-run", "--json", a, b)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {(d["root"], d["path"]) for d in doc["deleted"]} == {
        (str(a), "run_trainer/checkpoint-2/model.safetensors"),
        (str(a), "run_trainer/checkpoint-4/model.safetensors"),
        (str(b), "seed_v3/checkpoint-100/model.safetensors")}


def test_exit_codes(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer", "seed_v4")
    assert run_cli("prune", "--yes", root).returncode == 0
    again = run_cli("prune", "--yes", root)              # nothing left to do
    assert again.returncode == 0 and "Nothing to delete" in again.stdout
    assert run_cli("prune", "--yes", tmp_path / "missing").returncode == 2
    nested = run_cli("prune", "--yes", root, root / "run_trainer")
    assert nested.returncode == 2 and "inside" in nested.stderr
    assert run_cli("prune", "--yes", "--min-age", "soon", root).returncode == 2


def test_a_change_between_plan_and_execute_exits_1(results_tree, tmp_path, monkeypatch):
    root = small_root(results_tree, tmp_path, "run_trainer")
    real = cli_prune.execute_prune
    target = root / "run_trainer/checkpoint-4/model.safetensors"

    def change_then_execute(plan, **kw):
        set_mtime_ns(target, os.lstat(target).st_mtime_ns + 1)
        return real(plan, **kw)

    monkeypatch.setattr(cli_prune, "execute_prune", change_then_execute)
    res = CliRunner().invoke(cli, ["prune", "--yes", "--json", str(root)])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [d["path"] for d in doc["deleted"]] == ["run_trainer/checkpoint-2/model.safetensors"]
    assert [s["path"] for s in doc["skipped"]] == ["run_trainer/checkpoint-4/model.safetensors"]
    assert target.exists()


def test_a_lock_file_symlinked_out_of_the_root_is_refused(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    outside = tmp_path / "outside-lock"
    os.symlink(outside, root / LOCK_NAME)
    proc = run_cli("prune", "--yes", root)
    assert proc.returncode == 2 and "symlink" in proc.stderr
    assert not os.path.lexists(outside)
    assert (root / "run_trainer/checkpoint-2/model.safetensors").exists()


# ------------------------------------------------------------------ the documented cron line

DOC = REPO / "README.md"


def doc_block(info: str) -> str:
    m = re.search(rf"^```{re.escape(info)}\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert m, f"README.md has no ```{info} block"
    return m.group(1)


def cron_command() -> str:
    lines = [line for line in doc_block("crontab").splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert len(fields) == 6, "five schedule fields, then the command"
    return fields[5]


def test_the_documented_crontab_line_prunes_a_copy_of_the_fixture_tree(results_tree, tmp_path):
    src, manifest, _ = results_tree
    root = copy_tree(src, tmp_path / "results")
    log = tmp_path / "log" / "prune.jsonl"    # its directory does not exist yet: prune makes it
    command = cron_command()
    for placeholder in ("/opt/ckpt-tools/.venv/bin/ckpt-tools", "/shared/results",
                        "/var/log/ckpt-tools/prune.jsonl"):
        assert placeholder in command
    command = (command.replace("/opt/ckpt-tools/.venv/bin/ckpt-tools", shlex.quote(ckpt_tools_exe()))
               .replace("/var/log/ckpt-tools/prune.jsonl", shlex.quote(str(log)))
               .replace("/shared/results", shlex.quote(str(root))))
    restamp_young(root, manifest)      # the CLI's clock: the young checkpoint stays in progress
    before = listing(root)
    # cron's environment: no terminal, a bare PATH, no venv activated
    proc = subprocess.run(["sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""    # cron mails nothing when all went well
    assert set(before) - set(listing(root)) == redundant_merged(manifest)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {x["path"] for x in lines if x["action"] == "delete"} == {str(root / m) for m in redundant_merged(manifest)}
    assert lines[-1]["action"] == "end" and lines[-1]["exit_code"] == 0


def test_the_systemd_service_runs_the_cron_command(tmp_path):
    service = doc_block("systemd-service")
    exec_start = re.search(r"^ExecStart=(.*)$", service, re.M).group(1)
    cron = cron_command()
    assert shlex.split(exec_start) == shlex.split(cron.replace(">/dev/null", ""))
    timer = doc_block("systemd-timer")
    assert re.search(r"^OnCalendar=", timer, re.M) and "WantedBy=timers.target" in timer


def test_the_systemd_service_makes_the_log_directory_the_command_writes_into():
    """``LogsDirectory=`` has systemd create /var/log/NAME before the start (writable under
    ``ProtectSystem=strict``): the --log of ExecStart must lie in it, and only the root need
    be named in ReadWritePaths."""
    settings = dict(line.split("=", 1) for line in doc_block("systemd-service").splitlines()
                    if "=" in line and not line.startswith("#"))
    logs_dir = settings["LogsDirectory"]
    assert logs_dir and not logs_dir.startswith("/")
    argv = shlex.split(settings["ExecStart"])
    log = argv[argv.index("--log") + 1]
    assert os.path.dirname(log) == f"/var/log/{logs_dir}"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"].split() == [argv[-1]]   # the root; the logs dir is implied
