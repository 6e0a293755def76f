"""``prune`` with a retention policy, end to end through the CLI, on copies of real Trainer runs:
the dry run promises what the real run does, deletes go to the trash and come back, strips keep
a usable checkpoint, pins hold, and usage errors are refused before anything is touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_tools import layout

REPO = Path(__file__).resolve().parents[1]
TRASH = layout.TRASH_DIR


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def allocated(path: Path) -> int:
    """Allocated bytes under ``path``, hard links counted once (what `du` counts)."""
    seen, total = set(), 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


@pytest.fixture()
def runs(ordinary_runs, tmp_path) -> Path:
    """A copy of a few ordinary runs (checkpoint-2, -4, -6 and final/ each), old enough."""
    root, _ = ordinary_runs
    dst = tmp_path / "runs"
    for run in ("peft-lora", "full", "best"):
        shutil.copytree(root / run, dst / run)
    old = time.time() - 3 * 86400
    for p in dst.rglob("*"):
        os.utime(p, (old, old), follow_symlinks=False)
    return dst


def live(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))


def trash(run: Path) -> list[str]:
    t = run / TRASH
    return sorted(p.name.split(".deleted-")[0] for p in t.iterdir() if ".deleted-" in p.name) if t.exists() else []


def test_the_dry_run_says_exactly_what_the_real_run_does(runs):
    dry = run_cli("prune", "--dry-run", "--json", "--keep-last", "1", "--delete", runs)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["retention"]
    decided = {d["path"]: (d["action"], d["reasons"]) for d in plan["decisions"]}
    assert decided["full/checkpoint-6"] == ("keep", ["last #1", "pinned: newest"])
    assert decided["full/checkpoint-2"] == ("delete", ["not kept by any rule"])
    # the best checkpoint of a load_best_model_at_end run is pinned by name
    assert decided["best/checkpoint-2"][0] == "keep" and "pinned: best_model_checkpoint" in decided["best/checkpoint-2"][1]
    assert not any(p.startswith(("full/final", "best/final")) for p in decided)   # no step: not decided on
    deleted = sorted(p for p, (a, _) in decided.items() if a == "delete")
    promised = {d["path"]: d["frees_bytes_when_purged"] for d in plan["decisions"] if d["action"] == "delete"}
    sizes = {p: allocated(runs / p) for p in deleted}
    assert promised == sizes and plan["frees_bytes_when_purged"] == sum(sizes.values())
    assert all(live(runs / r) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] for r in ("full", "peft-lora"))

    real = run_cli("prune", "--yes", "--json", "--keep-last", "1", "--delete", runs)
    assert real.returncode == 0, real.stderr
    done = json.loads(real.stdout)["retention"]
    assert sorted(t["path"] for t in done["trashed"]) == deleted
    assert done["freed_bytes_when_purged"] == sum(sizes.values()) and done["freed_bytes_now"] == 0
    assert live(runs / "full") == ["checkpoint-6"] and trash(runs / "full") == ["checkpoint-2", "checkpoint-4"]
    assert live(runs / "best") == ["checkpoint-2", "checkpoint-6"]
    # audit sees only what is left, never the trash
    audit = json.loads(run_cli("audit", "--json", runs).stdout)
    assert sorted(c["path"] for c in audit["checkpoints"] if c["step"] is not None) == [
        "best/checkpoint-2", "best/checkpoint-6", "full/checkpoint-6", "peft-lora/checkpoint-6"]


def test_the_trash_is_purged_after_the_grace_period_or_at_once_and_restore_brings_one_back(runs):
    assert run_cli("prune", "--yes", "--keep-last", "1", "--delete", runs / "full").returncode == 0
    entries = sorted((runs / "full" / TRASH).iterdir())
    assert len(entries) == 2
    # a plain prune within the grace period purges nothing
    assert run_cli("prune", "--yes", runs / "full").returncode == 0
    assert len(list((runs / "full" / TRASH).iterdir())) == 2
    restored = run_cli("restore", entries[0])
    assert restored.returncode == 0, restored.stderr
    assert live(runs / "full") == ["checkpoint-2", "checkpoint-6"]
    before = allocated(runs / "full" / TRASH)
    proc = run_cli("prune", "--yes", "--json", "--purge-now", runs / "full")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)["retention"]
    assert [p["path"] for p in done["purged"]] == [f"{TRASH}/{entries[1].name}"]
    assert done["freed_bytes_now"] == before - 0 and trash(runs / "full") == []
    assert live(runs / "full") == ["checkpoint-2", "checkpoint-6"]     # purge never touches the live run


def test_a_trash_entry_older_than_purge_after_goes_with_any_prune(runs):
    assert run_cli("prune", "--yes", "--keep-last", "2", "--delete", runs / "full").returncode == 0
    (entry,) = (runs / "full" / TRASH).iterdir()
    assert run_cli("prune", "--yes", "--purge-after", "1d", runs / "full").returncode == 0
    assert entry.exists()                                    # deleted just now: waits
    old = entry.with_name(entry.name.replace(entry.name.split(".deleted-")[1], "20200101T000000Z"))
    entry.rename(old)
    proc = run_cli("prune", "--yes", "--purge-after", "1d", runs / "full")
    assert proc.returncode == 0, proc.stderr
    assert not old.exists()


def test_strip_keeps_a_usable_checkpoint_and_audit_says_it_cannot_resume(runs):
    proc = run_cli("prune", "--yes", "--json", "--keep-last", "1", "--strip", runs / "full")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)["retention"]
    assert sorted(s["path"] for s in done["stripped"]) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        ck = runs / "full" / f"checkpoint-{step}"
        names = {p.name for p in ck.iterdir()}
        assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
        assert {"model.safetensors", "config.json", "trainer_state.json", layout.STRIP_MARKER} <= names
    assert (runs / "full" / "checkpoint-6" / "optimizer.pt").exists()
    audit = {c["path"]: c for c in json.loads(run_cli("audit", "--json", runs / "full").stdout)["checkpoints"]}
    assert audit["checkpoint-2"]["status"] == "healthy" and audit["checkpoint-2"]["resumable"] is False
    assert audit["checkpoint-6"]["resumable"] is True
    assert sum(s["bytes"] for s in done["stripped"]) == done["freed_bytes_now"] > 0


def test_fresh_checkpoints_are_pinned_and_untouched(runs):
    for p in (runs / "full").rglob("*"):
        os.utime(p, follow_symlinks=False)                   # written just now
    before = live(runs / "full")
    proc = run_cli("prune", "--yes", "--json", "--keep-last", "1", "--delete", runs / "full")
    assert proc.returncode == 0, proc.stderr
    decided = {d["path"]: d for d in json.loads(proc.stdout)["retention"]["decisions"]}
    assert all("pinned: fresh" in d["reasons"] for p, d in decided.items() if p != "checkpoint-6")
    assert live(runs / "full") == before and trash(runs / "full") == []


def test_user_pins_by_step_and_by_keep_file(runs):
    (runs / "full" / "checkpoint-4" / layout.KEEP_FILE).write_text("")
    proc = run_cli("prune", "--yes", "--json", "--keep-last", "1", "--keep-step", "2", "--delete", runs / "full")
    assert proc.returncode == 0, proc.stderr
    decided = {d["path"]: d for d in json.loads(proc.stdout)["retention"]["decisions"]}
    assert "pinned: user" in decided["checkpoint-2"]["reasons"] and "pinned: user" in decided["checkpoint-4"]["reasons"]
    assert live(runs / "full") == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_policy_file_with_tiers(runs, tmp_path):
    policy = tmp_path / "retention.toml"
    policy.write_text('rest = "delete"\n\n[[tier]]\naction = "keep"\nkeep_last = 1\n\n'
                      '[[tier]]\naction = "strip"\nkeep_every = 4\n')
    proc = run_cli("prune", "--yes", "--json", "--policy", policy, runs / "full")
    assert proc.returncode == 0, proc.stderr
    decided = {d["path"]: (d["action"], d["reasons"]) for d in json.loads(proc.stdout)["retention"]["decisions"]}
    assert decided == {"checkpoint-2": ("delete", ["not kept by any rule"]),
                       "checkpoint-4": ("strip", ["every 4"]),
                       "checkpoint-6": ("keep", ["last #1", "pinned: newest"])}
    assert live(runs / "full") == ["checkpoint-4", "checkpoint-6"] and trash(runs / "full") == ["checkpoint-2"]
    assert not (runs / "full" / "checkpoint-4" / "optimizer.pt").exists()


@pytest.mark.parametrize("args, words", [
    (["--delete"], "--delete needs a rule"),
    (["--strip"], "--strip needs a rule"),
    (["--keep-last", "2"], "needs an action"),
    (["--keep-step", "2"], "--keep-step"),
    (["--keep-last", "1", "--delete", "--policy", "p.toml"], "give one"),
])
def test_usage_errors_touch_nothing(runs, args, words):
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    proc = run_cli("prune", "--yes", *args, runs)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before


def test_the_log_has_a_line_per_retention_action(runs, tmp_path):
    log = tmp_path / "prune.jsonl"
    assert run_cli("prune", "--yes", "--keep-last", "1", "--strip", "--log", log, runs / "peft-lora").returncode == 0
    assert run_cli("prune", "--yes", "--keep-last", "1", "--delete", "--purge-now", "--log", log,
                   runs / "full").returncode == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    actions = sorted((x["action"], Path(x["path"]).name.split(".deleted-")[0]) for x in lines
                     if x["action"] in ("strip", "trash", "purge"))
    assert actions == [("purge", "checkpoint-2"), ("purge", "checkpoint-4"),
                       ("strip", "checkpoint-2"), ("strip", "checkpoint-4"),
                       ("trash", "checkpoint-2"), ("trash", "checkpoint-4")]
    assert all(x["bytes"] > 0 for x in lines if x["action"] in ("strip", "trash", "purge"))
