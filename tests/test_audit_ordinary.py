"""Issue 15 end to end: every checkpoint an ordinary transformers Trainer writes, judged through the CLI.

The expectations come from the ordinary runs' manifest (fixtures/ordinary_runs.py): for every
checkpoint and final directory, the status, model kind, layout, step, run, adapters and the error
codes (and the file they name) that ``ckpt-tools audit --min-age 0`` must report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from fixtures.dylora import build_base
from fixtures.ordinary_runs import NO_TRAINER_STATE, TMP_NAME, good_runs

REPO = Path(__file__).resolve().parents[1]
STATE = "trainer_state.json"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def audit_json(*args) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_cli("audit", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(proc.stdout)


def by_path(doc: dict) -> dict[str, dict]:
    return {c["path"]: c for c in doc["checkpoints"]}


@pytest.fixture(scope="module")
def audited(ordinary_runs):
    """(root, manifest, the audit process, its JSON by checkpoint path) of the whole ordinary tree."""
    root, manifest = ordinary_runs
    proc, doc = audit_json("--min-age", "0", root)
    return root, manifest, proc, by_path(doc)


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``directory``: (size, mtime in ns, content); not prune's lock file."""
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".ckpt-tools.lock"}


def touch_all(directory: Path, when: float | None = None) -> None:
    """Set the mtime of ``directory`` and of everything under it to ``when`` (now by default)."""
    stamp = None if when is None else (when, when)
    for p in [directory, *directory.rglob("*")]:
        os.utime(p, stamp)


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    touch_all(dst)
    return dst


# --- every manifest entry, through audit --json --min-age 0 ---------------------------------------

def test_audit_finds_every_checkpoint_and_final_dir_and_nothing_else(audited):
    _, manifest, _, found = audited
    assert sorted(found) == sorted(manifest)   # a second adapter's subdirectory is no checkpoint of its own


@pytest.mark.parametrize("field", ["status", "model_kind", "layout", "step", "run"])
def test_every_entry_gets_its_expected(audited, field):
    _, manifest, _, found = audited
    wrong = {p: (getattr(e, field), found[p].get(field, "<absent>"))
             for p, e in manifest.items() if p in found and found[p].get(field, "<absent>") != getattr(e, field)}
    assert wrong == {}


def test_every_peft_checkpoint_lists_its_adapters(audited):
    _, manifest, _, found = audited
    wrong = {}
    for p, e in manifest.items():
        expected = sorted((asdict(a) for a in e.adapters), key=lambda a: a["name"])
        got = found.get(p, {}).get("adapters")
        if e.adapters and sorted(got or [], key=lambda a: a["name"]) != expected:
            wrong[p] = (expected, got)
    assert wrong == {}


def test_damage_is_reported_with_its_code_on_its_file_and_sound_entries_have_no_error(audited):
    _, manifest, _, found = audited
    wrong = {}
    for p, e in manifest.items():
        if p not in found:
            wrong[p] = "not listed"
            continue
        errors = {(q["code"], q["path"]) for q in found[p]["problems"] if q["severity"] == "error"}
        expected = {(code, e.damaged_file) for code in e.problem_codes}
        if e.problem_codes and not expected <= errors:
            wrong[p] = (sorted(expected), sorted(errors))
        if not e.problem_codes and errors:
            wrong[p] = ([], sorted(errors))
    assert wrong == {}


def test_fresh_and_training_state_at_min_age_0(audited):
    root, manifest, _, found = audited
    for p, e in manifest.items():
        c = found.get(p, {})
        assert c.get("fresh") is False, p   # nothing is younger than --min-age 0
        state = c.get("training_state_bytes")
        assert isinstance(state, int) and 0 <= state <= c["size_bytes"], (p, state)
        # a save_model output holds no optimizer, scheduler or RNG state; a Trainer checkpoint does
        assert (state == 0) == (e.step is None), (p, state)
        assert state == _resume_only_bytes(root / p, e.model_kind), p


def _resume_only_bytes(ckpt: Path, model_kind: str) -> int:
    """Allocated bytes of what only resuming needs, read from disk: the Trainer's optimizer,
    scheduler, scaler and RNG state, FSDP's optimizer_*/, DeepSpeed's global_step*/ unless it
    is the only copy of the model (ZeRO-3 without gathered weights)."""
    total = 0
    for f in ckpt.rglob("*"):
        if not f.is_file():
            continue
        top = f.relative_to(ckpt).parts[0]
        if (top in ("optimizer.pt", "scheduler.pt", "scaler.pt") or re.fullmatch(r"rng_state(_\d+)?\.pth", top)
                or re.fullmatch(r"optimizer_\d+", top)
                or (re.fullmatch(r"global_step\d+", top) and model_kind != "deepspeed")):
            total += f.stat().st_blocks * 512
    return total


def test_audit_exits_1_on_the_tree_with_broken_copies_and_0_on_the_good_runs(audited, tmp_path):
    root, manifest, proc, _ = audited
    assert proc.returncode == 1 and proc.stderr == ""
    good = tmp_path / "good"
    for run in good_runs(manifest):
        shutil.copytree(root / run, good / run)
    proc, doc = audit_json("--min-age", "0", good)
    assert proc.returncode == 0, {c["path"]: c["status"] for c in doc["checkpoints"] if c["status"] != "healthy"}
    expected = {p for p, e in manifest.items() if e.run in good_runs(manifest)}
    assert set(by_path(doc)) == expected
    assert doc["totals"]["by_status"]["healthy"] == len(expected)


def test_the_table_shows_each_final_dir_in_its_run(audited):
    root, manifest, _, _ = audited
    proc = run_cli("audit", "--no-progress", "--min-age", "0", root)
    lines = proc.stdout.splitlines()
    finals = [e for e in manifest.values() if e.step is None]
    assert len(finals) >= 9
    for e in finals:
        start = lines.index(next(line for line in lines if line.startswith(f"{e.run}  (")))
        end = lines.index("", start)
        rows = [line.split() for line in lines[start + 2:end] if line.startswith("  ") and not
                line.lstrip().startswith(("error:", "warning:", "note:"))]
        name = os.path.relpath(e.path, e.run)   # "." for a model saved into its run's own directory
        assert [name, "healthy"] in [r[:2] for r in rows], (e.path, rows)
    assert "Traceback" not in proc.stdout + proc.stderr


# --- validate ---------------------------------------------------------------------------------------

def test_validate_of_each_damaged_checkpoint_exits_1_naming_the_file_and_the_cause(ordinary_runs):
    root, manifest = ordinary_runs
    damaged = [e for e in manifest.values() if e.problem_codes]
    assert len(damaged) == 7
    wrong = {}
    for e in damaged:
        proc = run_cli("validate", "--min-age", "0", root / e.path)
        lines = [line.strip() for line in proc.stdout.splitlines()]
        for code in e.problem_codes:
            if proc.returncode != 1 or not any(line.startswith(f"error: {root / e.damaged_file}: {code}: ")
                                               for line in lines):
                wrong[e.path] = (proc.returncode, code, proc.stdout + proc.stderr)
        if "Traceback" in proc.stdout + proc.stderr:
            wrong[e.path] = "traceback"
    assert wrong == {}


def test_validate_of_the_good_checkpoints_exits_0(ordinary_runs):
    root, manifest = ordinary_runs
    good = [e for e in manifest.values() if e.damage is None]
    proc = run_cli("validate", "--json", "--min-age", "0", *(root / e.path for e in good))
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, {os.path.join(c["root"], c["path"]): [q["code"] for q in c["problems"]]
                                  for c in doc["checkpoints"] if not c["valid"]}
    # a run root holding a save_model output is validated with the checkpoints beside it
    found = {os.path.normpath(os.path.join(c["root"], c["path"])) for c in doc["checkpoints"]}
    assert found >= {str(root / e.path) for e in good}
    assert all(c["valid"] and not c["problems"] for c in doc["checkpoints"])


# --- completeness (item 5) --------------------------------------------------------------------------

def test_a_fresh_complete_checkpoint_is_judged_by_content_and_marked_fresh(ordinary_runs, tmp_path):
    root, _ = ordinary_runs
    run = tmp_path / "run"
    fresh_copy(root / "peft-lora" / "checkpoint-6", run / "checkpoint-6")
    proc, doc = audit_json(run)                  # the default --min-age, 1h
    (c,) = doc["checkpoints"]
    assert (c["status"], c.get("model_kind"), c["layout"], c.get("fresh")) == (
        "healthy", "peft-adapter", "adapter", True)
    assert proc.returncode == 0


@pytest.mark.parametrize("how", ["no trainer_state.json", "trainer_state.json of another step"])
def test_a_fresh_checkpoint_without_its_own_trainer_state_is_in_progress(ordinary_runs, tmp_path, how):
    root, _ = ordinary_runs
    ckpt = fresh_copy(root / "peft-lora" / "checkpoint-6", tmp_path / "run" / "checkpoint-6")
    if how.startswith("no"):
        (ckpt / STATE).unlink()
    else:
        shutil.copy2(root / "peft-lora" / "checkpoint-4" / STATE, ckpt / STATE)
        touch_all(ckpt)
    _, doc = audit_json(tmp_path / "run")
    (c,) = doc["checkpoints"]
    assert c["status"] == "in-progress"
    # older than --min-age, the same files are judged by content
    touch_all(ckpt, time.time() - 2 * 86400)
    _, doc = audit_json(tmp_path / "run")
    assert doc["checkpoints"][0]["status"] == "healthy"


def test_a_tmp_checkpoint_is_in_progress_whatever_its_age(ordinary_runs, tmp_path):
    root, manifest = ordinary_runs
    (e,) = [e for e in manifest.values() if e.damage == TMP_NAME]
    run = tmp_path / "run"
    shutil.copytree(root / e.path, run / Path(e.path).name)
    touch_all(run, time.time() - 30 * 86400)
    for min_age in ("0", "1h"):
        _, doc = audit_json("--min-age", min_age, run)
        (c,) = doc["checkpoints"]
        assert c["status"] == "in-progress", min_age
        assert c["step"] == e.step


def test_validate_of_an_in_progress_checkpoint_says_why_and_how_to_judge_it_now(ordinary_runs, tmp_path):
    root, manifest = ordinary_runs
    (bare,) = [e for e in manifest.values() if e.damage == NO_TRAINER_STATE]
    young = fresh_copy(root / bare.path, tmp_path / "young" / "checkpoint-6")
    (tmp,) = [e for e in manifest.values() if e.damage == TMP_NAME]
    # how to judge it now: older than --min-age, or (a tmp-checkpoint-*, whatever its age) renamed
    for ckpt, why, how in ((young, "min-age", "--min-age 0"), (root / tmp.path, "tmp-checkpoint", "rename")):
        proc = run_cli("validate", ckpt)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out        # nothing wrong was found (README: exit 1 on an error)
        assert f"{ckpt}: in-progress" in out and why in out and how in out, out
        assert "Traceback" not in out


@pytest.fixture(scope="module")
def redundant_trainer_checkpoint(results_tree):
    """A real Trainer checkpoint of the DyLoRA tree that prune would free (redundant, trainer_state
    of its own step): prune and migrate have something to do there once it is old enough."""
    root, manifest, _ = results_tree
    (e,) = [e for e in manifest.values() if e.run == "run_trainer" and e.path.endswith("checkpoint-4")]
    assert e.status == "redundant"
    assert json.loads((root / e.path / STATE).read_text())["global_step"] == 4
    return root / e.path, e


def test_prune_and_migrate_leave_a_fresh_complete_checkpoint_alone(redundant_trainer_checkpoint, tmp_path):
    src, entry = redundant_trainer_checkpoint
    run = tmp_path / "run"
    ckpt = fresh_copy(src, run / "checkpoint-4")
    before = snapshot(run)
    _, doc = audit_json(run)
    (c,) = doc["checkpoints"]
    assert (c["status"], c.get("fresh")) == ("redundant", True)

    proc = run_cli("prune", "--yes", "--json", "--no-progress", run)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["deleted"] == []
    dst = tmp_path / "migrated"
    proc = run_cli("migrate", "--json", "--no-progress", run, dst)
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["migrated"] == []
    assert not (dst / "checkpoint-4").exists()
    assert snapshot(run) == before

    # the control: once --min-age allows it, prune does free the merged weights
    proc = run_cli("prune", "--yes", "--json", "--no-progress", "--min-age", "0", run)
    assert proc.returncode == 0, proc.stderr
    assert {d["path"] for d in json.loads(proc.stdout)["deleted"]} == {f"checkpoint-4/{n}" for n in entry.merged_names}
    assert not any((ckpt / n).exists() for n in entry.merged_names)


# --- the issue's table, row by row ------------------------------------------------------------------

def _statuses(doc: dict) -> dict[str, str]:
    return {c["path"]: c["status"] for c in doc["checkpoints"]}


def row_lora_safetensors(root, manifest, tmp_path):
    proc, doc = audit_json("--min-age", "0", root / "peft-lora")
    assert proc.returncode == 0
    assert {(c["status"], c.get("model_kind"), c["layout"]) for c in doc["checkpoints"]} == {
        ("healthy", "peft-adapter", "adapter")}


def row_lora_bin(root, manifest, tmp_path):
    proc, doc = audit_json("--min-age", "0", root / "peft-lora-bin")
    assert proc.returncode == 0
    assert set(_statuses(doc).values()) == {"healthy"}


def row_save_model_final(root, manifest, tmp_path):
    _, doc = audit_json("--min-age", "0", root / "peft-lora")
    final = by_path(doc).get("final")
    assert final is not None, "peft-lora/final is not listed"
    assert (final["step"], final["status"], final["layout"]) == (None, "healthy", "adapter")
    proc = run_cli("validate", "--min-age", "0", root / "peft-lora" / "final")
    assert proc.returncode == 0 and "healthy" in proc.stdout, proc.stdout + proc.stderr


def row_full_fine_tune(root, manifest, tmp_path):
    proc, doc = audit_json("--min-age", "0", root / "full")
    assert proc.returncode == 0
    assert {(c["status"], c.get("model_kind"), c["layout"]) for c in doc["checkpoints"]} == {
        ("healthy", "full-model", "model")}
    proc = run_cli("audit", "--no-progress", "--min-age", "0", root / "full")
    assert "migrate" not in proc.stdout.lower()


def row_sharded(root, manifest, tmp_path):
    _, doc = audit_json("--min-age", "0", root / "sharded")
    assert {(c["status"], c["layout"]) for c in doc["checkpoints"]} == {("healthy", "sharded")}
    proc, doc = audit_json("--min-age", "0", root / "sharded-missing-shard")
    assert proc.returncode == 1 and set(_statuses(doc).values()) == {"broken"}


def row_best_model(root, manifest, tmp_path):
    (best,) = [e for e in manifest.values() if e.best]
    _, doc = audit_json("--min-age", "0", root / best.run)
    marked = [c["path"] for c in doc["checkpoints"] if c["best_of_run"]]
    assert marked == [os.path.relpath(best.path, best.run)]


def row_migrate_full_fine_tune(root, manifest, tmp_path):
    base = tmp_path / "base"
    build_base(base_seed=0).save_pretrained(base)   # the model the full fine-tune started from
    dst = tmp_path / "migrated"
    proc = run_cli("migrate", "--json", "--no-progress", "--min-age", "0", "--base-model", base, "--rank", "4",
                   root / "full", dst)
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["migrated"] == [] and doc["failed"] == [], doc   # nothing to migrate, nothing failed
    full = [os.path.relpath(e.path, "full") for e in manifest.values() if e.run == "full"]
    skipped = {s["source"] for s in doc["skipped"]}
    assert set(full) <= skipped, doc["skipped"]
    assert not any((dst / rel).exists() for rel in full)
    assert proc.returncode == 0


ISSUE_TABLE = {
    "lora-adapter-safetensors": row_lora_safetensors,
    "lora-adapter-bin": row_lora_bin,
    "save_model-final": row_save_model_final,
    "full-fine-tune": row_full_fine_tune,
    "sharded-and-missing-shard": row_sharded,
    "load_best_model_at_end": row_best_model,
    "migrate-full-fine-tune": row_migrate_full_fine_tune,
}


@pytest.mark.parametrize("row", list(ISSUE_TABLE))
def test_the_issue_table(row, ordinary_runs, tmp_path):
    root, manifest = ordinary_runs
    ISSUE_TABLE[row](root, manifest, tmp_path)
