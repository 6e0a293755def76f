"""--strip: the training state of a checkpoint removed, its model kept and usable, the strip
visible to audit (a marker written first, rewritten last) and finished after a crash.

On real checkpoints: the ordinary Trainer runs (``ordinary_runs``) and the DyLoRA-MoE tree
(``results_tree``); every test strips a private copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_tools import api, layout
from ckpt_tools.kinds import Status
from ckpt_tools.problems import STRIP_INTERRUPTED
from ckpt_tools.prune.execute import Revalidator
from ckpt_tools.retention.strip import Refusal, StripPlan, execute_strip, strip_plan
from ckpt_tools.retention.strip_marker import STRIPPED, STRIPPING, read_marker
from tests.faulty_fs import FaultyFileOps

NOW = 1_900_000_000.0          # what the marker is dated by: the same in every run compared
REVALIDATE = Revalidator(min_age_s=0, prove=False)
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def _copy(src: Path, dst_root: Path, rel: str) -> Path:
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / rel, dst, symlinks=True)
    return dst


def _checkpoint(root: Path, rel: str, **kw):
    found = {c.path: c for c in api.scan(str(root), min_age_s=kw.pop("min_age_s", 0), **kw).checkpoints}
    return found[rel]


def _allocated(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.lstat().st_blocks * 512
            for p in path.rglob("*") if not p.is_dir() or p.is_symlink()}


def _state(ckpt: Path) -> dict:
    """What a strip leaves: every entry (files by content, directories by name), the marker's
    content and the checkpoint directory's mtime."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        rel = str(p.relative_to(ckpt))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    out["<mtime>"] = ckpt.stat().st_mtime_ns
    return out


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])


def _strip(root: Path, rel: str, fs=None):
    plan = strip_plan(_checkpoint(root, rel))
    return plan, execute_strip(fs, str(root), plan, now=NOW, revalidate=REVALIDATE)


# --- what goes and what stays -------------------------------------------------------

@pytest.mark.parametrize("rel", ["full/checkpoint-2", "peft-lora/checkpoint-2", "sharded/checkpoint-2"])
def test_strip_removes_the_training_state_and_keeps_the_model(ordinary_runs, tmp_path, rel):
    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, rel)
    before = _allocated(ckpt)
    mtime = ckpt.stat().st_mtime_ns
    plan, out = _strip(tmp_path, rel)

    assert isinstance(plan, StripPlan) and out.complete, out
    after = _allocated(ckpt)
    gone = set(before) - set(after)
    assert gone == {r for r in before if layout.is_resume_only(r)} and {"optimizer.pt", "scheduler.pt"} <= gone
    assert set(after) - set(before) == {layout.STRIP_MARKER}
    assert plan.freed_bytes == sum(before[r] for r in gone)
    # what the outcome says left the disk is what left it: the marker's own block counted
    assert out.marker_bytes == after[layout.STRIP_MARKER] > 0
    assert out.freed_bytes == sum(before.values()) - sum(after.values())
    kept = set(before) - gone
    assert {"trainer_state.json", "training_args.bin"} <= kept
    assert {r for r in kept if layout.role_of(r).holds_model or layout.is_merged_name(r)}   # weights stay
    assert ckpt.stat().st_mtime_ns == mtime          # the Trainer's rotation sees no change
    marker = read_marker(str(ckpt / layout.STRIP_MARKER))
    assert marker.state == STRIPPED and dict(marker.files) == {r: before[r] for r in gone}


def test_audit_shows_a_stripped_checkpoint_healthy_and_not_resumable(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, "full/checkpoint-4")
    _copy(src, tmp_path, "full/checkpoint-6")
    before = _checkpoint(tmp_path, "full/checkpoint-4")
    assert before.resumable and before.to_dict()["resumable"] is True
    _strip(tmp_path, "full/checkpoint-4")

    doc = json.loads(_cli("audit", "--json", "--min-age", "0", tmp_path).stdout)
    by = {c["path"]: c for c in doc["checkpoints"]}
    assert by["full/checkpoint-4"]["status"] == "healthy" and by["full/checkpoint-4"]["problems"] == []
    assert by["full/checkpoint-4"]["resumable"] is False and by["full/checkpoint-4"]["training_state_bytes"] == 0
    assert by["full/checkpoint-6"]["resumable"] is True
    text = _cli("audit", "--min-age", "0", tmp_path)
    assert text.returncode == 0, text.stderr
    row = next(line for line in text.stdout.splitlines() if "checkpoint-4" in line)
    assert "healthy (stripped)" in row
    full = _cli("validate", "--min-age", "0", ckpt)
    assert full.returncode == 0, full.stdout + full.stderr


def test_stripped_full_model_still_loads_for_inference(ordinary_runs, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, "full/checkpoint-2")
    _, out = _strip(tmp_path, "full/checkpoint-2")
    assert out.complete and not (ckpt / "optimizer.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    saved = load_file(ckpt / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_stripped_peft_adapter_still_loads(ordinary_runs, tmp_path):
    import torch
    from peft import PeftConfig
    from safetensors.torch import load_file

    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, "peft-lora/checkpoint-2")
    _, out = _strip(tmp_path, "peft-lora/checkpoint-2")
    assert out.complete and not (ckpt / "optimizer.pt").exists()
    assert PeftConfig.from_pretrained(ckpt).peft_type == "LORA"
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_deepspeed_state_goes_where_the_consolidated_weights_are_there(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    rel = "deepspeed/checkpoint-2"
    ckpt = _copy(src, tmp_path, rel)
    before = _allocated(ckpt)
    plan, out = _strip(tmp_path, rel)
    assert out.complete
    assert not list(ckpt.glob("global_step*")) and not list(ckpt.glob("rng_state_*.pth"))
    assert (ckpt / "model.safetensors").exists() and (ckpt / "latest").exists()
    after = _allocated(ckpt)
    assert out.freed_bytes == sum(before.values()) - sum(after.values())
    assert out.marker_bytes == after[layout.STRIP_MARKER]
    # `latest` names the tag the strip removed: expected, not a broken checkpoint
    for level in ("headers", "full"):
        c = _checkpoint(tmp_path, rel, level=level)
        assert c.status is Status.HEALTHY and c.problems == () and not c.resumable


def test_dylora_checkpoint_keeps_its_peft_tree_and_merged_weights(results_tree, tmp_path):
    root, _, now = results_tree
    scan = api.scan(str(root), now=now)
    c = next(c for c in scan.checkpoints if c.status is Status.REDUNDANT and c.dir.file("optimizer.pt"))
    ckpt = _copy(root, tmp_path, c.path)
    before = _allocated(ckpt)
    plan = strip_plan(_checkpoint(tmp_path, c.path, now=now, min_age_s=3600))
    out = execute_strip(None, str(tmp_path), plan, now=NOW,
                        revalidate=Revalidator(min_age_s=3600, clock=lambda: now, prove=False))
    assert out.complete, out
    after = _allocated(ckpt)
    assert set(before) - set(after) == {r for r in before if layout.is_resume_only(r)}
    again = _checkpoint(tmp_path, c.path, now=now, min_age_s=3600)
    assert again.status is Status.REDUNDANT and again.merged_files == c.merged_files
    assert not again.resumable and again.stripped


# --- refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("rel, says", [
    ("deepspeed-zero3/checkpoint-2", "only copy of the model"),
    ("fsdp/checkpoint-2", "no consolidated weights"),
    ("full-truncated-model/checkpoint-6", "broken"),
    ("peft-lora-interrupted/tmp-checkpoint-6", "in-progress"),
])
def test_refused_checkpoints_are_untouched(ordinary_runs, tmp_path, rel, says):
    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, rel)
    before = _state(ckpt)
    plan = strip_plan(_checkpoint(tmp_path, rel))
    assert isinstance(plan, Refusal) and says in plan.reason
    out = execute_strip(None, str(tmp_path), plan, now=NOW)
    assert out.refused == plan.reason and not out.complete and _state(ckpt) == before


def test_fresh_and_already_stripped_checkpoints_are_refused(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    rel = "full/checkpoint-2"
    ckpt = _copy(src, tmp_path, rel)
    os.utime(ckpt / "scheduler.pt")       # a file younger than --min-age
    assert "fresh" in strip_plan(_checkpoint(tmp_path, rel, min_age_s=3600)).reason
    # the plan was made before the file changed age: the re-validation refuses it too
    plan = strip_plan(_checkpoint(tmp_path, rel))
    out = execute_strip(None, str(tmp_path), plan, now=NOW,
                        revalidate=Revalidator(min_age_s=3600, prove=False))
    assert "fresh" in out.refused and (ckpt / "optimizer.pt").exists()
    assert not (ckpt / layout.STRIP_MARKER).exists()
    _strip(tmp_path, rel)
    assert strip_plan(_checkpoint(tmp_path, rel)).reason.startswith("stripped already")


def test_the_marker_never_makes_a_checkpoint_young(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    rel = "full/checkpoint-2"
    ckpt = _copy(src, tmp_path, rel)
    old = time.time() - 2 * 86400
    for p in ckpt.rglob("*"):
        os.utime(p, (old, old))
    c = _checkpoint(tmp_path, rel, min_age_s=3600)
    assert not c.fresh
    plan = strip_plan(c)
    out = execute_strip(None, str(tmp_path), plan, now=time.time(),
                        revalidate=Revalidator(min_age_s=3600, prove=False))
    assert out.complete and (ckpt / layout.STRIP_MARKER).stat().st_mtime > old + 86400
    again = _checkpoint(tmp_path, rel, min_age_s=3600)
    assert not again.fresh and again.status is Status.HEALTHY
    assert again.dir.newest_mtime_ns <= c.dir.newest_mtime_ns


# --- hard links and changes since the plan ------------------------------------------

def test_a_file_linked_elsewhere_frees_nothing_and_its_other_link_stays(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    ckpt = _copy(src, tmp_path, "full/checkpoint-2")
    keep = tmp_path / "elsewhere-optimizer.pt"
    os.link(ckpt / "optimizer.pt", keep)
    plan, out = _strip(tmp_path, "full/checkpoint-2")
    by = {f.relpath: f for f in plan.files}
    assert by["optimizer.pt"].frees_bytes == 0 and by["optimizer.pt"].other_links == 1
    assert dict(out.removed)["optimizer.pt"] == 0
    assert keep.exists() and keep.stat().st_nlink == 1


def test_files_linked_to_one_another_are_credited_once(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    rel = "deepspeed/checkpoint-2"
    ckpt = _copy(src, tmp_path, rel)
    os.unlink(ckpt / "rng_state_1.pth")
    os.link(ckpt / "rng_state_0.pth", ckpt / "rng_state_1.pth")   # a dedup tool's work
    blocks = (ckpt / "rng_state_0.pth").stat().st_blocks * 512
    plan, out = _strip(tmp_path, rel)
    credited = [f.frees_bytes for f in plan.files if f.relpath.startswith("rng_state_")]
    assert sorted(credited) == [0, blocks]
    assert sorted(b for r, b in out.removed if r.startswith("rng_state_")) == [0, blocks]


def test_a_file_changed_since_the_plan_is_skipped_and_the_strip_left_visible(ordinary_runs, tmp_path):
    src, _ = ordinary_runs
    rel = "full/checkpoint-2"
    ckpt = _copy(src, tmp_path, rel)
    plan = strip_plan(_checkpoint(tmp_path, rel))
    st = (ckpt / "scheduler.pt").stat()               # written again after the plan
    os.utime(ckpt / "scheduler.pt", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    out = execute_strip(None, str(tmp_path), plan, now=NOW, revalidate=REVALIDATE)
    assert not out.complete and [r for r, _ in out.skipped] == ["scheduler.pt"]
    assert (ckpt / "scheduler.pt").exists() and not (ckpt / "optimizer.pt").exists()
    assert read_marker(str(ckpt / layout.STRIP_MARKER)).state == STRIPPING
    c = _checkpoint(tmp_path, rel)
    assert c.status is Status.HEALTHY and [p.code for p in c.problems] == [STRIP_INTERRUPTED]
    shown = _cli("validate", "--min-age", "0", ckpt)
    assert shown.returncode == 0 and STRIP_INTERRUPTED in shown.stdout
    assert layout.STRIP_MARKER in shown.stdout and "next prune" in shown.stdout
    table = _cli("audit", "--min-age", "0", tmp_path).stdout
    assert "healthy (strip interrupted)" in table
    # the next strip finishes it, the file as it is now
    _, out = _strip(tmp_path, rel)
    assert out.complete and [r for r, _ in out.removed] == ["scheduler.pt"]
    marker = read_marker(str(ckpt / layout.STRIP_MARKER))
    assert marker.state == STRIPPED and {r for r, _ in marker.files} == {
        "optimizer.pt", "rng_state.pth", "scheduler.pt"}
    assert _checkpoint(tmp_path, rel).problems == ()


# --- crashes and faults: whole or visibly interrupted, then finished -----------------

_KILLS = ["after_write:1", "before_rename:1", "after_rename:1", "after_unlink:1", "after_unlink:3",
          "after_unlink:5", "after_write:2", "before_rename:2", "after_rename:2"]
_ERRORS = ["eio@remove:1", "eio@remove:4", "eio@remove:6", "enospc@write:1", "enospc@write:2",
           "eio@fsync:1", "eio@fsync:3"]


@pytest.fixture(scope="module")
def uninterrupted(ordinary_runs, tmp_path_factory):
    src, _ = ordinary_runs
    root = tmp_path_factory.mktemp("uninterrupted")
    ckpt = _copy(src, root, "deepspeed/checkpoint-4")
    _, out = _strip(root, "deepspeed/checkpoint-4")
    assert out.complete
    return _state(ckpt)


def _whole_or_interrupted(root: Path, rel: str, original: dict) -> None:
    ckpt = root / rel
    c = _checkpoint(root, rel)
    assert c.status is Status.HEALTHY, c.problems
    if (ckpt / layout.STRIP_MARKER).exists():
        marker = read_marker(str(ckpt / layout.STRIP_MARKER))
        codes = [p.code for p in c.problems]
        assert codes == ([] if marker.state == STRIPPED else [STRIP_INTERRUPTED])
    else:   # nothing was removed: the checkpoint is as it was, but for a marker's temporary
        now = {k: v for k, v in _state(ckpt).items()
               if not k.startswith(layout.STRIP_MARKER_TMP_PREFIX) and k != "<mtime>"}
        assert now == {k: v for k, v in original.items() if k != "<mtime>"}
        assert c.problems == ()


@pytest.mark.parametrize("spec", _KILLS)
def test_a_strip_killed_at_any_point_is_finished_by_the_next(ordinary_runs, tmp_path, uninterrupted, spec):
    src, _ = ordinary_runs
    rel = "deepspeed/checkpoint-4"
    ckpt = _copy(src, tmp_path, rel)
    original = _state(ckpt)
    plan = strip_plan(_checkpoint(tmp_path, rel))
    pid = os.fork()
    if pid == 0:   # the child dies at the fault point (SIGKILL), or exits 3 where it never came
        try:
            execute_strip(FaultyFileOps(spec), str(tmp_path), plan, now=NOW, revalidate=REVALIDATE)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"{spec}: the fault point was never reached"
    _whole_or_interrupted(tmp_path, rel, original)
    again = strip_plan(_checkpoint(tmp_path, rel))
    if isinstance(again, StripPlan):
        out = execute_strip(None, str(tmp_path), again, now=NOW, revalidate=REVALIDATE)
        assert out.complete, out
    if spec == "after_rename:2":
        # killed between the final marker's rename and setting the directory's times back:
        # stripped, but the directory's mtime is the strip's (the one window left; README)
        assert {**_state(ckpt), "<mtime>": 0} == {**uninterrupted, "<mtime>": 0}
    else:
        assert _state(ckpt) == uninterrupted


@pytest.mark.parametrize("spec", _ERRORS)
def test_a_strip_that_fails_is_reported_and_finished_by_the_next(ordinary_runs, tmp_path, uninterrupted, spec):
    src, _ = ordinary_runs
    rel = "deepspeed/checkpoint-4"
    ckpt = _copy(src, tmp_path, rel)
    original = _state(ckpt)
    plan = strip_plan(_checkpoint(tmp_path, rel))
    out = execute_strip(FaultyFileOps(spec), str(tmp_path), plan, now=NOW, revalidate=REVALIDATE)
    assert not out.complete and (out.refused or out.failed), out
    _whole_or_interrupted(tmp_path, rel, original)
    again = strip_plan(_checkpoint(tmp_path, rel))
    out = execute_strip(None, str(tmp_path), again, now=NOW, revalidate=REVALIDATE)
    assert out.complete, out
    assert _state(ckpt) == uninterrupted
