"""What the reliability tests share: their seeds, the CLI child's environment and JSON document,
tree hashes, and the undisturbed migration that a disturbed one is compared with."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fault_entry
from fixtures.copying import copy_tree

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = ".ckpt-tools.lock"


def seed_from(variable: str) -> int:
    """The seed that ``variable`` fixes, or a fresh one (each test prints or records its seed)."""
    value = os.environ.get(variable)
    return int(value) if value else random.SystemRandom().randrange(2 ** 32)


def cli_env(**extra: str) -> dict:
    """The environment of a CLI child: this one, offline (nothing may touch the network)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def json_document(stdout: str) -> dict | None:
    """The JSON object that a ``--json`` command printed, or None when stdout is not one."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def file_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """rel path → (kind, size, mtime_ns, sha256 | link target) of every file and symlink."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if rel in skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                h = "unreadable"
                try:
                    with open(p, "rb") as fh:
                        h = hashlib.sha256(fh.read()).hexdigest()
                except PermissionError:
                    pass
                out[rel] = ("file", st.st_size, st.st_mtime_ns, h)
    return out


def target_files(target: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), target).replace(os.sep, "/")
                  for d, _, fs in os.walk(target) for f in fs)


# --- the undisturbed migration ------------------------------------------------------------------

def migrate_args(src: Path, dst: Path, jobs: int = 1, fault: str | None = None) -> list[str]:
    """The migrate command line; with ``fault``, run through the fault entry point with a
    ``tests/faulty_fs.py`` spec."""
    cmd = fault_entry.command(fault) if fault else [sys.executable, "-m", "ckpt_tools.cli"]
    return [*cmd, "migrate", str(src), str(dst),
            "--min-age", "0", "--json", "--no-progress", "--jobs", str(jobs)]


@dataclass(frozen=True)
class ReferenceMigration:
    """``migrate SRC DST`` run once through the CLI, undisturbed, on a copy of some runs."""
    src: Path
    before: dict[str, tuple]    # file_hashes(src) before the migration
    dst: Path
    targets: set[str]           # the checkpoints under DST, as the --json document lists them
    doc: dict                   # that document
    seconds: float              # the CLI's wall time, start-up included


def reference_migration(results: Path, base: Path, runs: tuple[str, ...]) -> ReferenceMigration:
    """Copy ``runs`` of the fixture tree to ``base/src`` and migrate them to ``base/ref``: every
    checkpoint migrated, none failed or skipped, DST holding exactly the targets reported."""
    from ckpt_tools import scan

    src = base / "src"
    for rel in runs:
        copy_tree(results / rel, src / rel)
    before = file_hashes(src)
    dst = base / "ref"
    t0 = time.monotonic()
    proc = subprocess.run(migrate_args(src, dst), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert not doc["failed"] and not doc["skipped"], doc
    targets = {c.path for c in scan(str(dst), min_age_s=0).checkpoints}
    assert targets == {m["target"] for m in doc["migrated"]}
    return ReferenceMigration(src, before, dst, targets, doc, seconds)
