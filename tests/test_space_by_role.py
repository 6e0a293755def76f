"""audit shows where the space is: bytes by role and by owner, per run and in total.

Every figure is checked against what the disk says, worked out here without the library: the
files of each checkpoint by ``os.walk`` and ``lstat`` (``st_blocks * 512``, each inode once, in
the role of its first link), each file's role from its name as the README documents it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_tools
from ckpt_tools.report import render_audit, size_str

REPO = Path(__file__).resolve().parents[1]
ROLES = ("weights", "adapters", "redundant_merged", "training_state", "trash", "other")
TRASH = ".ckpt-tools-trash"

# The names of the README's roles, spelled here rather than asked of ckpt_tools.layout.
_MERGED = re.compile(r"^(model\.safetensors|pytorch_model\.bin|dylo_moe_weights\.pt"
                     r"|(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)"
                     r"|(model\.safetensors|pytorch_model\.bin)\.index\.json)$")
_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}


def expected_role(relpath: str, status: str, model_kind: str) -> str:
    parts = relpath.split("/")
    top, name = parts[0], parts[-1]
    if len(parts) == 1:
        if name in ("optimizer.pt", "scheduler.pt", "scaler.pt") \
                or re.match(r"^rng_state(_\d+)?\.pth$", name):
            return "training_state"
        if _MERGED.match(name):
            return "redundant_merged" if status == "redundant" else "weights"
        if name in _ADAPTER_FILES | {"router.safetensors", "trainable_state.safetensors"} \
                or re.match(r"^expert_\d+\.pt$", name):
            return "adapters"
        return "other"
    if re.match(r"^global_step\d+$", top):   # ZeRO-3 without gathered weights: the only copy
        return "weights" if model_kind == "deepspeed" else "training_state"
    if re.match(r"^optimizer_\d+$", top):
        return "training_state"
    if re.match(r"^pytorch_model_fsdp_\d+$", top):
        return "weights"
    if top in ("peft_adapters", "dylo_moe_state"):
        return "adapters"
    if len(parts) == 2 and name in _ADAPTER_FILES:   # a named adapter in <name>/
        return "adapters"
    return "other"


def files_under(directory: Path, skip: set[Path]) -> list[tuple[str, os.stat_result]]:
    """(relpath, lstat) of every file under ``directory``, by relpath; directories in ``skip``
    (checkpoints of their own, the trash) are not entered; no link is followed."""
    out = []
    for here, dirs, files in os.walk(directory):
        here = Path(here)
        for d in list(dirs):
            p = here / d
            if p.is_symlink():
                files.append(d)   # a link to a directory is a file of its own
            if p.is_symlink() or p in skip or d == TRASH:
                dirs.remove(d)
        for f in files:
            if f == ".ckpt-tools.lock":
                continue
            p = here / f
            out.append((p.relative_to(directory).as_posix(), os.lstat(p)))
    return sorted(out)


def owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Tally:
    def __init__(self):
        self.seen: set[tuple[int, int]] = set()
        self.roles = dict.fromkeys(ROLES, 0)
        self.owners: dict[str, int] = {}

    def add(self, st: os.stat_result, role: str) -> None:
        if (st.st_dev, st.st_ino) in self.seen:
            return
        self.seen.add((st.st_dev, st.st_ino))
        self.roles[role] += st.st_blocks * 512
        name = owner(st.st_uid)
        self.owners[name] = self.owners.get(name, 0) + st.st_blocks * 512


def expected_space(doc: dict) -> tuple[dict[str, Tally], Tally]:
    """Per run path and in total, from the disk and the statuses of ``doc`` (audit's JSON)."""
    where = {c["path"]: Path(c["root"]) / c["path"] for c in doc["checkpoints"]}
    checkpoint_dirs = {p.resolve() for p in where.values()}
    runs = {r["path"]: Tally() for r in doc["runs"]}
    total = Tally()
    for c in doc["checkpoints"]:
        d = where[c["path"]]
        for rel, st in files_under(d, checkpoint_dirs - {d.resolve()}):
            role = expected_role(rel, c["status"], c["model_kind"])
            runs[c["run"]].add(st, role)
            total.add(st, role)
    for r in doc["runs"]:   # after every checkpoint: a link into the trash counts where it is live
        trash = Path(r["root"]) / r["path"] / TRASH
        if trash.is_dir():
            for _, st in files_under(trash, set()):
                runs[r["path"]].add(st, "trash")
                total.add(st, "trash")
    return runs, total


def audit_doc(root: Path, now: float | None = None) -> dict:
    return ckpt_tools.scan(str(root), now=now, min_age_s=0).to_dict()


def assert_space_matches_the_disk(doc: dict) -> None:
    runs, total = expected_space(doc)
    totals = doc["totals"]
    assert totals["bytes_by_role"] == total.roles
    assert totals["bytes_by_owner"] == total.owners
    for r in doc["runs"]:
        assert r["bytes_by_role"] == runs[r["path"]].roles, r["path"]
        assert r["bytes_by_owner"] == runs[r["path"]].owners, r["path"]
    # the identities the README states
    roles = totals["bytes_by_role"]
    assert sum(roles.values()) - roles["trash"] == totals["size_bytes"]
    assert sum(totals["bytes_by_owner"].values()) == sum(roles.values())


def test_bytes_by_role_of_the_fixture_tree_are_what_the_disk_holds(results_tree):
    root, _, now = results_tree
    doc = audit_doc(root, now)
    assert_space_matches_the_disk(doc)
    roles = doc["totals"]["bytes_by_role"]
    assert all(roles[r] > 0 for r in ROLES if r != "trash"), roles
    # prune frees exactly the redundant merged weights (no redundant checkpoint is fresh here)
    assert roles["redundant_merged"] == doc["totals"]["reclaimable_bytes"]
    # training state is what each checkpoint reports as its training_state_bytes
    assert roles["training_state"] == sum(c["training_state_bytes"] for c in doc["checkpoints"])


def test_bytes_by_role_of_ordinary_runs_are_what_the_disk_holds(ordinary_runs):
    root, _ = ordinary_runs
    doc = audit_doc(root)
    assert_space_matches_the_disk(doc)
    by_run = {r["path"]: r["bytes_by_role"] for r in doc["runs"]}
    # ZeRO-3 state without gathered weights is the model: weights, not training state
    assert by_run["deepspeed-zero3"]["weights"] > 0
    assert by_run["deepspeed"]["training_state"] > by_run["deepspeed-zero3"]["training_state"]
    assert by_run["fsdp"]["weights"] > 0 and by_run["fsdp"]["training_state"] > 0
    assert by_run["peft-two-adapters"]["adapters"] > 0 and by_run["peft-two-adapters"]["weights"] == 0


def test_a_file_hard_linked_into_two_checkpoints_counts_once(ordinary_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(ordinary_runs[0] / "full", root / "full", symlinks=True)
    before = audit_doc(root)
    second = root / "full" / "checkpoint-4" / "optimizer.pt"
    freed = os.lstat(second).st_blocks * 512
    assert freed > 0
    second.unlink()
    os.link(root / "full" / "checkpoint-2" / "optimizer.pt", second)

    after = audit_doc(root)
    assert_space_matches_the_disk(after)
    for doc_before, doc_after in ((before["totals"], after["totals"]),
                                  (before["runs"][0], after["runs"][0])):
        assert (doc_after["bytes_by_role"]["training_state"]
                == doc_before["bytes_by_role"]["training_state"] - freed)
    assert after["totals"]["size_bytes"] == before["totals"]["size_bytes"] - freed


def test_the_trash_of_a_run_is_sized_and_no_checkpoint(results_tree, tmp_path):
    src, _, now = results_tree
    root = tmp_path / "results"
    shutil.copytree(src / "run_trainer", root / "run_trainer", symlinks=True)
    run = root / "run_trainer"
    before = audit_doc(root, now)
    trash = run / TRASH
    trash.mkdir()
    (run / "checkpoint-2").rename(trash / "checkpoint-2.deleted-20250101T000000Z")  # as --delete does
    # a link in the trash to a live checkpoint's file frees nothing when purged: not trash
    os.link(run / "checkpoint-4" / "optimizer.pt", trash / "linked-optimizer.pt")

    doc = audit_doc(root, now)
    assert [c["path"] for c in doc["checkpoints"]] == ["run_trainer/checkpoint-4"]
    assert_space_matches_the_disk(doc)
    deleted = trash / "checkpoint-2.deleted-20250101T000000Z"
    trashed = sum(st.st_blocks * 512 for _, st in files_under(deleted, set()))
    roles = doc["totals"]["bytes_by_role"]
    assert roles["trash"] == trashed > 0
    assert doc["runs"][0]["bytes_by_role"]["trash"] == trashed
    assert roles["trash"] + doc["totals"]["size_bytes"] == before["totals"]["size_bytes"]

    lines = render_audit(ckpt_tools.scan(str(root), now=now, min_age_s=0))
    space_lines = [ln for ln in lines if ln.lstrip().startswith("space:")]
    assert len(space_lines) == 2   # the run's, then the total's above the footer
    assert f"trash {size_str(trashed)}" in space_lines[0] and f"trash {size_str(trashed)}" in space_lines[1]
    assert lines[-2].startswith("owners: ") and "checkpoint" in lines[-1]


def test_a_trash_that_cannot_be_listed_is_a_problem_not_a_traceback(results_tree, tmp_path,
                                                                    private_unlistable):
    src, _, now = results_tree
    root = tmp_path / "results"
    shutil.copytree(src / "run_trainer", root / "run_trainer", symlinks=True)
    (root / "run_trainer" / TRASH / "checkpoint-2.deleted-private").mkdir(parents=True)
    result = ckpt_tools.scan(str(root), now=now, min_age_s=0)
    assert [(p.code, p.path) for p in result.problems] == [
        ("permission-denied", f"run_trainer/{TRASH}/checkpoint-2.deleted-private")]
    assert result.to_dict()["totals"]["bytes_by_role"]["trash"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_bytes_by_owner_name_each_user(ordinary_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(ordinary_runs[0] / "full", root / "full", symlinks=True)
    nameless = next(uid for uid in range(54321, 60000) if owner(uid) == str(uid))
    named = pwd.getpwnam("nobody").pw_uid
    for ckpt, uid in (("checkpoint-2", nameless), ("checkpoint-4", named)):
        for p in (root / "full" / ckpt).rglob("*"):
            os.lchown(p, uid, -1)
    doc = audit_doc(root)
    assert_space_matches_the_disk(doc)
    owners = doc["totals"]["bytes_by_owner"]
    assert owners[str(nameless)] > 0 and owners["nobody"] > 0 and owners[owner(os.geteuid())] > 0
    assert doc["runs"][0]["bytes_by_owner"] == owners


def test_quiet_audit_prints_the_footer_alone(results_tree):
    root, _, _ = results_tree
    proc = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", "audit", "-q", "--no-progress",
                           str(root)], capture_output=True, text=True, cwd=REPO)
    assert len(proc.stdout.splitlines()) == 1 and "space:" not in proc.stdout
    assert "checkpoints in" in proc.stdout
