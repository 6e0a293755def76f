"""Retention's reliability, through the CLI: ``prune --keep-last 1 --delete|--strip`` and the
purge killed at every storage operation of a real run, and a live Trainer rotating its
checkpoints while prune runs again and again on its output_dir.

Crash rows (scorecard scenario 14): each command first runs uninterrupted on a copy of a few
fixture runs (ordinary Trainer runs and DyLoRA-MoE runs), once more in this process to count its
storage operations (``tests/faulty_fs.py``'s ``after_op``), then, on a fresh copy each time,
through ``tests/fault_entry.py`` with ``after_op:<n>``: it SIGKILLs itself right after its n-th
change to storage. ``CKPT_TOOLS_CRASH_RUNS_RETENTION`` (default 10 per command; the scorecard
passes more than there are operations) says how many n are tried: all of them when it is at
least their count, else that many spread over the run, the first and the last included.

A live Trainer (scenario 15): a real tiny CPU Trainer with ``save_steps=1, save_total_limit=2``
in a subprocess, ``prune --yes --keep-last 1 --delete|--strip --min-age 0`` run back to back on
its output_dir until it ends, then once more. What each variant must show is in ``TRAINER_CHECKS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import scorecard
from faulty_fs import FaultyFileOps
from reliability import LOCK_NAME, REPO, cli_env, seed_from
from test_reliability_crash import crash_jobs, crash_runs

import fault_entry
from ckpt_tools import layout, scan
from ckpt_tools.problems import STRIP_INTERRUPTED
from fixtures.copying import copy_tree

ORDINARY_RUNS = ("peft-lora", "best", "deepspeed")        # adapters; best_model_checkpoint; ZeRO-2
DYLORA_RUNS = ("run_trainer", "run canonical")             # merged weights too; a hard link, tmp-
COMMANDS = {
    "delete": ("--keep-last", "1", "--delete"),
    "strip": ("--keep-last", "1", "--strip"),
    "purge": ("--keep-last", "1", "--delete", "--purge-now"),
}
TRASH = layout.TRASH_DIR
MARKER = layout.STRIP_MARKER
ENTRY = re.compile(r"(?P<original>.+?)\.deleted-\d{8}T\d{6}Z(?:-\d+)?(?P<purging>\.purging)?")
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
NEVER_COUNT = 10 ** 9     # an after_op that never strikes: the FaultyFileOps only counts


def prune_cmd(root: Path, extra, fault: str | None = None, log: Path | None = None) -> list[str]:
    cmd = fault_entry.command(fault) if fault else [sys.executable, "-m", "ckpt_tools.cli"]
    return [*cmd, "prune", "--yes", "--min-age", "0", "--jobs", "1", "--json", "--no-progress",
            *(["--log", str(log)] if log else []), *extra, str(root)]


# --- what a tree holds --------------------------------------------------------------------------

def normal(rel: str) -> str:
    """A path with each trash entry's time stamp (and same-second number) as ``*``: two runs
    trash the same checkpoint under different names."""
    return "/".join(ENTRY.sub(lambda m: f"{m['original']}.deleted-*{m['purging'] or ''}", part)
                    if ENTRY.fullmatch(part) else part for part in rel.split("/"))


def marker_facts(path: str) -> tuple:
    """A strip marker without its times and tool version: its state and the files it lists."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except ValueError:
        return ("marker", "torn")
    listed = doc.get("removed" if doc.get("state") == "stripped" else "removing") or []
    return ("marker", doc.get("state"), tuple(sorted((f["path"], f["bytes"]) for f in listed)))


def listing(root: Path) -> dict[str, tuple]:
    """rel path (normalised) → what is there: a file's size, mtime and sha256; a strip marker's
    facts; a symlink's target; a directory (``rel/``), with its mtime where it is a checkpoint
    in place (the Trainer's rotation sorts those by mtime). ckpt-tools' own lock left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name == LOCK_NAME:
                continue
            p = os.path.join(dirpath, name)
            rel = normal(os.path.relpath(p, root).replace(os.sep, "/"))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                in_place = CHECKPOINT_NAME.fullmatch(name) and TRASH not in rel.split("/")
                out[rel + "/"] = ("dir", st.st_mtime_ns if in_place else None)
            elif name == MARKER:
                out[rel] = marker_facts(p)
            elif name.startswith(layout.STRIP_MARKER_TMP_PREFIX):
                out[rel] = ("marker-tmp",)
            else:
                with open(p, "rb") as fh:
                    out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def under(tree: dict[str, tuple], top: str) -> dict[str, tuple]:
    """The part of ``tree`` below directory ``top``, relative to it."""
    prefix = top + "/"
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix) and k != prefix}


def trash_entries(tree: dict[str, tuple], ckpt: str) -> list[str]:
    """The entries of ``ckpt``'s run's trash that hold it (normalised names)."""
    run, _, name = ckpt.rpartition("/")
    prefix = f"{run}/{TRASH}/{name}.deleted-*"
    return sorted({k[:-1] for k in tree if k in (prefix + "/", prefix + ".purging/")})


def differences(got: dict, want: dict, limit: int = 6) -> list[str]:
    keys = sorted(set(got) | set(want))
    diff = [k for k in keys if got.get(k) != want.get(k)]
    return [f"{k}: {got.get(k, 'absent')} != {want.get(k, 'absent')}"[:300] for k in diff[:limit]]


# --- the crash rows -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def retention_source(ordinary_runs, results_tree, tmp_path_factory):
    """A tree of copied fixture runs, and its checkpoints (every directory audit finds)."""
    base = tmp_path_factory.mktemp("retention-crash")
    src = base / "src"
    for run in ORDINARY_RUNS:
        copy_tree(ordinary_runs[0] / run, src / "ordinary" / run)
    for run in DYLORA_RUNS:
        copy_tree(results_tree[0] / run, src / "dylora" / run)
    found = scan(str(src), min_age_s=0).checkpoints
    return base, src, {c.path: c for c in found}


def after_kill_failures(now: dict, src: dict, ref: dict, checkpoints, found, purging_ok: bool) -> list[str]:
    """Each checkpoint whole in place (less only what the uninterrupted run removes from it in
    place, training state only under a strip marker), whole in the trash, partly purged in a
    trash entry marked purging (the purge), or purged; everything else as it was or as the
    uninterrupted run leaves it."""
    failures = []
    for path, c in checkpoints.items():
        was, left = under(src, path), under(now, path)
        entries = trash_entries(now, path)
        if path + "/" in now:
            if entries:
                failures.append(f"{path}: both in place and in the trash ({entries})")
            allowed = set(was) - set(under(ref, path)) if path + "/" in ref else set()
            removed = set(was) - set(left)
            if removed - allowed:
                failures.append(f"{path}: half-deleted in place: {sorted(removed - allowed)[:4]} gone")
            extra = {k for k in set(left) - set(was) if k.rpartition("/")[2] != MARKER
                     and not k.startswith(layout.STRIP_MARKER_TMP_PREFIX)}
            changed = [k for k in set(left) & set(was) if left[k] != was[k] and not k.endswith("/")]
            if extra or changed:
                failures.append(f"{path}: files added {sorted(extra)[:3]} or changed {changed[:3]}")
            state = left.get(MARKER, (None, None))[1]
            if any(layout.is_resume_only(r) for r in removed) and state is None:
                failures.append(f"{path}: training state gone and no strip marker says so")
            shown = found.get(path)
            if state == "stripping" and (shown is None or STRIP_INTERRUPTED not in
                                         {p.code for p in shown.problems}):
                failures.append(f"{path}: an unfinished strip that audit does not show as {STRIP_INTERRUPTED}")
            if state == "stripped" and {r for r in allowed if layout.is_resume_only(r)} - removed:
                failures.append(f"{path}: marked stripped with training state left")
            if c.status in ("healthy", "redundant") and (shown is None or shown.errors):
                failures.append(f"{path}: audits {shown.status if shown else 'missing'} after the kill")
        elif len(entries) == 1:
            held = under(now, entries[0])
            if path + "/" in ref:
                failures.append(f"{path}: in the trash, which the uninterrupted run keeps in place")
            if entries[0].endswith(".purging"):
                if not purging_ok or set(held) - set(was) or any(held[k] != was[k] for k in held
                                                                  if not k.endswith("/")):
                    failures.append(f"{path}: a purging entry that is no part of the checkpoint")
            elif differences(held, was):
                failures.append(f"{path}: not whole in the trash: {differences(held, was, 2)}")
        elif entries:
            failures.append(f"{path}: {len(entries)} trash entries")
        elif not (purging_ok and path + "/" not in ref):
            failures.append(f"{path}: vanished (neither in place nor in the trash)")
    inside = tuple(p + "/" for p in checkpoints)
    for rel in sorted(set(src) | set(now)):
        if rel.startswith(inside) or f"/{TRASH}/" in rel or rel.endswith(f"/{TRASH}/"):
            continue     # the checkpoints are judged above; a trash holds only them
        if now.get(rel) not in (src.get(rel), ref.get(rel)):
            failures.append(f"{rel}: {now.get(rel, 'absent')} is neither the original nor the result")
    return failures


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_sigkill_at_every_storage_operation_of_retention_then_rerun_matches(name, retention_source):
    base, src, checkpoints = retention_source
    extra = COMMANDS[name]
    here = base / name
    # the uninterrupted run, and a count of its storage operations on another copy
    ref_root = copy_tree(src, here / "ref" / "results")
    t0 = time.monotonic()
    proc = subprocess.run(prune_cmd(ref_root, extra), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout)["retention"]
    acted = {"delete": "trashed", "strip": "stripped", "purge": "purged"}[name]
    assert len(done[acted]) >= 5 and not done["failed"], done
    ref = listing(ref_root)
    fs = FaultyFileOps(f"after_op:{NEVER_COUNT}")
    from ckpt_tools import cli
    counted = copy_tree(src, here / "count" / "results")
    assert cli.main(prune_cmd(counted, extra)[3:], obj=cli.CliContext(fs=fs)) == 0
    ops = fs.counts["after_op"]
    assert not differences(listing(counted), ref), differences(listing(counted), ref)
    source = listing(src)
    # checkpoints that lose merged weights in place (prune's own deletions, not retention's)
    merged_dirs = {p + "/" for p in checkpoints if p + "/" in ref and any(
        not layout.is_resume_only(r) for r in set(under(source, p)) - set(under(ref, p)))}
    # checkpoints stripped: README ("Stripped checkpoints") documents the one window a strip leaves
    stripped_dirs = {p + "/" for p in checkpoints if f"{p}/{MARKER}" in ref}
    seed = seed_from("CKPT_TOOLS_CRASH_SEED")
    wanted = crash_runs("retention", 10)
    points = list(range(1, ops + 1))
    if wanted < ops:
        rng = random.Random(f"{seed}:{name}")
        points = sorted({1, ops} | set(rng.sample(points[1:-1], max(0, wanted - 2))))
    runs = scorecard.Runs(
        f"retention_crash_{name}", scorecard.RETENTION_CRASH,
        f"Crash during `ckpt-tools prune --yes --min-age 0 {' '.join(extra)} ROOT` "
        f"(SIGKILL after each storage operation)",
        checks=[
            f"on a copy of {len(ORDINARY_RUNS)} ordinary Trainer runs ({', '.join(ORDINARY_RUNS)}) "
            f"and {len(DYLORA_RUNS)} DyLoRA-MoE runs ({', '.join(DYLORA_RUNS)}), {len(checkpoints)} "
            "checkpoints: the command, run through tests/fault_entry.py with the fault spec "
            "after_op:n, SIGKILLs itself right after its n-th change to storage (mkdir, write, "
            "fsync, rename, unlink, rmdir); n over the operations of an uninterrupted run",
            "right after the kill, every checkpoint is whole in place (less only what the "
            "uninterrupted run removes from it in place: merged weights, and training state only "
            "under a strip marker), whole in its run's trash, stripped, or visibly strip-"
            f"interrupted (audit's {STRIP_INTERRUPTED} warning); with --purge-now also partly "
            "purged under a trash entry marked .purging, or purged; never half-deleted in place, "
            "never in place and in the trash at once; no checkpoint that audited sound audits "
            "with an error; every other file as it was or as the uninterrupted run leaves it",
            "the same command re-run exits 0, and the tree then equals the uninterrupted run's: "
            "every path (trash entries' time stamps aside), every file's size, mtime and sha256, "
            "each strip marker's state and files, each checkpoint directory's mtime "
            "(ckpt-tools' lock aside)",
        ],
        test=f"test_sigkill_at_every_storage_operation_of_retention_then_rerun_matches[{name}]")

    def trial(n: int) -> None:
        root = copy_tree(src, here / f"t{n}" / "results")
        killed = subprocess.run(prune_cmd(root, extra, f"after_op:{n}"), cwd=REPO, env=cli_env(),
                                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        failures = []
        if killed.returncode != -9:
            failures.append(f"after_op:{n} did not kill it: exit {killed.returncode} "
                            f"{killed.stderr[-300:]}")
        now = listing(root)
        found = {c.path: c for c in scan(str(root), min_age_s=0).checkpoints}
        failures += [f"after the kill: {f}" for f in
                     after_kill_failures(now, source, ref, checkpoints, found, name == "purge")]
        interrupted = sum(1 for c in found.values() if STRIP_INTERRUPTED in {p.code for p in c.problems})
        in_trash = sum(1 for k in now if re.fullmatch(rf".+/{TRASH}/[^/]+/", k))
        again = subprocess.run(prune_cmd(root, extra), cwd=REPO, env=cli_env(), capture_output=True,
                               text=True, timeout=300, stdin=subprocess.DEVNULL)
        if again.returncode != 0:
            failures.append(f"re-run exited {again.returncode}: {again.stderr[-500:]}")
        final = listing(root)
        def mtime_moved(k: str) -> bool:
            return final.get(k) != ref.get(k) and final.get(k, ("",))[0] == ref.get(k, ("",))[0] == "dir"
        moved = [k for k in merged_dirs if mtime_moved(k)]
        moved_by_strip = [k for k in stripped_dirs - merged_dirs if mtime_moved(k)]
        for k in moved + moved_by_strip:   # the windows named in runs.note below
            final[k] = ref[k]
        # a purge killed after its last entry went, before the emptied trash itself did
        empty_trash = [k for k in final if k.endswith(f"/{TRASH}/") and k not in ref
                       and not under(final, k[:-1])]
        for k in empty_trash:
            del final[k]
        failures += [f"after the re-run: {d}" for d in differences(final, ref)]
        runs.add(f"after_op:{n}", failures, fault=f"after_op:{n}", killed=killed.returncode == -9,
                 in_trash_after_kill=in_trash, strip_interrupted_after_kill=interrupted,
                 merged_dir_mtime_left_moved=len(moved), stripped_dir_mtime_left_moved=len(moved_by_strip),
                 empty_trash_left=len(empty_trash))
        shutil.rmtree(here / f"t{n}", ignore_errors=True)

    with ThreadPoolExecutor(max_workers=crash_jobs()) as pool:
        list(pool.map(trial, points))
    runs.records.sort(key=lambda r: int(r["name"].split(":")[1]))
    runs.note(f"storage operations of an uninterrupted run: {ops} (it takes {seconds:.2f} s through "
              f"the CLI); kill points tried: {len(points)}"
              + (" (every one)" if len(points) == ops else f" (seed {seed})"))
    runs.note(f"after the kill: runs with checkpoints in the trash "
              f"{sum(1 for r in runs.records if r['in_trash_after_kill'])}, with a strip left "
              f"interrupted {sum(1 for r in runs.records if r['strip_interrupted_after_kill'])}")
    moved = [r["name"] for r in runs.records if r["merged_dir_mtime_left_moved"]]
    if moved:
        runs.note("tolerated, a known defect of prune's merged-weight deletion (prune/execute.py), "
                  "not of retention: a kill between an unlink and setting its checkpoint "
                  "directory's mtime back leaves that mtime moved, and the re-run does not set it "
                  "back (test_a_rerun_sets_back_the_directory_time_a_killed_unlink_moved, xfail): "
                  f"{len(moved)} runs ({', '.join(moved[:6])})")
    moved = [r["name"] for r in runs.records if r["stripped_dir_mtime_left_moved"]]
    if moved:
        runs.note("tolerated, the window README documents (\"Stripped checkpoints\"): a kill right "
                  "after the marker says stripped, before the directory's times are set back, "
                  f"leaves the checkpoint directory's mtime at the strip's: {len(moved)} runs "
                  f"({', '.join(moved[:6])})")
    moved = [r["name"] for r in runs.records if r["empty_trash_left"]]
    if moved:
        runs.note("tolerated: a purge killed after removing a run's last trash entry, before "
                  "removing the emptied trash directory, leaves that empty directory, and the "
                  f"re-run (nothing due) leaves it too: {len(moved)} runs ({', '.join(moved[:6])})")
    runs.finish(seed=seed, operations=ops, reproduce=(
        f"CKPT_TOOLS_CRASH_RUNS_RETENTION={ops} pytest tests/test_reliability_retention.py "
        f"-k 'every_storage_operation and {name}'"))


@pytest.mark.xfail(strict=True, reason="prune/execute.py sets a checkpoint directory's mtime back "
                   "right after each unlink, and keeps the time it set back nowhere: a kill in "
                   "between leaves it moved for good, and the Trainer's rotation (use_mtime=True) "
                   "then takes that old checkpoint for its newest")
def test_a_rerun_sets_back_the_directory_time_a_killed_unlink_moved(results_tree, tmp_path):
    root = copy_tree(results_tree[0] / "run_trainer", tmp_path / "results" / "run_trainer")
    ckpt = root / "checkpoint-2"
    before = os.lstat(ckpt).st_mtime_ns
    killed = subprocess.run(prune_cmd(root, (), "after_unlink:1"), cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert killed.returncode == -9, killed.stderr[-500:]
    assert not (ckpt / "model.safetensors").exists()      # the first unlink: checkpoint-2's merged file
    again = subprocess.run(prune_cmd(root, ()), cwd=REPO, env=cli_env(), capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-500:]
    assert os.lstat(ckpt).st_mtime_ns == before


# --- a live Trainer -----------------------------------------------------------------------------

TRAINER_STEPS = 8
# Saves further apart than the 1 s under which transformers' rotation falls back from directory
# mtimes to step numbers: the rotation then sorts by mtime, which a careless prune would move.
STEP_PAUSE_S = 0.5
TRAINER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[4])
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from fixtures.dylora import build_base
from fixtures.trainer_run import TinyTokens
out, events, steps, pause = sys.argv[1], open(sys.argv[2], "a"), int(sys.argv[3]), float(sys.argv[5])
def say(**doc):
    events.write(json.dumps({**doc, "time": time.time()}) + "\n"); events.flush()
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(pause)
        say(event="saving", step=state.global_step)     # the save of this step starts now
    def on_save(self, args, state, control, **kw):
        say(event="saved", step=state.global_step)      # written and rotated
args = TrainingArguments(output_dir=out, max_steps=steps, save_steps=1, save_strategy="steps",
    save_total_limit=2, logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-3,
    report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    dataloader_pin_memory=False)
trainer = Trainer(model=build_base().train(), args=args, train_dataset=TinyTokens(seed=0), callbacks=[Clock()])
for quiet in (PrinterCallback, ProgressCallback):
    trainer.remove_callback(quiet)
trainer.train()
say(event="done", step=steps)
"""
TRAINER_CHECKS = [
    f"a real transformers Trainer (tiny Llama, CPU, {TRAINER_STEPS} steps, save_steps=1, "
    f"save_total_limit=2, {STEP_PAUSE_S} s between steps so that its rotation sorts by directory "
    "mtime) in a subprocess; prune --yes --min-age 0 --jobs 1 --keep-last 1 --delete (or --strip) "
    "--log run back to back on its output_dir until it ends, then once more",
    "the Trainer exits 0 having saved every step; every prune exits 0",
    "what the Trainer keeps is what its own rotation keeps without prune: transformers' "
    "rotate_checkpoints(save_total_limit=2, use_mtime=True) over its saves at their times; "
    "--strip: exactly those checkpoints are in place at the end, all but the newest stripped; "
    "--delete: the newest in place, the others of them whole in the trash",
    "prune never touched a checkpoint being written: each checkpoint it trashed or stripped was "
    "saved (the Trainer's on_save) before that prune run started, and is whole: a trash entry "
    "holds every file of the Trainer's last checkpoint and audits healthy (unless the Trainer's "
    "own rotation was deleting that same checkpoint as it moved it: then a part of one), a "
    "stripped checkpoint audits healthy with every file but the training state",
    "at least one checkpoint was trashed or stripped while the Trainer was running",
]


def trainer_kept(saved: dict[int, float], limit: int, scratch: Path) -> set[str]:
    """What transformers' rotation keeps of checkpoints saved at ``saved`` (step → time), with
    no one else touching them: its own function, on empty directories with those mtimes."""
    from transformers.trainer_utils import rotate_checkpoints
    for step, when in sorted(saved.items()):
        (scratch / f"checkpoint-{step}").mkdir(parents=True)
        os.utime(scratch / f"checkpoint-{step}", (when, when))
        rotate_checkpoints(str(scratch), save_total_limit=limit, use_mtime=True)
    return {p.name for p in scratch.iterdir()}


def log_times(log: Path) -> list[tuple[str, str, float]]:
    """(action, path, epoch seconds) of each line of a prune --log."""
    out = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        doc = json.loads(line)
        if doc["action"] in ("start", "end"):   # a run's records, not actions on a path
            continue
        when = datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).timestamp()
        out.append((doc["action"], doc["path"], when))
    return out


@pytest.mark.parametrize("action", ["delete", "strip"])
def test_a_live_trainer_keeps_what_its_rotation_keeps_while_prune_applies_a_policy(action, tmp_path):
    out_dir, events, log = tmp_path / "out", tmp_path / "events.jsonl", tmp_path / "prune.jsonl"
    runs = scorecard.Runs(f"retention_trainer_{action}", scorecard.RETENTION_TRAINER,
                          "A live Trainer (save_total_limit=2) rotating its checkpoints while "
                          "`prune --keep-last 1 --delete|--strip --min-age 0` runs again and again",
                          TRAINER_CHECKS, test="test_a_live_trainer_keeps_what_its_rotation_keeps_"
                                               f"while_prune_applies_a_policy[{action}]")
    extra = ("--keep-last", "1", f"--{action}", "--log", str(log))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(out_dir), str(events),
                                str(TRAINER_STEPS), str(REPO), str(STEP_PAUSE_S)],
                               cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    prunes: list[tuple[float, subprocess.CompletedProcess]] = []
    try:
        while trainer.poll() is None:
            if not out_dir.exists():
                time.sleep(0.05)
                continue
            started = time.time()
            prunes.append((started, subprocess.run(prune_cmd(out_dir, extra), cwd=REPO,
                                                   env=cli_env(), capture_output=True, text=True,
                                                   timeout=120, stdin=subprocess.DEVNULL)))
        trainer_end = time.time()
        prunes.append((time.time(), subprocess.run(prune_cmd(out_dir, extra), cwd=REPO, env=cli_env(),
                                                   capture_output=True, text=True, timeout=120,
                                                   stdin=subprocess.DEVNULL)))
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait()
    err = trainer.stderr.read()
    assert trainer.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    saved = {d["step"]: d["time"] for d in lines if d["event"] == "saved"}
    assert sorted(saved) == list(range(1, TRAINER_STEPS + 1)), lines
    failures = [f"prune exited {p.returncode}: {p.stderr[-300:]}" for _, p in prunes
                if p.returncode != 0 or "Traceback" in p.stderr]
    kept = trainer_kept(saved, 2, tmp_path / "undisturbed")
    newest = f"checkpoint-{TRAINER_STEPS}"
    live = {p.name for p in out_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)}
    complete = {k for k in listing(out_dir / newest) if not k.endswith("/")}
    found = {c.path: c for c in scan(str(out_dir), min_age_s=0).checkpoints}
    trash_dir = out_dir / TRASH
    entries = {ENTRY.fullmatch(p.name)["original"]: p for p in trash_dir.iterdir()} if trash_dir.exists() else {}
    torn = []
    for name, entry in entries.items():
        held = {k for k in listing(entry) if not k.endswith("/")}
        judged = scan(str(entry), min_age_s=0).checkpoints
        whole = held == complete and len(judged) == 1 and judged[0].status == "healthy" \
            and not judged[0].errors
        if not whole and (name in kept or not held <= complete):
            failures.append(f"trash entry {entry.name}: not a whole checkpoint ({sorted(complete - held)[:4]} missing)")
        elif not whole:
            torn.append(name)
    if action == "strip":
        if live != kept:
            failures.append(f"in place {sorted(live)}, the Trainer's own rotation keeps {sorted(kept)}")
        for name in sorted(live - {newest}):
            c = found.get(name)
            if c is None or not c.stripped or c.status != "healthy" or c.errors:
                failures.append(f"{name}: not a healthy stripped checkpoint ({c.status if c else 'missing'})")
            else:
                left = {k for k in listing(out_dir / name) if not k.endswith("/")}
                if {k for k in complete if not layout.is_resume_only(k)} - left:
                    failures.append(f"{name}: stripped of more than its training state")
        if entries:
            failures.append(f"--strip moved checkpoints to the trash: {sorted(entries)}")
    else:
        if live != {newest}:
            failures.append(f"in place {sorted(live)}, want only {newest}")
        if kept - live - set(entries):
            failures.append(f"lost what the Trainer's rotation keeps: {sorted(kept - live - set(entries))}")
    acted = [(a, p, t) for a, p, t in log_times(log) if a in ("trash", "strip")]
    for a, path, when in acted:
        name = Path(path).name
        step = int(name.split("-")[1])
        run_start = max((s for s, _ in prunes if s <= when), default=0.0)
        if saved.get(step, float("inf")) >= run_start:
            failures.append(f"{a} {name} by a prune started before the Trainer had saved it")
    during = sum(1 for _, _, t in acted if t < trainer_end)
    if not during:
        failures.append("no checkpoint was trashed or stripped while the Trainer ran: nothing shown")
    runs.add(f"--{action}", failures, prune_runs=len(prunes), acted=len(acted),
             acted_while_training=during, trainer_kept=sorted(kept), in_place=sorted(live),
             in_trash=sorted(entries), trash_entries_part_removed_by_the_trainer=torn,
             skipped=sum(len(json.loads(p.stdout)["retention"].get("skipped", []))
                         for _, p in prunes if p.returncode == 0))
    runs.finish()


def test_a_save_still_being_written_does_not_cost_the_last_finished_checkpoint(ordinary_runs, tmp_path):
    src = ordinary_runs[0] / "full" / "checkpoint-6"
    run = tmp_path / "results" / "run"
    copy_tree(src, run / "checkpoint-6")
    # the next save, as far as the Trainer's save_model got: no optimizer, no trainer_state.json
    copy_tree(src, run / "checkpoint-7", only=("model.safetensors", "config.json", "generation_config.json"))
    proc = subprocess.run(prune_cmd(tmp_path / "results", ("--keep-last", "1", "--delete")), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert (run / "checkpoint-6" / "trainer_state.json").exists()
    assert (run / "checkpoint-7" / "model.safetensors").exists()   # the save being written: pinned too
