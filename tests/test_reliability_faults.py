"""Disk full and I/O errors during ``ckpt-tools migrate``: one clear error per checkpoint,
nothing partial left in DST, the source intact, the other checkpoints still migrated.

Two sources of errors:

- a faulty file-operations seam (``enospc@write:N``, ``eio@write:N``, ``eio@fsync:N``; see
  ``tests/faulty_fs.py``, entered through ``tests/fault_entry.py``): the N-th file written (left cut to half its
  length) or the N-th fsync of the migration fails with a real ``OSError``. N is spread over the
  whole migration, so every checkpoint and every kind of file (safetensors, torch.save, JSON,
  copies, hard links with ``--link``) is struck, and the fsync of each directory too;
- a real small file system: a tmpfs of a few KiB to a few hundred KiB mounted on DST in a user
  and mount namespace (``unshare``), so that the kernel says ENOSPC to whichever writer fills it
  (safetensors' Rust writer, torch.save, Python's own writes). The tree is inspected inside the
  namespace, before the mount goes away. Skipped where unprivileged namespaces are refused.

Counts: ``CKPT_TOOLS_FAULT_RUNS`` (default 24 runs of the faulty seam, 8 per fault kind; the tmpfs part runs
5 sizes, or a fifth of that count when larger); ``CKPT_TOOLS_FAULT_RUNS_TMPFS`` sets the tmpfs
sizes' count alone. ``CKPT_TOOLS_FAULT_SEED`` fixes where N and the sizes fall between their
strata (printed with a failure's captured output).

Dozens of migrations would spend most of their time importing torch and peft, so each run
is a child forked by a process that has imported them once (``WarmCli``): the child runs
``fault_entry.run(spec, argv)`` (``ckpt_tools.cli.main(argv)`` with the faulty seam), with its
own environment, stdout and stderr.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from reliability import (LOCK_NAME, REPO, cli_env, file_hashes, json_document, seed_from,
                         target_files)
from scorecard import Runs
from test_reliability_crash import MIGRATE_SUBSET, check_dst

from ckpt_tools.cli.exits import ExitCode

FAULT_KINDS = {"enospc@write": ("no space left on device", "writing"),
               "eio@write": ("I/O error", "writing"),
               "eio@fsync": ("I/O error", "syncing")}
PAGE = 4096


# --- settings -----------------------------------------------------------------------------------

def seam_runs() -> int:
    value = os.environ.get("CKPT_TOOLS_FAULT_RUNS")
    return max(len(FAULT_KINDS), int(value)) if value else 24


def tmpfs_runs() -> int:
    value = os.environ.get("CKPT_TOOLS_FAULT_RUNS_TMPFS")
    if value:
        return max(1, int(value))
    return max(5, seam_runs() // 5)


# --- a CLI that does not import torch for every run -----------------------------------------------

_SERVER = r"""
import json, os, shutil, subprocess, sys, traceback
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import fault_entry                                                    # the CLI with a faulty seam
from ckpt_tools import cli
import ckpt_tools.cli.migrate, ckpt_tools.migrate                   # what migrate imports
import peft, safetensors.torch, torch, transformers.utils.logging    # ... and what they import


def run_cli(step):
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.chdir(step["cwd"])
            os.environ.clear()
            os.environ.update(step["env"])
            for fd, path in ((0, os.devnull), (1, step["stdout"]), (2, step["stderr"])):
                f = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
                os.close(f)
            code = fault_entry.run(step.get("fault"), step["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def snapshot(step):
    # DST as it is: every entry, and a copy of it outside DST (a tmpfs mount ends with us)
    root, entries = step["snapshot"], []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            entries.append(os.path.relpath(p, root) + ("/" if n in dirs else ""))
    with open(step["listing"], "w", encoding="utf-8") as fh:
        json.dump(sorted(entries), fh)
    shutil.copytree(root, step["copy"], symlinks=True)
    return len(entries)


for line in sys.stdin:
    out = []
    try:
        for step in json.loads(line):
            if "sh" in step:
                p = subprocess.run(step["sh"], shell=True, capture_output=True, text=True)
                out.append([p.returncode, p.stderr[-500:]])
            elif "argv" in step:
                out.append(run_cli(step))
            else:
                out.append(snapshot(step))
    except Exception:
        out.append(traceback.format_exc())
    print(json.dumps(out), flush=True)
"""


class WarmCli:
    """A process that has imported the CLI and its libraries once and forks a child per command.

    ``prefix``: what to run it under (``unshare ...``): the children share its namespaces.
    ``do(steps)`` runs the steps in order and returns one result each: ``{"sh": cmd}`` → ``[rc,
    stderr]``; ``{"argv", "env", "cwd", "stdout", "stderr"}`` → the CLI's exit status (negative:
    the signal); ``{"snapshot": dir, "listing": file, "copy": dir}`` → how many entries.
    """

    def __init__(self, prefix: tuple[str, ...] = ()):
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", _SERVER], cwd=REPO,
                                     env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def do(self, steps: list[dict], timeout: float = 300) -> list:
        self.proc.stdin.write(json.dumps(steps) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.close()
            raise TimeoutError(f"no answer in {timeout} s to {steps}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI process ended (status {self.proc.wait()})")
        out = json.loads(line)
        if len(out) != len(steps):
            raise RuntimeError(f"the CLI process failed: {out[-1]}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def migrate_step(src: Path, dst: Path, out: Path, fault: str | None = None,
                 link: bool = False) -> dict:
    argv = ["migrate", str(src), str(dst), "--min-age", "0", "--json", "--no-progress",
            "--jobs", "1"] + (["--link"] if link else [])
    return {"argv": argv, "env": cli_env(), "fault": fault, "cwd": str(REPO),
            "stdout": f"{out}.stdout", "stderr": f"{out}.stderr"}


def outputs(out: Path) -> tuple[dict | None, str, str]:
    """(the --json document or None, stdout, stderr) of a run."""
    stdout = Path(f"{out}.stdout").read_text(encoding="utf-8")
    stderr = Path(f"{out}.stderr").read_text(encoding="utf-8")
    return json_document(stdout), stdout, stderr


# --- checks -------------------------------------------------------------------------------------

def stray_entries(entries: list[str], present: set[str]) -> list[str]:
    """Entries of DST (relative, directories ending in '/') that are neither the lock file, nor a
    present target or what it holds, nor a directory above one: temporary directories, half
    targets, empty directories made for a target that failed."""
    above = {"/".join(t.split("/")[:i]) + "/" for t in present for i in range(1, t.count("/") + 1)}
    stray = []
    for e in entries:
        path = e.rstrip("/")
        if e == LOCK_NAME or e in above or any(path == t or path.startswith(t + "/") for t in present):
            continue
        stray.append(e)
    return stray


def walk_entries(root: Path) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                       + ("/" if n in dirs else ""))
    return sorted(out)


def failed_file(reason: str, dst: Path) -> str | None:
    """The path a failure reason names, relative to DST."""
    for verb in (" writing ", " syncing the directory ", " syncing "):
        if verb in reason:
            path = reason.split(verb, 1)[1].split("; ", 1)[0]
            return os.path.relpath(path, dst).replace(os.sep, "/")
    return None


def check_failure_doc(doc: dict | None, rc: int, stderr: str, dst: Path, condition: str,
                      verb: str | None) -> list[str]:
    """The exit status, and every failure one clear line naming the condition and a path in DST."""
    fails = []
    if "Traceback" in stderr:
        fails.append(f"a traceback on stderr: {stderr[-800:]}")
    if doc is None:
        return fails + [f"no JSON document on stdout (rc {rc}): {stderr[-500:]}"]
    want_rc = ExitCode.PROBLEMS if doc["failed"] else ExitCode.OK
    if rc != want_rc:
        fails.append(f"exit status {rc}, not {want_rc}")
    for f in doc["failed"]:
        reason = f["reason"] or ""
        if condition not in reason or str(dst) not in reason or "\n" in reason:
            fails.append(f"{f['source']}: unclear reason {reason!r}")
        elif verb is not None and f" {verb} " not in reason:
            fails.append(f"{f['source']}: the reason does not say it was {verb}: {reason!r}")
        if "Error:" in reason or ".ckpt-tools-tmp-" in reason:
            fails.append(f"{f['source']}: the reason shows an internal name: {reason!r}")
    return fails


# --- shared setup -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faults_setup(undisturbed_migration):
    """SRC (the crash test's subset), the uninterrupted run's DST and what it holds."""
    base, reference = undisturbed_migration("faults", MIGRATE_SUBSET)
    ref, targets = reference.dst, sorted(reference.targets)
    # what a run does, target by target in its order (--jobs 1: sorted): files written, and
    # fsyncs (each file and directory of the target, its parent before and after the rename)
    files = {t: target_files(ref / t) for t in targets}
    dirs = {t: 1 + sum(len(ds) for _, ds, _ in os.walk(ref / t)) for t in targets}
    counts = {"write": sum(len(f) for f in files.values()),
              "fsync": sum(len(files[t]) + dirs[t] + 2 for t in targets)}
    pages = {t: sum(math.ceil((ref / t / f).stat().st_size / PAGE) for f in files[t]) for t in targets}
    return {"base": base, "src": reference.src, "before": reference.before, "ref": ref,
            "targets": targets, "counts": counts, "pages": pages, "seconds": reference.seconds}


# --- a. the faulty seam ------------------------------------------------------------------------

def seam_plan(n_runs: int, counts: dict, rng: random.Random) -> list[dict]:
    """The runs: per fault kind, N from 1 to the last write/fsync of the migration, the others
    one per stratum between; some with --link, some also failing the first unlink of the
    temporary directory's removal (which must then be retried)."""
    kinds = list(FAULT_KINDS)
    per_kind = {k: n_runs // len(kinds) + (i < n_runs % len(kinds)) for i, k in enumerate(kinds)}
    plan = []
    for kind in kinds:
        m, total = per_kind[kind], counts[kind.split("@")[1]]
        for j in range(m):
            if j == 0:
                n = 1
            elif j == m - 1:
                n = total
            else:
                n = 1 + int((j + rng.random()) * total / m)
            fault = f"{kind}:{min(max(n, 1), total)}"
            if len(plan) % 4 == 3:
                fault += ",eio@remove:1"
            plan.append({"fault": fault, "kind": kind,
                         "link": kind.endswith("write") and len(plan) % 3 == 1})
    return plan


def test_enospc_and_eio_fail_one_checkpoint_cleanly_and_rerun_completes(faults_setup):
    s = faults_setup
    src, ref, base, targets = s["src"], s["ref"], s["base"], s["targets"]
    seed = seed_from("CKPT_TOOLS_FAULT_SEED")
    print(f"CKPT_TOOLS_FAULT_SEED={seed}")
    plan = seam_plan(seam_runs(), s["counts"], random.Random(seed))
    runs = Runs("faults-seam", scenario=3,
                title="Disk full / I/O error during `ckpt-tools migrate` (a faulty file-operations "
                      "seam, tests/fault_entry.py: ENOSPC or EIO at the N-th write or fsync)",
                checks=[
                    "exit status 1; exactly one checkpoint failed, its reason one line naming the "
                    "condition (no space left on device / I/O error), writing or syncing, and the "
                    "file under DST; no traceback on stderr",
                    "DST holds the other targets and nothing else: no .ckpt-tools-tmp-*, no half "
                    "target, no empty directory made for the failed one (also when the first unlink "
                    "of that removal fails: eio@remove:1)",
                    "every other target audits healthy with no error and equals the uninterrupted "
                    "run's (tensors bit-equal, other files byte-equal)",
                    "SRC bit-identical (sha256, size, mtime), also with --link (hard links are never "
                    "cut: the fault strikes before the link is made)",
                    "a re-run without the fault exits 0, migrates the failed checkpoint alone and "
                    "skips the others as already migrated; then DST equals the uninterrupted run's",
                ],
                test="test_enospc_and_eio_fail_one_checkpoint_cleanly_and_rerun_completes")
    runs.note(f"seed {seed} (CKPT_TOOLS_FAULT_SEED); {s['counts']['write']} writes and "
              f"{s['counts']['fsync']} fsyncs in a migration of {len(targets)} targets")

    def trial(i: int, cli: WarmCli) -> tuple[list[str], dict]:
        r = plan[i]
        condition, verb = FAULT_KINDS[r["kind"]]
        dst, out = base / f"dst-{i}", base / f"run-{i}"
        fails: list[str] = []
        t0 = time.monotonic()
        (rc,) = cli.do([migrate_step(src, dst, out, r["fault"], r["link"])])
        doc, _, stderr = outputs(out)
        facts = {"fault": r["fault"], "link": r["link"], "rc": rc,
                 "seconds": round(time.monotonic() - t0, 2)}
        fails += check_failure_doc(doc, rc, stderr, dst, condition, verb)
        if doc is None:
            return fails, facts
        failed = [f["target"] for f in doc["failed"]]
        if len(failed) != 1:
            fails.append(f"{len(failed)} checkpoints failed, not 1: {doc['failed']}")
        else:
            facts |= {"failed": failed[0], "file": failed_file(doc["failed"][0]["reason"], dst),
                      "reason": doc["failed"][0]["reason"]}
        if doc["skipped"] or sorted(m["target"] for m in doc["migrated"]) != sorted(set(targets) - set(failed)):
            fails.append(f"migrated {[m['target'] for m in doc['migrated']]}, skipped {doc['skipped']}")
        present = set(targets) - set(failed)
        stray = stray_entries(walk_entries(dst), present)
        if stray:
            fails.append(f"left in DST: {stray[:8]}")
        missing = [t for t in present if not (dst / t).is_dir()]
        if missing:
            fails.append(f"targets missing: {missing}")
        check, _ = check_dst(dst, ref, set(targets))
        fails += check
        if file_hashes(src) != s["before"]:
            fails.append("the source tree changed")
        # the re-run finishes the job
        (rc2,) = cli.do([migrate_step(src, dst, Path(f"{out}-rerun"), None, r["link"])])
        doc2, _, stderr2 = outputs(Path(f"{out}-rerun"))
        if rc2 != ExitCode.OK or doc2 is None or doc2["failed"]:
            fails.append(f"re-run exited {rc2}: {(doc2 or {}).get('failed')} {stderr2[-500:]}")
        else:
            again = [m["target"] for m in doc2["migrated"]]
            done = sorted(k["target"] for k in doc2["skipped"] if k["reason"] == "already migrated")
            if again != failed or done != sorted(present):
                fails.append(f"re-run migrated {again} and skipped {done}, not {failed} alone")
            check, n = check_dst(dst, ref, set(targets))
            fails += [f"after re-run: {c}" for c in check]
            stray = stray_entries(walk_entries(dst), set(targets))
            if n != len(targets) or stray:
                fails.append(f"after re-run: {n} of {len(targets)} targets, left: {stray[:8]}")
            if file_hashes(src) != s["before"]:
                fails.append("after re-run: the source tree changed")
        shutil.rmtree(dst)
        return fails, facts

    workers = 2
    clis = [WarmCli() for _ in range(workers)]
    results: list = [None] * len(plan)
    try:
        def worker(w: int) -> None:
            for i in range(w, len(plan), workers):
                try:
                    results[i] = trial(i, clis[w])
                except Exception as exc:   # noqa: BLE001 - a failure of this run, reported below
                    results[i] = ([f"{type(exc).__name__}: {exc}"], {"fault": plan[i]["fault"]})

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(worker, range(workers)))
    finally:
        for c in clis:
            c.close()
    for i, (fails, facts) in enumerate(results):
        runs.add(plan[i]["fault"] + (" --link" if plan[i]["link"] else ""), fails, **facts)
    hit_targets = {f["failed"] for _, f in results if f.get("failed")}
    hit_files = {f["file"].rsplit("/", 1)[-1] for _, f in results if f.get("file")}
    runs.note(f"checkpoints struck: {len(hit_targets)} of {len(targets)}; files struck: "
              f"{', '.join(sorted(hit_files))}")
    runs.finish(seed=seed, source=list(MIGRATE_SUBSET), targets=len(targets),
                writes=s["counts"]["write"], fsyncs=s["counts"]["fsync"],
                uninterrupted_run_s=round(s["seconds"], 2))
    # the faults must really have landed all over the migration, or the test proves little
    if len(plan) >= 3 * len(targets):
        assert hit_targets == set(targets), f"never struck: {set(targets) - hit_targets}"
    if len(plan) >= 12:
        suffixes = {os.path.splitext(f)[1] for f in hit_files}
        assert {".safetensors", ".json", ".pt"} <= suffixes, suffixes


# --- b. a real full file system -----------------------------------------------------------------

UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")


def namespaces_refused(tmp: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a user namespace here, or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run([*UNSHARE, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{tmp}'"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if p.returncode != 0:
        return f"no tmpfs in a user namespace here: {p.stderr.strip()[:300]}"
    return None


def tmpfs_sizes(n: int, setup: dict, rng: random.Random) -> list[tuple[int, str]]:
    """(size in KiB, why) of n runs: one page (the first adapter does not fit: safetensors' writer
    fails), the first target's adapters exactly (its router.pt does not fit: torch.save fails),
    then sizes spread from 10% to 80% of what the whole migration needs."""
    first = setup["targets"][0]
    adapters = sum(math.ceil((setup["ref"] / first / f).stat().st_size / PAGE)
                   for f in target_files(setup["ref"] / first) if f.startswith("peft_adapters/"))
    total = sum(setup["pages"].values())
    out = [(1, "one page"), (adapters, f"the adapters of {first}")]
    rest = n - len(out)
    for j in range(max(0, rest)):
        share = 0.1 + 0.7 * (j + rng.random()) / rest
        out.append((max(1, int(share * total)), f"{share:.0%} of the migration"))
    return [(pages * PAGE // 1024, why) for pages, why in out[:n]]


def test_a_full_tmpfs_fails_what_does_not_fit_cleanly(faults_setup):
    s = faults_setup
    src, ref, base, targets = s["src"], s["ref"], s["base"], s["targets"]
    why_not = namespaces_refused(base / "probe")
    if why_not:
        pytest.skip(why_not)
    seed = seed_from("CKPT_TOOLS_FAULT_SEED")
    print(f"CKPT_TOOLS_FAULT_SEED={seed}")
    sizes = tmpfs_sizes(tmpfs_runs(), s, random.Random(seed))
    total_k = sum(s["pages"].values()) * PAGE // 1024
    runs = Runs("faults-tmpfs", scenario=3,
                title="Disk full during `ckpt-tools migrate` (a real tmpfs of a few KiB to a few "
                      "hundred KiB on DST)",
                checks=[
                    "exit status 1 when any checkpoint failed (0 otherwise); every failed "
                    "checkpoint one reason, one line, 'no space left on device writing <file under "
                    "DST>'; no traceback on stderr; every checkpoint migrated or failed",
                    "inside the namespace, right after the run: DST holds the migrated targets and "
                    "nothing else (no .ckpt-tools-tmp-*, no half target, no empty directory)",
                    "every migrated target audits healthy with no error and equals the "
                    "uninterrupted run's",
                    "SRC bit-identical",
                    "the tmpfs grown (remount), a re-run exits 0, migrates exactly the failed "
                    "ones, and DST then equals the uninterrupted run's",
                ],
                test="test_a_full_tmpfs_fails_what_does_not_fit_cleanly")
    runs.note(f"seed {seed}; the whole migration needs {total_k} KiB of tmpfs pages")

    def trial(cli: WarmCli, i: int, size_k: int) -> tuple[list[str], dict]:
        dst, out = base / f"tmpfs-{i}", base / f"tmpfs-run-{i}"
        rerun = Path(f"{out}-rerun")
        dst.mkdir()
        mounted, rc, _, grown, rc2, _, _ = cli.do([
            {"sh": f"mount -t tmpfs -o size={size_k}k tmpfs '{dst}'"},
            migrate_step(src, dst, out),
            {"snapshot": str(dst), "listing": f"{out}.listing", "copy": f"{out}.copy"},
            {"sh": f"mount -o remount,size={2 * total_k + 64}k '{dst}'"},
            migrate_step(src, dst, rerun),
            {"snapshot": str(dst), "listing": f"{rerun}.listing", "copy": f"{rerun}.copy"},
            {"sh": f"umount '{dst}'"},
        ])
        fails: list[str] = []
        if mounted[0] != 0 or grown[0] != 0:
            return [f"mount failed: {mounted} {grown}"], {"rc": rc}
        doc, _, stderr = outputs(out)
        fails += check_failure_doc(doc, rc, stderr, dst, "no space left on device", "writing")
        facts: dict = {"rc": rc}
        if doc is None:
            return fails, facts
        failed = sorted(f["target"] for f in doc["failed"])
        migrated = sorted(m["target"] for m in doc["migrated"])
        facts |= {"migrated": len(migrated), "failed": len(failed),
                  "files": sorted({failed_file(f["reason"], dst) or "?" for f in doc["failed"]})}
        if sorted(migrated + failed) != targets or doc["skipped"]:
            fails.append(f"migrated {migrated}, failed {failed}, skipped {doc['skipped']}")
        if not failed:
            fails.append(f"nothing failed in {size_k} KiB")
        stray = stray_entries(json.loads(Path(f"{out}.listing").read_text(encoding="utf-8")),
                              set(migrated))
        if stray:
            fails.append(f"left in DST: {stray[:8]}")
        check, n = check_dst(Path(f"{out}.copy"), ref, set(targets))
        fails += check
        if n != len(migrated):
            fails.append(f"{n} targets in DST, {len(migrated)} migrated")
        if file_hashes(src) != s["before"]:
            fails.append("the source tree changed")
        # room again: the re-run finishes the job
        doc2, _, stderr2 = outputs(rerun)
        if rc2 != ExitCode.OK or doc2 is None or doc2["failed"]:
            return fails + [f"re-run exited {rc2}: {(doc2 or {}).get('failed')} {stderr2[-500:]}"], facts
        again = sorted(m["target"] for m in doc2["migrated"])
        if again != failed:
            fails.append(f"re-run migrated {again}, not {failed}")
        check, n = check_dst(Path(f"{rerun}.copy"), ref, set(targets))
        fails += [f"after re-run: {c}" for c in check]
        stray = stray_entries(json.loads(Path(f"{rerun}.listing").read_text(encoding="utf-8")),
                              set(targets))
        if n != len(targets) or stray:
            fails.append(f"after re-run: {n} of {len(targets)} targets, left: {stray[:8]}")
        for copy in (f"{out}.copy", f"{rerun}.copy"):
            shutil.rmtree(copy)
        return fails, facts

    cli = WarmCli(UNSHARE)
    try:
        for i, (size_k, why) in enumerate(sizes):
            t0 = time.monotonic()
            try:
                fails, facts = trial(cli, i, size_k)
            except Exception as exc:   # noqa: BLE001 - a failure of this run
                fails, facts = [f"{type(exc).__name__}: {exc}"], {}
            runs.add(f"tmpfs size={size_k}k ({why})", fails, size_k=size_k, size_for=why,
                     seconds=round(time.monotonic() - t0, 2), **facts)
    finally:
        cli.close()
    struck = sorted({f.rsplit("/", 1)[-1] for r in runs.records for f in r.get("files", ())})
    runs.note(f"files the kernel refused: {', '.join(struck)}")
    runs.finish(seed=seed, source=list(MIGRATE_SUBSET), targets=len(targets), needs_k=total_k)
    if len(sizes) >= 2:
        # the kernel's ENOSPC reached safetensors' Rust writer and torch.save, not only Python's
        assert "adapter_model.safetensors" in struck and "router.pt" in struck, struck
