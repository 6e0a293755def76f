"""Reliability: permissions (scenario 4) and symlink attacks (scenario 6), end to end.

Every case runs the real command line (``python -m ckpt_tools.cli ... --json``) in a subprocess
on its own copy of a few runs of the fixture tree, and is compared with the same command on an
unrestricted copy (the baseline, run once per module). Each case is one scorecard run; its
failures are collected, not asserted one by one, and ``Runs.finish`` fails the test at the end.

Permissions: root reads and writes whatever the mode bits say, so when the tests run as root
every command runs as uid 1000 inside a user namespace (``unshare --user --map-user=1000``):
root's files are that user's own files there, and a mode-000 file, a mode-555 directory or a
file owned by uid 12345 (mode 600) really refuses it, as they would a normal user.

Symlinks: a plan is made, then a file or directory is swapped for a symlink out of the root,
then the plan is executed; and the four commands are run on a tree full of symlink loops and
links to ``/dev/zero`` and to FIFOs. Each subprocess runs under a 300 s limit: a guard against a
hang, not a timing assertion (a command takes seconds, migrate ~20 s on two loaded cores).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability import LOCK_NAME, REPO, cli_env, json_document
from scorecard import Runs

from ckpt_tools import plan_prune, scan
from fixtures.copying import copy_tree

HANG_GUARD_S = 300      # a guard against a hang only: far beyond any command's run time
MARKER = ".ckpt-tools-migrated.json"
TMP_MARKS = (".ckpt-tools-tmp-", ".ckpt-tools-old-")
OTHER_UID = 12345
# three redundant checkpoints (two Trainer-written canonical+merged, one v3) and a legacy v2 one
SUBSET = ("run_trainer", "seed_v3", "hybrid_v2")
CK2, CK4 = "run_trainer/checkpoint-2", "run_trainer/checkpoint-4"
V3, V2 = "seed_v3/checkpoint-100", "hybrid_v2/checkpoint-100"
WORKERS = 2


# --- running the command line -------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def user_prefix() -> tuple[tuple[str, ...] | None, str]:
    """(argv prefix that runs a command as a non-root user, why not when None)."""
    if os.geteuid() != 0:
        return (), ""
    if shutil.which("unshare") is None:
        return None, "running as root and unshare(1) is not installed"
    prefix = ("unshare", "--user", "--map-user=1000", "--map-group=1000")
    probe_dir = Path(tempfile.mkdtemp(prefix="ckpt-userns-"))
    try:
        denied = probe_dir / "denied"
        denied.write_bytes(b"x")
        denied.chmod(0)
        code = ("import os, sys, ckpt_tools\n"
                "try:\n    open(sys.argv[1], 'rb')\nexcept PermissionError:\n"
                "    print(os.getuid())\n")
        proc = subprocess.run([*prefix, sys.executable, "-c", code, str(denied)], cwd=REPO,
                              capture_output=True, text=True, timeout=HANG_GUARD_S, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"unshare --user cannot run the interpreter: {exc}"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if proc.returncode != 0 or proc.stdout.strip() != "1000":
        return None, ("this machine refuses an unprivileged user namespace (unshare --user "
                      f"--map-user=1000: rc {proc.returncode}, {proc.stderr.strip()[:200]!r}), "
                      "and as root no file mode denies anything")
    return prefix, ""


def child_env() -> dict:
    """``cli_env()`` with the repository first on PYTHONPATH, no bytecode written, COLUMNS unset."""
    env = cli_env(PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("COLUMNS", None)
    return env


@dataclass
class Result:
    args: tuple[str, ...]
    rc: int | None          # None: killed by the hang guard
    stdout: str
    stderr: str
    seconds: float

    @functools.cached_property
    def doc(self) -> dict | None:
        return json_document(self.stdout)

    def facts(self) -> dict:
        return {"rc": self.rc, "seconds": round(self.seconds, 2)}


def cli(*args) -> Result:
    """``ckpt-tools ARGS`` in a subprocess (as a non-root user where possible), hang-guarded."""
    prefix, _ = user_prefix()
    argv = [*(prefix or ()), sys.executable, "-m", "ckpt_tools.cli", *map(str, args)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=HANG_GUARD_S)
        return Result(tuple(map(str, args)), proc.returncode, proc.stdout, proc.stderr,
                      time.monotonic() - t0)
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return Result(tuple(map(str, args)), None, text(exc.stdout), text(exc.stderr),
                      time.monotonic() - t0)


def sane(res: Result, expected_rc: int | set[int]) -> list[str]:
    """Failures of the checks every run shares: finished, documented exit status, no traceback,
    one JSON document on stdout."""
    name = " ".join(res.args[:1])
    if res.rc is None:
        return [f"{name}: still running after {HANG_GUARD_S} s (killed by the hang guard)"]
    out = []
    wanted = {expected_rc} if isinstance(expected_rc, int) else expected_rc
    if res.rc not in wanted:
        out.append(f"{name}: exit {res.rc}, expected {sorted(wanted)}; stderr: {res.stderr.strip()[-400:]!r}")
    if "Traceback (most recent call last)" in res.stdout + res.stderr:
        out.append(f"{name}: printed a traceback: {res.stderr.strip()[-400:]!r}")
    # a run that cannot start (rc != 0, its one line on stderr) may leave stdout empty
    if "--json" in res.args and res.doc is None and (res.rc == 0 or res.stdout.strip()):
        out.append(f"{name}: stdout is not one JSON document: {res.stdout[:200]!r}")
    return out


# --- trees ----------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """rel path → what it is: kind, mode, size, mtime, sha256 (files), target (links), rdev."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_uid, st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                try:
                    with open(p, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            h.update(chunk)
                    digest = h.hexdigest()
                except PermissionError:   # only when the tests themselves do not run as root
                    digest = "unreadable"
                out[rel] = ("file", mode, st.st_uid, st.st_size, st.st_mtime_ns, digest)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode), mode, st.st_ino, st.st_rdev)
    return out


def without_dir_mtimes(snap: dict) -> dict:
    """For commands that unlink: a directory's mtime moves when an entry goes."""
    return {k: (x[:3] if x[0] == "dir" else x) for k, x in snap.items()}


def tree_diff(before: dict, after: dict, *, removed_ok=(), added_ok=(), what: str = "tree") -> list[str]:
    """What changed between two snapshots, beyond the removals and additions allowed."""
    out = []
    for rel in sorted(set(before) | set(after)):
        if rel in before and rel not in after:
            if rel not in removed_ok:
                out.append(f"{what}: {rel} was removed")
        elif rel in after and rel not in before:
            if rel not in added_ok:
                out.append(f"{what}: {rel} appeared")
        elif before[rel] != after[rel]:
            out.append(f"{what}: {rel} changed ({before[rel]} → {after[rel]})")
    return out[:20]


def dst_view(dst: Path) -> dict[str, tuple]:
    """A migrated tree, comparable between two runs: no mtimes, no marker (it holds a time)."""
    out = {}
    for rel, v in snapshot(dst).items():
        if rel.endswith(MARKER) or rel == LOCK_NAME:
            continue
        if v[0] == "dir":
            out[rel] = v[:2]
        elif v[0] == "file":
            out[rel] = (v[0], v[1], v[3], v[5])    # kind, mode, size, sha256
        else:
            out[rel] = v
    return out


def under(rel: str, victims) -> bool:
    return any(rel == v or rel.startswith(v + "/") for v in victims)


def set_old(path: Path, now: float) -> None:
    t = now - 2 * 24 * 3600
    os.utime(path, (t, t), follow_symlinks=False)


def symlink_old(target, link: Path, now: float) -> None:
    os.symlink(target, link)
    set_old(link, now)


# --- comparing results with the baseline ------------------------------------------------------------

def by_checkpoint(doc: dict | None) -> dict[str, dict]:
    if not doc:
        return {}
    return {c["path"]: {k: v for k, v in c.items() if k != "root"} for c in doc.get("checkpoints", [])}


def prune_items(doc: dict | None) -> dict[str, tuple]:
    out = {}
    for kind in ("deleted", "skipped", "failed"):
        for item in (doc or {}).get(kind, []):
            out[item["path"]] = (kind, item.get("bytes", item.get("reason")))
    return out


def migrate_items(doc: dict | None) -> dict[str, tuple]:
    out = {}
    for kind in ("migrated", "skipped", "failed"):
        for item in (doc or {}).get(kind, []):
            out[item["source"]] = (kind, item)
    return out


def same_elsewhere(got: dict, base: dict, victims, what: str) -> list[str]:
    """Every entry outside ``victims`` equals the baseline's, and none is missing or extra."""
    out = []
    keys = {k for k in set(got) | set(base) if not under(k, victims)}
    for k in sorted(keys):
        if k not in got:
            out.append(f"{what}: {k} missing (baseline: {base[k]})")
        elif k not in base:
            out.append(f"{what}: {k} not in the baseline: {got[k]}")
        elif got[k] != base[k]:
            out.append(f"{what}: {k} differs from the unrestricted run: {got[k]} != {base[k]}")
    return out[:10]


def problems_at(entry: dict | None, code: str, path: str | None = None) -> bool:
    return bool(entry) and any(p["code"] == code and (path is None or p["path"] == path)
                               for p in entry.get("problems", []))


# --- the baseline: the same commands on an unrestricted copy ---------------------------------------

@dataclass
class Baseline:
    audit: Result
    validate: Result
    prune: Result
    migrate: Result
    dst: dict


@pytest.fixture(scope="module")
def baseline(results_tree, tmp_path_factory) -> Baseline:
    src, _, _ = results_tree
    base = tmp_path_factory.mktemp("access-baseline")
    ro = copy_tree(src, base / "ro", only=SUBSET)
    pr = copy_tree(src, base / "pr", only=SUBSET)
    dst = base / "dst"
    jobs = {"audit": ("audit", "--json", ro), "validate": ("validate", "--json", ro),
            "prune": ("prune", "--yes", "--json", pr), "migrate": ("migrate", "--json", ro, dst)}
    with ThreadPoolExecutor(WORKERS) as pool:
        done = {k: pool.submit(cli, *a) for k, a in jobs.items()}
        res = {k: f.result() for k, f in done.items()}
    for k, r in res.items():
        assert r.rc == 0 and r.doc is not None, f"baseline {k} failed: rc {r.rc} {r.stderr[-800:]}"
    return Baseline(**res, dst=dst_view(dst))


# ==================================================================================================
# Scenario 4: permissions
# ==================================================================================================

@dataclass
class PermCase:
    name: str
    victims: tuple[str, ...]         # what the restriction is expected to affect (paths in the root)
    restrict: Callable[[Path, Path], Path | None]   # (root, case dir) → DST, when it sets one
    commands: tuple[str, ...]        # in order, on the same copy
    denied: str | None = None        # the path the permission-denied problem names


def _chmod(rel: str, mode: int):
    def restrict(root: Path, case_dir: Path):
        os.chmod(root / rel, mode)
    return restrict


def _other_user(rel: str):
    def restrict(root: Path, case_dir: Path):
        os.chown(root / rel, OTHER_UID, OTHER_UID)
        os.chmod(root / rel, 0o600)
    return restrict


def _read_only_dst_parent(root: Path, case_dir: Path) -> Path:
    parent = case_dir / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "dst"


def _read_only_target_parent(root: Path, case_dir: Path) -> Path:
    dst = case_dir / "dst"
    (dst / "run_trainer").mkdir(parents=True)
    (dst / "run_trainer").chmod(0o555)
    return dst


PERM_CASES = (
    PermCase("unreadable merged file", (CK4,), _chmod(f"{CK4}/model.safetensors", 0),
             ("audit", "prune"), f"{CK4}/model.safetensors"),
    PermCase("unreadable adapter file", (CK4,),
             _chmod(f"{CK4}/peft_adapters/expert_1/adapter_model.safetensors", 0),
             ("audit", "validate", "prune"), f"{CK4}/peft_adapters/expert_1/adapter_model.safetensors"),
    PermCase("unreadable config json", (CK4,),
             _chmod(f"{CK4}/peft_adapters/expert_0/adapter_config.json", 0),
             ("audit", "prune"), f"{CK4}/peft_adapters/expert_0/adapter_config.json"),
    PermCase("unlistable directory inside a checkpoint", (CK4,), _chmod(f"{CK4}/dylo_moe_state", 0),
             ("audit", "prune"), f"{CK4}/dylo_moe_state"),
    PermCase("unlistable run directory", ("seed_v3",), _chmod("seed_v3", 0),
             ("audit", "prune", "migrate"), "seed_v3"),
    PermCase("unwritable checkpoint directory", (CK4,), _chmod(CK4, 0o555), ("audit", "prune")),
    PermCase("file owned by another user", (V3,), _other_user(f"{V3}/dylo_moe_state/router.pt"),
             ("audit", "prune"), f"{V3}/dylo_moe_state/router.pt"),
    PermCase("unwritable DST parent", (), _read_only_dst_parent, ("migrate",)),
    PermCase("unwritable target parent inside DST", ("run_trainer",), _read_only_target_parent,
             ("migrate",)),
)


def unlistable_failures(cmd: str, case: PermCase, res: Result, mine: dict) -> list[str]:
    """A run directory ``cmd`` could not list: it reports nothing under it (``mine``), and its
    stderr names the directory as permission-denied."""
    f = []
    if mine:
        f.append(f"{cmd}: reports items under the directory it could not list: {mine}")
    if not ("permission-denied" in res.stderr and case.denied in res.stderr):
        f.append(f"{cmd}: stderr does not name the unlistable {case.denied}: {res.stderr[-300:]!r}")
    return f


def _check_perm_command(case: PermCase, cmd: str, res: Result, base: Baseline, root: Path,
                        before: dict, after: dict, dst: Path) -> list[str]:
    v = case.victims
    f: list[str] = []
    if cmd in ("audit", "validate"):
        bdoc = getattr(base, cmd).doc
        got = by_checkpoint(res.doc)
        unchanged = case.name == "unwritable checkpoint directory"   # reading is not refused
        if case.name == "unlistable run directory":
            expected_rc = 1
            top = (res.doc or {}).get("problems", [])
            if not any(p["code"] == "permission-denied" and p["path"] == case.denied for p in top):
                f.append(f"{cmd}: no top-level permission-denied problem for {case.denied}: {top}")
            if any(under(k, v) for k in got):
                f.append(f"{cmd}: reports checkpoints under the directory it could not list")
        elif unchanged:
            expected_rc = 0
            f += same_elsewhere(got, by_checkpoint(bdoc), (), cmd)
        else:
            expected_rc = 1
            entry = got.get(v[0])
            if (entry is None or entry["status"] != "broken"
                    or not problems_at(entry, "permission-denied", case.denied)):
                f.append(f"{cmd}: {v[0]} is not broken with permission-denied at {case.denied}: "
                         f"{entry and (entry['status'], entry['problems'])}")
            elif cmd == "validate" and entry.get("valid") is not False:
                f.append(f"{cmd}: {v[0]} reported valid")
        f[:0] = sane(res, expected_rc)
        if not unchanged:
            f += same_elsewhere(got, by_checkpoint(bdoc), v, cmd)
            if (res.doc or {}).get("problems") and case.name != "unlistable run directory":
                f.append(f"{cmd}: unexpected top-level problems: {res.doc['problems']}")
        f += tree_diff(before, after, what=f"{cmd} changed the tree")
    elif cmd == "prune":
        got, bitems = prune_items(res.doc), prune_items(base.prune.doc)
        victim_merged = {k for k, (kind, _) in bitems.items() if under(k, v) and kind == "deleted"}
        if case.name == "unwritable checkpoint directory":
            f += sane(res, 1)
            for k in sorted(victim_merged):
                kind, reason = got.get(k, (None, None))
                if kind != "failed" or "permission denied" not in str(reason).lower():
                    f.append(f"prune: {k}: expected a failure naming the permission, got {kind}: {reason}")
        else:
            f += sane(res, 0)
            mine = {k: x for k, x in got.items() if under(k, v)}
            if case.name == "unlistable run directory":
                f += unlistable_failures("prune", case, res, mine)
            elif not mine or any(kind != "skipped" or "permission-denied" not in str(reason)
                                 for kind, reason in mine.values()):
                f.append(f"prune: {v[0]} not skipped for permission-denied: {mine}")
        f += same_elsewhere(got, bitems, v, "prune")
        # exactly the baseline's deletions outside the victim, plus the lock file
        gone = {k for k, (kind, _) in bitems.items() if kind == "deleted" and not under(k, v)}
        f += tree_diff(before, after, removed_ok=gone, added_ok={LOCK_NAME}, what="prune")
    elif cmd == "migrate":
        got, bitems = migrate_items(res.doc), migrate_items(base.migrate.doc)
        f += tree_diff(before, after, added_ok={LOCK_NAME}, what="migrate changed SRC")
        if case.name == "unwritable DST parent":
            f += sane(res, 1)
            if not ("Permission denied" in res.stderr and str(dst) in res.stderr):
                f.append(f"migrate: stderr does not name {dst} and the permission: {res.stderr[-300:]!r}")
            if len(res.stderr.strip().splitlines()) != 1:
                f.append(f"migrate: more than one line on stderr: {res.stderr[-500:]!r}")
            if os.path.lexists(dst):
                f.append(f"migrate: {dst} was created")
            return f
        f += sane(res, 1)
        mine = {k: x for k, x in got.items() if under(k, v)}
        if case.name == "unlistable run directory":
            f += unlistable_failures("migrate", case, res, mine)
        else:   # unwritable target parent
            want = {k for k in bitems if under(k, v)}
            for k in sorted(want):
                kind, item = mine.get(k, (None, {}))
                if kind != "failed" or "permission denied" not in str(item.get("reason")).lower():
                    f.append(f"migrate: {k}: expected a failure naming the permission, got {kind}: {item}")
        f += same_elsewhere(got, bitems, v, "migrate")
        view = dst_view(dst)
        f += same_elsewhere({k: x for k, x in view.items() if not k.startswith(".")},
                            {k: x for k, x in base.dst.items() if not k.startswith(".")}, v, "DST")
        mine_dst = {k: x for k, x in view.items() if under(k, v) and x[0] != "dir"}
        if mine_dst:
            f.append(f"migrate: wrote files for what it could not read or write: {sorted(mine_dst)[:5]}")
        left = [k for k in snapshot(dst) if any(m in k for m in TMP_MARKS)]
        if left:
            f.append(f"migrate: left temporary directories: {left}")
    return f


RunRecord = tuple[str, list[str], dict]    # (name, failures, facts) for Runs.add


def _run_perm_case(case: PermCase, src: Path, case_dir: Path, base: Baseline) -> list[RunRecord]:
    root = copy_tree(src, case_dir / "results", only=SUBSET)
    dst = case.restrict(root, case_dir) or case_dir / "dst"
    runs = []
    for cmd in case.commands:
        args = {"audit": ("audit", "--json", root), "validate": ("validate", "--json", root),
                "prune": ("prune", "--yes", "--json", root),
                "migrate": ("migrate", "--json", root, dst)}[cmd]
        before = snapshot(root)
        res = cli(*args)
        after = snapshot(root)
        if cmd == "prune":
            before, after = without_dir_mtimes(before), without_dir_mtimes(after)
        failures = _check_perm_command(case, cmd, res, base, root, before, after, dst)
        runs.append((f"{case.name}: {cmd}", failures, res.facts()))
    return runs


def test_permission_denied_is_reported_and_affects_nothing_else(results_tree, baseline, tmp_path):
    prefix, why = user_prefix()
    if prefix is None:
        pytest.skip(why)
    src, _, _ = results_tree
    runs = Runs("permissions", scenario=4,
                title="Permissions: unreadable file, unlistable or unwritable directory, another "
                      "user's file, unwritable DST → permission-denied, nothing else affected",
                checks=["the restricted checkpoint is broken with a permission-denied problem naming "
                        "the path (prune/migrate: skipped or failed with a reason naming the "
                        "permission; an unlistable directory: a permission-denied problem)",
                        "exit status as documented",
                        "no traceback; stdout is one JSON document",
                        "every other checkpoint's result equals the same command's on an "
                        "unrestricted copy (migrate: the files written too)",
                        "no file changed but what the command does (tree hashed before and after)"],
                test="test_permission_denied_is_reported_and_affects_nothing_else")
    runs.note("the commands run as uid 1000 in a user namespace (unshare --user --map-user=1000)"
              if prefix else "the commands run as the current (non-root) user")
    cases = PERM_CASES
    if os.geteuid() != 0:   # only root can give a file to another user
        cases = tuple(c for c in PERM_CASES if c.name != "file owned by another user")
        runs.note("not run: a file owned by another user (the tests do not run as root)")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(_run_perm_case, case, src, tmp_path / f"case{i}", baseline)
                   for i, case in enumerate(cases)]
        for fut in futures:
            for name, failures, facts in fut.result():
                runs.add(name, failures, **facts)
    runs.finish()


# ==================================================================================================
# Scenario 6: symlink attacks
# ==================================================================================================

def outside_state(outside: Path) -> dict:
    """The directory outside the root, hashed, plus /dev/zero as it is."""
    snap = snapshot(outside)
    z = os.lstat("/dev/zero")
    snap["/dev/zero"] = ("special", stat.S_IFMT(z.st_mode), z.st_ino, z.st_rdev)
    return snap


# --- plan, swap, execute: prune ----------------------------------------------------------------

def _swap_merged_for_outside_link(root: Path, outside: Path, now: float) -> set[str]:
    merged = root / CK4 / "model.safetensors"
    shutil.copy2(merged, outside / "model.safetensors")      # the same bytes, outside
    merged.unlink()
    symlink_old(outside / "model.safetensors", merged, now)
    return {f"{CK4}/model.safetensors"}


def _swap_merged_for_dev_zero(root: Path, outside: Path, now: float) -> set[str]:
    merged = root / V3 / "model.safetensors"
    merged.unlink()
    symlink_old("/dev/zero", merged, now)
    return {f"{V3}/model.safetensors"}


def _swap_checkpoint_dir(root: Path, outside: Path, now: float) -> set[str]:
    shutil.move(root / CK4, outside / "moved-checkpoint")
    os.symlink(outside / "moved-checkpoint", root / CK4)
    return {f"{CK4}/model.safetensors"}


def _swap_run_dir(root: Path, outside: Path, now: float) -> set[str]:
    shutil.move(root / "run_trainer", outside / "moved-run")
    os.symlink(outside / "moved-run", root / "run_trainer")
    return {f"{CK2}/model.safetensors", f"{CK4}/model.safetensors"}


PRUNE_SWAPS = (
    ("prune: merged file swapped for a symlink to a file outside, between plan and execute",
     _swap_merged_for_outside_link, ("replaced", "changed since the plan")),
    ("prune: merged file swapped for a symlink to /dev/zero, between plan and execute",
     _swap_merged_for_dev_zero, ("replaced", "changed since the plan")),
    ("prune: checkpoint directory swapped for a symlink to outside, between plan and execute",
     _swap_checkpoint_dir, ("symlink",)),
    ("prune: run directory swapped for a symlink to outside, between plan and execute",
     _swap_run_dir, ("symlink",)),
    ("prune: checkpoint directory swapped for a symlink to outside, after its re-validation",
     None, ("moved or replaced",)),
)


def _prune_swap_case(name, swap, reasons, src: Path, case_dir: Path, now: float) -> tuple[list[str], dict]:
    from ckpt_tools.prune import Revalidator, execute_prune
    root = copy_tree(src, case_dir / "results", only=("run_trainer", "seed_v3"))
    outside = case_dir / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("a file nobody may touch\n")
    plan = plan_prune(scan(str(root), now=now, min_age_s=3600).checkpoints)
    planned = {d.path for d in plan.deletions}
    real = Revalidator(min_age_s=3600)
    seen: dict = {}
    if swap is not None:
        affected = swap(root, outside, now)
        revalidate = real
    else:
        affected = {f"{CK4}/model.safetensors"}

        def revalidate(r, path):
            fresh = real(r, path)
            if path == CK4:      # validated; now the directory goes, a symlink to a copy comes
                shutil.copytree(root / CK4, outside / "copy", symlinks=True)
                os.rename(root / CK4, root / "run_trainer" / "checkpoint-4.moved")
                os.symlink(outside / "copy", root / CK4)
                seen["outside"] = outside_state(outside)
                seen["tree"] = without_dir_mtimes(snapshot(root))
            return fresh
    before_out = outside_state(outside)
    before_tree = without_dir_mtimes(snapshot(root))
    result = execute_prune(plan, revalidate=revalidate)
    after_out, after_tree = outside_state(outside), without_dir_mtimes(snapshot(root))
    f: list[str] = []
    f += tree_diff(seen.get("outside", before_out), after_out, what="outside the root")
    changed = {s.path: s.reason for s in result.changed}
    if set(changed) != affected:
        f.append(f"skipped as changed: {sorted(changed)}, expected {sorted(affected)}")
    for path, reason in changed.items():
        if not any(r in reason for r in reasons):
            f.append(f"{path}: reason {reason!r} does not say {' or '.join(reasons)}")
    deleted = {d.path for d in result.deleted}
    if deleted != planned - affected:
        f.append(f"deleted {sorted(deleted)}, expected {sorted(planned - affected)}")
    if result.failed:
        f.append(f"failed: {[(x.path, x.reason) for x in result.failed]}")
    f += tree_diff(seen.get("tree", before_tree), after_tree, removed_ok=deleted, what="the root")
    return f, {"planned": len(planned), "deleted": len(deleted), "skipped_changed": len(changed)}


# --- plan, swap, execute: migrate --------------------------------------------------------------

def _migrate_swap_cases(src: Path, case_dir: Path, now: float, base: Baseline) -> list[RunRecord]:
    from ckpt_tools.migrate import MigrateOptions, execute_migrate, plan_migrate
    root = copy_tree(src, case_dir / "results", only=SUBSET)
    outside, dst = case_dir / "outside", case_dir / "dst"
    outside.mkdir()
    plan = plan_migrate(str(root), str(dst), MigrateOptions(), now=now)
    planned = {i.source for i in plan.items if i.action == "migrate"}
    # the v3 checkpoint's merged file becomes a link to the same bytes outside; the v2
    # checkpoint's directory becomes a link to a copy of it outside
    merged = root / V3 / "model.safetensors"
    shutil.copy2(merged, outside / "model.safetensors")
    merged.unlink()
    symlink_old(outside / "model.safetensors", merged, now)
    shutil.move(root / V2, outside / "moved-checkpoint")
    os.symlink(outside / "moved-checkpoint", root / V2)
    before_out, before_tree = outside_state(outside), snapshot(root)
    t0 = time.monotonic()
    result = execute_migrate(plan)
    seconds = round(time.monotonic() - t0, 2)
    after_out, after_tree = outside_state(outside), snapshot(root)
    outcomes = {o.source: o for o in result.migrated + result.skipped + result.failed}
    common = tree_diff(before_out, after_out, what="outside the root")
    common += tree_diff(before_tree, after_tree, what="SRC")
    view = dst_view(dst)
    common += [f"DST holds a symlink or special file: {k}" for k, x in view.items()
               if x[0] in ("link", "special")]
    common += [f"left a temporary directory: {k}" for k in view if any(m in k for m in TMP_MARKS)]
    runs = []
    for name, victim in (("migrate: merged file swapped for a symlink to outside, between plan "
                          "and execute", V3),
                         ("migrate: checkpoint directory swapped for a symlink to outside, between "
                          "plan and execute", V2)):
        f = list(common)
        o = outcomes.get(victim)
        if victim not in planned:
            f.append(f"{victim} was not planned for migration")
        if o is None or o.outcome == "migrated":
            f.append(f"{victim}: {o and o.outcome}: read through a symlink out of SRC")
        elif "outside" not in (o.reason or ""):
            f.append(f"{victim}: {o.outcome}, reason {o.reason!r} does not say it leads outside")
        written = [k for k, x in view.items() if under(k, (victim,)) and x[0] != "dir"]
        if written:
            f.append(f"{victim}: target files written: {written[:3]}")
        # the control: the Trainer run, migrated exactly as on an unrestricted copy
        for ck in (CK2, CK4):
            got = outcomes.get(ck)
            want = migrate_items(base.migrate.doc).get(ck)
            if got is None or want is None or ("migrated", got.to_dict()) != want:
                f.append(f"{ck}: {got and got.to_dict()} differs from the unrestricted run {want}")
        f += same_elsewhere({k: x for k, x in view.items() if under(k, ("run_trainer",))},
                            {k: x for k, x in base.dst.items() if under(k, ("run_trainer",))},
                            (), "DST")
        runs.append((name, f, {"outcome": o and o.outcome, "seconds": seconds}))
    return runs


# --- the command line on a tree full of loops and links out -------------------------------------

def make_link_tree(src: Path, case_dir: Path, now: float) -> tuple[Path, Path, dict]:
    """SUBSET plus two canonical checkpoints, with loops, links out, FIFOs. → (root, outside, facts)"""
    from fixtures.copying import copy_file
    root = copy_tree(src, case_dir / "results", only=SUBSET)
    outside = case_dir / "outside"
    outside.mkdir()
    for step in (100, 200):
        shutil.copytree(src / "run canonical" / f"checkpoint-{step}", root / "linked" / f"checkpoint-{step}",
                        symlinks=True, copy_function=copy_file)
    os.mkfifo(outside / "fifo")
    (outside / "keep.txt").write_text("a file nobody may touch\n")
    # a carried file that points out of SRC, and one that points to a file inside SRC
    shutil.move(root / "linked/checkpoint-100/trainer_state.json", outside / "trainer_state.json")
    symlink_old(outside / "trainer_state.json", root / "linked/checkpoint-100/trainer_state.json", now)
    (root / "linked/shared").mkdir()
    shutil.move(root / "linked/checkpoint-200/trainer_state.json", root / "linked/shared/trainer_state.json")
    symlink_old("../shared/trainer_state.json", root / "linked/checkpoint-200/trainer_state.json", now)
    # loops
    symlink_old("..", root / CK2 / "peft_adapters" / "up", now)          # a directory link to its parent
    symlink_old("self", root / CK2 / "self", now)                         # a link to itself
    symlink_old("b", root / "run_trainer" / "a", now)                     # two links at each other
    symlink_old("a", root / "run_trainer" / "b", now)
    symlink_old("..", root / "run_trainer" / "root", now)                 # the root, from inside it
    # merged files pointing at a FIFO outside and at /dev/zero; a FIFO inside, linked to
    symlink_old(outside / "fifo", root / CK4 / "pytorch_model.bin", now)
    (root / V3 / "model.safetensors").unlink()
    symlink_old("/dev/zero", root / V3 / "model.safetensors", now)
    os.mkfifo(root / "run_trainer" / "fifo")
    set_old(root / "run_trainer" / "fifo", now)
    (root / CK2 / "scheduler.pt").unlink()
    symlink_old("../fifo", root / CK2 / "scheduler.pt", now)
    links = {"loops": [f"{CK2}/peft_adapters/up", f"{CK2}/self", "run_trainer/a", "run_trainer/b",
                       "run_trainer/root"],
             "out": [f"{CK4}/pytorch_model.bin", f"{V3}/model.safetensors",
                     "linked/checkpoint-100/trainer_state.json"],
             "in": ["linked/checkpoint-200/trainer_state.json", f"{CK2}/scheduler.pt"]}
    return root, outside, links


def _consistent_rc(cmd: str, doc: dict | None) -> int:
    """The exit status the documented rules give for this JSON."""
    if not doc:
        return -1
    if cmd == "audit":
        bad = any(c["status"] == "broken" for c in doc["checkpoints"]) or any(
            p["severity"] == "error" for p in doc.get("problems", []))
        return 1 if bad else 0
    if cmd == "validate":
        return 0 if doc.get("valid") else 1
    if cmd == "prune":
        return 1 if doc.get("failed") or any(s["reason"].startswith("changed") for s in doc["skipped"]) else 0
    return 1 if doc.get("failed") else 0


def _check_link_command(cmd: str, res: Result, base: Baseline, root: Path, outside: Path,
                        links: dict, before: tuple, dst: Path | None) -> list[str]:
    before_tree, before_out = before
    f = sane(res, {0, 1})
    if res.rc is None or res.doc is None:
        return f
    if res.rc != _consistent_rc(cmd, res.doc):
        f.append(f"{cmd}: exit {res.rc} does not match its own report ({_consistent_rc(cmd, res.doc)})")
    f += tree_diff(before_out, outside_state(outside), what=f"{cmd}: outside the root")
    after_tree = snapshot(root)
    for rel in links["loops"]:
        if after_tree.get(rel) != before_tree.get(rel):
            f.append(f"{cmd}: the loop {rel} changed: {before_tree.get(rel)} → {after_tree.get(rel)}")
    if cmd in ("audit", "validate"):
        got = by_checkpoint(res.doc)
        f += tree_diff(before_tree, after_tree, what=f"{cmd} changed the tree")
        for rel in (f"{CK4}/pytorch_model.bin", f"{V3}/model.safetensors",
                    "linked/checkpoint-100/trainer_state.json"):
            ck = rel.rsplit("/", 1)[0]
            if not problems_at(got.get(ck), "symlink-escape", rel):
                f.append(f"{cmd}: no symlink-escape for {rel}: {got.get(ck)}")
        if cmd == "validate" and not problems_at(got.get(CK2), "unreadable", f"{CK2}/scheduler.pt"):
            # the full validation reads every torch.save file: a link to a FIFO is refused, not opened
            f.append(f"validate: no 'unreadable' for {CK2}/scheduler.pt (a link to a FIFO): {got.get(CK2)}")
        want = by_checkpoint(getattr(base, cmd).doc) if cmd == "validate" else by_checkpoint(base.audit.doc)
        if got.get(V2) != want.get(V2):
            f.append(f"{cmd}: the untouched {V2} differs from the unrestricted run: {got.get(V2)}")
    elif cmd == "prune":
        items = prune_items(res.doc)
        deleted = {k for k, (kind, _) in items.items() if kind == "deleted"}
        for rel in (f"{CK4}/pytorch_model.bin", f"{V3}/model.safetensors"):
            if rel not in deleted:
                f.append(f"prune: the merged-file link {rel} was not deleted itself: {items.get(rel)}")
        before_nd = without_dir_mtimes(before_tree)
        f += tree_diff(before_nd, without_dir_mtimes(after_tree), removed_ok=deleted,
                       added_ok={LOCK_NAME}, what="prune")
        if items.get(V2) != prune_items(base.prune.doc).get(V2):
            f.append(f"prune: {V2}: {items.get(V2)} differs from the unrestricted run")
    else:
        items = migrate_items(res.doc)
        f += tree_diff(before_tree, after_tree, added_ok={LOCK_NAME}, what="migrate changed SRC")
        for ck in (CK4, V3, "linked/checkpoint-100"):
            kind, item = items.get(ck, (None, {}))
            if kind != "failed" or "outside" not in str(item.get("reason")):
                f.append(f"migrate: {ck}: expected a failure naming the link out of SRC: {kind} {item}")
        kind, item = items.get(CK2, (None, {}))
        if kind == "migrated" or (kind == "failed" and "regular file" not in str(item.get("reason"))):
            f.append(f"migrate: {CK2} (scheduler.pt links to a FIFO): {kind} {item}")
        kind, item = items.get("linked/checkpoint-200", (None, {}))
        copied = dst / "linked/checkpoint-200/trainer_state.json"
        if kind != "migrated":
            f.append(f"migrate: linked/checkpoint-200 (a link inside SRC): {kind} {item}")
        elif (copied.is_symlink() or copied.read_bytes()
              != (root / "linked/shared/trainer_state.json").read_bytes()):
            f.append("migrate: the link inside SRC was not carried as its target's bytes")
        if items.get(V2) != migrate_items(base.migrate.doc).get(V2):
            f.append(f"migrate: {V2}: {items.get(V2)} differs from the unrestricted run")
        view = dst_view(dst)
        f += same_elsewhere({k: x for k, x in view.items() if under(k, (V2,))},
                            {k: x for k, x in base.dst.items() if under(k, (V2,))}, (), "DST")
        f += [f"migrate: DST holds a symlink or special file: {k}" for k, x in view.items()
              if x[0] in ("link", "special")]
        f += [f"migrate: left {k}" for k in view if any(m in k for m in TMP_MARKS)]
        for ck in (CK4, V3, "linked/checkpoint-100"):
            if (dst / ck).exists():
                f.append(f"migrate: wrote a target for {ck}")
    return f


def _run_link_command(cmd: str, root: Path, outside: Path, links: dict, base: Baseline,
                      dst: Path) -> tuple[str, list[str], dict]:
    args = {"audit": ("audit", "--json", root), "validate": ("validate", "--json", root),
            "prune": ("prune", "--yes", "--json", root), "migrate": ("migrate", "--json", root, dst)}[cmd]
    before = (snapshot(root), outside_state(outside))
    res = cli(*args)
    failures = _check_link_command(cmd, res, base, root, outside, links, before, dst)
    return f"{cmd} on a tree of symlink loops, links out of the root and FIFOs", failures, res.facts()


def test_symlinks_never_lead_out_of_the_root_nor_hang(results_tree, baseline, tmp_path):
    src, _, now = results_tree
    runs = Runs("symlinks", scenario=6,
                title="Symlink attacks: a merged file or a directory swapped for a symlink out of the "
                      "root between plan and execute, symlink loops, links to /dev/zero and FIFOs → "
                      "nothing outside touched, no hang",
                checks=["every file outside the root unchanged (hashed) and still there; /dev/zero "
                        "and the FIFOs untouched",
                        "what changed since the plan is skipped, with the reason; the rest done as "
                        "planned, nothing else in the root changed",
                        f"every command finishes (a {HANG_GUARD_S} s guard) with its documented exit "
                        "status, no traceback",
                        "migrate never reads through a link out of SRC: that checkpoint fails with "
                        "the reason; a link inside SRC is carried as its target's bytes; the "
                        "others are migrated as on an unlinked copy"],
                test="test_symlinks_never_lead_out_of_the_root_nor_hang")
    prefix, _ = user_prefix()
    runs.note("the commands run as uid 1000 in a user namespace (unshare --user --map-user=1000)"
              if prefix else "the commands run as the current user")
    ro, outside_ro, links = make_link_tree(src, tmp_path / "links-ro", now)
    pr, outside_pr, links_pr = make_link_tree(src, tmp_path / "links-prune", now)
    with ThreadPoolExecutor(WORKERS) as pool:
        cli_jobs = [pool.submit(_run_link_command, "audit", ro, outside_ro, links, baseline, None),
                    pool.submit(_run_link_command, "prune", pr, outside_pr, links_pr, baseline, None),
                    pool.submit(_run_link_command, "validate", ro, outside_ro, links, baseline, None),
                    pool.submit(_run_link_command, "migrate", ro, outside_ro, links, baseline,
                                tmp_path / "links-dst")]
        # meanwhile, in this process: plan, swap, execute
        for i, (name, swap, reasons) in enumerate(PRUNE_SWAPS):
            failures, facts = _prune_swap_case(name, swap, reasons, src, tmp_path / f"swap{i}", now)
            runs.add(name, failures, **facts)
        for name, failures, facts in _migrate_swap_cases(src, tmp_path / "swap-migrate", now, baseline):
            runs.add(name, failures, **facts)
        for job in cli_jobs:
            name, failures, facts = job.result()
            runs.add(name, failures, **facts)
    runs.finish()
