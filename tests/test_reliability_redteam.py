"""Reliability, issue 13's red-team groups: many generated cases of each, the real CLI in a
child process under a hang guard, the outcome checked on disk and in what the user sees.

Scenario entries (``RELIABILITY.md`` rows 9-13):

9.  content proof: one checkpoint of a redundant run has its PEFT tree changed where only the
    bytes tell (flipped bytes in a LoRA tensor, a zeroed adapter, a router byte, files linked
    to a sibling's, a merged export with no LoRA key); ``prune --yes`` deletes nothing there
    and exactly the merged files of the others;
10. bounded inputs: each hostile case of ``tests/test_bounded_inputs.py`` (cases 3-6, stride-0
    views, a header of millions of keys, JSON nested 100k deep) in the middle checkpoint of a
    run; audit, validate and ``prune --dry-run`` finish, the problem names the file, the
    siblings are judged as without it;
11. names: runs named with control characters, escape sequences, newlines and bytes that are
    not UTF-8; ``--json`` strict and reversible, text inert, ``prune --log`` prunes;
12. operator inputs: bad durations, FIFOs, sockets and devices where a file is expected, empty
    paths;
13. Trainer rotation: random runs pruned with one process or two workers; transformers' own
    ``sort_checkpoints`` / ``rotate_checkpoints`` choose as on an untouched copy.

``CKPT_TOOLS_REDTEAM_RUNS`` (default 2) sets the runs of each entry; ``CKPT_TOOLS_REDTEAM_SEED``
replays a run set (each entry derives its own generator from it). Every failure is recorded per
run (``tests/scorecard.py``), never a timing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

from reliability import seed_from
from scorecard import Runs
from test_names import LOCALES, assert_inert, exact_bytes, strict_json
from test_names import cli as cli_in_locale
from test_operator_inputs import (BAD_DURATIONS, DURATION_OPTIONS, BlockedWriter, _command,
                                  set_old)
from test_prune import LOCK_NAME, listing
from test_prune_trace_lock_log import _special
from test_reliability_hostile import run_limited

from ckpt_tools.names import shown

REPO = Path(__file__).resolve().parents[1]
RUNS_ENV = "CKPT_TOOLS_REDTEAM_RUNS"
SEED_ENV = "CKPT_TOOLS_REDTEAM_SEED"
DEFAULT_RUNS = 2
GUARD_S = 120          # a hang guard per child, never a timing assertion
DAY_NS = 86_400 * 10**9
MERGED = "model.safetensors"
ADAPTER = "peft_adapters/expert_{}/adapter_model.safetensors"
ROUTER = "dylo_moe_state/router.pt"
TEMPLATES = ("run_trainer/checkpoint-2", "run_trainer/checkpoint-4")
TEST = "tests/test_reliability_redteam.py"


def runs_wanted() -> int:
    return max(1, int(os.environ.get(RUNS_ENV, DEFAULT_RUNS)))


def scenario_entry(scenario: int, key: str, **description) -> tuple[int, random.Random, Runs]:
    """An entry's seed, its own generator (one seed replays every entry) and its scorecard record."""
    seed = seed_from(SEED_ENV)
    return seed, random.Random(seed * 100 + scenario), Runs(key, scenario=scenario, **description)


def finish(runs: Runs, seed: int) -> None:
    runs.finish(seed=seed, reproduce=f"{SEED_ENV}={seed} {RUNS_ENV}={runs_wanted()} "
                                     f"pytest {TEST}::{runs.test}")


def checked(failures: list[str], what: str, check, *args):
    """Run one assertion helper; its AssertionError becomes a recorded failure."""
    try:
        return check(*args)
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:600]}")
        return None


def file_state(root: Path) -> dict[str, tuple]:
    """type, size, mtime and sha256 (or link target) of everything under root, by path."""
    return {k: (v[0], v[1], v[2], v[4] if len(v) > 4 else None)
            for k, v in listing(root, content=True).items()}


def diff_states(before: dict, after: dict, allowed_gone: set[str] = frozenset(), *,
                lock_ok: bool = False) -> list[str]:
    """What changed between two ``file_state``s, but the files expected gone (and, with
    ``lock_ok``, a lock file the command created at the root)."""
    out = []
    gone = set(before) - set(after)
    if gone != set(allowed_gone):
        out.append(f"gone: {sorted(gone)}, expected gone: {sorted(allowed_gone)}")
    new = set(after) - set(before) - ({LOCK_NAME} if lock_ok else set())
    if new:
        out.append(f"new: {sorted(new)}")
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    if changed:
        out.append(f"changed: {changed[:10]}")
    return out


def copy_checkpoint(results: Path, template: str, dest: Path) -> Path:
    shutil.copytree(results / template, dest, symlinks=True)
    return dest


def build_run(results: Path, run: Path, steps: list[int], rng: random.Random) -> list[str]:
    """A run of redundant checkpoints (copies of the Trainer run's two saves), one per step."""
    names = []
    for step in steps:
        copy_checkpoint(results, rng.choice(TEMPLATES), run / f"checkpoint-{step}")
        names.append(f"checkpoint-{step}")
    return names


@contextlib.contextmanager
def keep_mtime(path: Path):
    """Whatever is done to ``path`` inside it, its mtime (and atime) stay."""
    st = os.lstat(path)
    yield
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


# --- 9. content proof ----------------------------------------------------------------------------

def safetensors_tensors(path: Path) -> dict[str, tuple[int, int]]:
    """name → (absolute start, end) of each tensor's bytes in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def zip_records(path: Path) -> dict[str, tuple[int, int]]:
    """name → (absolute start, end) of each stored (uncompressed) record of a torch.save zip."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            out[info.filename] = (start, start + info.file_size)
    return out


def flip_bytes(path: Path, start: int, end: int, rng: random.Random, count: int) -> list[int]:
    """XOR ``count`` random bytes of [start, end) with a non-zero mask; size and mtime kept."""
    at = sorted(rng.sample(range(start, end), min(count, end - start)))
    with keep_mtime(path), open(path, "r+b") as fh:
        for offset in at:
            fh.seek(offset)
            old = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([old ^ rng.randrange(1, 256)]))
    return [a - start for a in at]


def mutate_flip(ck: Path, rng, results, siblings) -> str:
    expert = rng.randrange(3)
    path = ck / ADAPTER.format(expert)
    name, (start, end) = rng.choice(sorted(safetensors_tensors(path).items()))
    where = flip_bytes(path, start, end, rng, rng.randint(1, 8))
    tensor = f"expert_{expert} model.{name.split('.', 3)[-1]}"
    return f"{tensor}: bytes {where} of {end - start} flipped", tensor


def mutate_zero(ck: Path, rng, results, siblings) -> str:
    expert = rng.randrange(3)
    path = ck / ADAPTER.format(expert)
    spans = safetensors_tensors(path).values()
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    with keep_mtime(path), open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(bytes(end - start))
    return f"expert_{expert}: every tensor byte zeroed, header kept", f"expert_{expert} "


def mutate_router(ck: Path, rng, results, siblings) -> str:
    path = ck / ROUTER
    records = {k: v for k, v in zip_records(path).items() if "/data/" in k}
    name, (start, end) = rng.choice(sorted(records.items()))
    where = flip_bytes(path, start, end, rng, rng.randint(1, 4))
    return f"router record {name}: bytes {where} of {end - start} flipped", "router"


def mutate_symlinks(ck: Path, rng, results, siblings) -> str:
    sibling = rng.choice(siblings)
    files = [ADAPTER.format(e) for e in range(3)] + [ROUTER]
    chosen = sorted(rng.sample(files, rng.randint(1, len(files))))
    for rel in chosen:
        target = ck / rel
        st = os.lstat(target)
        target.unlink()
        os.symlink(os.path.relpath(sibling / rel, target.parent), target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return f"{', '.join(chosen)} symlinked to {sibling.name}'s", "symlink"


def mutate_export(ck: Path, rng, results, siblings) -> str:
    target = ck / MERGED
    with keep_mtime(target):
        target.write_bytes((results / "merged_hf/merged_model/model.safetensors").read_bytes())
    return "model.safetensors replaced by a merged export (no LoRA key)", "merged export"


def mutate_dtype(ck: Path, rng, results, siblings) -> str:
    """One LoRA tensor's dtype relabelled in the adapter's header (same bytes, same size)."""
    expert = rng.randrange(3)
    path = ck / ADAPTER.format(expert)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    header[name]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    with keep_mtime(path), open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))
    tensor = f"expert_{expert} model.{name.split('.', 3)[-1]}"
    return f"{tensor}: dtype F32 relabelled I32", tensor


MUTATIONS = {"flip": mutate_flip, "zero": mutate_zero, "router": mutate_router,
             "symlink": mutate_symlinks, "export": mutate_export, "dtype": mutate_dtype}


def cycled(rng: random.Random, kinds, n: int) -> list:
    """``n`` picks that go through every kind (shuffled) before repeating one."""
    out: list = []
    while len(out) < n:
        batch = list(kinds)
        rng.shuffle(batch)
        out += batch
    return out[:n]


def test_prune_deletes_nothing_from_a_checkpoint_whose_peft_tree_differs_by_content(
        results_tree, tmp_path):
    results, _, _ = results_tree
    seed, rng, runs = scenario_entry(
        9, "redteam_content_proof",
        title="Content proof: a checkpoint whose PEFT tree differs from its merged "
              "weights only in bytes, links or dtype, or whose merged file holds no LoRA "
              "key → `prune --yes` keeps its merged weights",
        checks=[
            "a run of 3-6 redundant checkpoints (copies of the fixture's Trainer saves); one, "
            "chosen at random, changed by one mutation (kinds cycled, parameters random: "
            "expert, tensor, byte positions and masks, the files linked and the sibling); "
            "sizes, headers and mtimes kept where the mutation allows",
            "prune --yes --json --min-age 0 under a 120 s guard: exit 0, no traceback",
            "the mutated checkpoint: nothing deleted, every file byte-identical (sha256, "
            "size, mtime) to before the prune, its merged file included; reported as "
            "skipped, the reason naming what differs (the expert and tensor, the router, "
            "the symlink, the merged export)",
            "every untouched checkpoint: exactly its merged model.safetensors deleted, "
            "everything else unchanged",
        ], test="test_prune_deletes_nothing_from_a_checkpoint_whose_peft_tree_differs_by_content")
    kinds = cycled(rng, MUTATIONS, runs_wanted())
    for i, kind in enumerate(kinds):
        root = tmp_path / f"r{i}"
        run = root / "run"
        steps = sorted(rng.sample(range(2, 400, 2), rng.randint(3, 6)))
        names = build_run(results, run, steps, rng)
        victim = rng.choice(names)
        siblings = [run / n for n in names if n != victim]
        what, named = MUTATIONS[kind](run / victim, rng, results, siblings)
        before = file_state(root)
        child = run_limited("prune", "--yes", "--json", "--no-progress", "--min-age", "0", root,
                            timeout=GUARD_S)
        after = file_state(root)
        failures = child.guard_failures("prune")
        doc = child.json()
        if child.rc != 0 or doc is None:
            failures.append(f"prune exited {child.rc}: {child.stderr[-400:]}")
        expected = {f"run/{n}/{MERGED}" for n in names if n != victim}
        failures += diff_states(before, after, expected, lock_ok=True)
        deleted = {d["path"] for d in (doc or {}).get("deleted", [])}
        if doc is not None and deleted != expected:
            failures.append(f"deleted {sorted(deleted)}, expected {sorted(expected)}")
        mine = {k: v for k, v in after.items() if k.startswith(f"run/{victim}/")}
        if mine != {k: v for k, v in before.items() if k.startswith(f"run/{victim}/")}:
            failures.append(f"the mutated {victim} changed")
        reasons = [s.get("reason", "") for s in (doc or {}).get("skipped", [])
                   if s.get("path", "").startswith(f"run/{victim}")]
        if doc is not None and not reasons:
            failures.append(f"the mutated {victim} is not reported as skipped")
        elif doc is not None and named not in reasons[0]:
            failures.append(f"the reason does not name {named!r}: {reasons[0][:300]}")
        runs.add(f"{kind}: {victim} of {len(names)}", failures, mutation=kind, detail=what,
                 checkpoints=len(names), deleted=len(deleted), reason=(reasons or [""])[0][:300],
                 seconds=child.seconds)
    runs.note(f"seed {seed}; mutations: " + ", ".join(
        f"{k} {kinds.count(k)}" for k in MUTATIONS))
    finish(runs, seed)


# --- 10. bounded inputs --------------------------------------------------------------------------

def _record(doc: dict | None) -> dict[str, tuple]:
    """checkpoint path → (status, problems) of a JSON report."""
    return {c["path"]: (c["status"], sorted((p["code"], p["path"], p["severity"], p["message"])
                                             for p in c["problems"]))
            for c in (doc or {}).get("checkpoints", [])}


def _bounded_children(run: Path) -> dict:
    return {"audit": run_limited("audit", "--json", "--min-age", "0", "--no-progress", run,
                                 timeout=GUARD_S),
            "validate": run_limited("validate", "--json", "--min-age", "0", run, timeout=GUARD_S),
            "prune --dry-run": run_limited("prune", "--dry-run", "--json", "--min-age", "0", run,
                                           timeout=GUARD_S)}


def _bounded_variants(tb) -> dict:
    """case name → spoil(ckpt, rng) → what it wrote (and the hostile file's path, where it is
    not the case's): the case with its size drawn at random, always past the bound it tests
    (docs/bounds.md)."""
    import torch

    def experts(ck, rng):
        n = 10 ** rng.randint(5, 40) + rng.randrange(1000)
        tb._edit_json(ck / "dylo_moe_state/config.json", num_experts=n)
        return f"num_experts of {len(str(n))} digits"

    def stride0_router(ck, rng):
        rows = 10 ** rng.randint(8, 12)
        tb._undeclared_count(ck)
        torch.save({"gate.weight": torch.zeros(1).expand(rows, 32),
                    "gate.bias": torch.zeros(1).expand(rows)}, ck / "dylo_moe_state/router.pt")
        return f"router of {rows:.0e} stride-0 rows"

    def flood(ck, rng):
        n = rng.randint(20_000, 150_000)
        (ck / "dylo_moe_state/skill_library.pt").write_bytes(tb.hash_flooding_archive(n))
        return f"{n} colliding keys"

    def long_index(ck, rng):
        digits = str(rng.randint(1, 9)) + "".join(rng.choice("0123456789")
                                                  for _ in range(rng.randint(4300, 20_000)))
        tb._rename_expert_key(ck / "pytorch_model.bin", digits)
        return f"expert index of {len(digits)} digits"

    def long_dir(ck, rng):
        digits = "7" * rng.randint(20, 240)
        (ck / "peft_adapters/expert_2").rename(ck / f"peft_adapters/expert_{digits}")
        return f"expert directory index of {len(digits)} digits", f"peft_adapters/expert_{digits}"

    def many_keys(ck, rng):
        n = rng.randint(300_000, 4_000_000)
        (ck / "peft_adapters/expert_1/adapter_model.safetensors").write_bytes(tb.tiny_keys_header(n))
        return f"header of {n} keys"

    def nested(rel):
        def spoil(ck, rng):
            depth = rng.randint(2_000, 300_000)
            (ck / rel).write_bytes(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
            return f"nested {depth} deep"
        return spoil

    return {"num_experts 10**12": experts,
            "router of 10**10 stride-0 rows, no count declared": stride0_router,
            "skill_library.pt dict of 150,000 colliding int keys": flood,
            "expert index of 5000 digits in a legacy file": long_index,
            "expert directory index of 200 digits": long_dir,
            "safetensors header of 4M keys": many_keys,
            "config.json nested 100k deep": nested("config.json"),
            "a legacy sibling's config.json nested 100k deep": nested("config.json")}


def _bounded_case_list():
    """[(name, template, spoil(ckpt, rng) → detail, file, code)]: the cases of
    tests/test_bounded_inputs.py, sized at random where ``_bounded_variants`` says how."""
    import test_bounded_inputs as tb

    variants = _bounded_variants(tb)
    fixed = lambda f: (lambda ck, rng: (f(ck), "as in tests/test_bounded_inputs.py")[1])  # noqa: E731
    return [(name, template, variants.get(name) or fixed(spoil), rel, code)
            for name, (template, spoil, rel, code, _) in tb.CASES.items()]


def test_every_bounded_input_is_one_problem_on_its_file_and_the_rest_judged_as_without_it(
        results_tree, tmp_path):
    results, _, _ = results_tree
    seed, rng, runs = scenario_entry(
        10, "redteam_bounds",
        title="Bounded inputs: huge counts, backtracking patterns, colliding pickle keys, "
              "integers of thousands of digits, stride-0 views, headers of millions of keys, "
              "deep JSON → one problem on that file, the rest judged as without it",
        checks=[
            "the hostile file of each case of tests/test_bounded_inputs.py (cases cycled, "
            "the run's length 3-5 random) in the middle checkpoint; the others sound copies",
            "audit, validate and prune --dry-run (--json --min-age 0) each in a child held "
            "to 1.5 GB of address space and 120 s: none killed, no undocumented exit, no "
            "traceback, no MemoryError or RecursionError",
            "audit and validate: exit 1, the middle checkpoint broken with the case's code "
            "on the hostile file; every problem message one line",
            "every other checkpoint: status and problems as in the same run without the "
            "hostile file (audit and validate)",
            "prune --dry-run: exit 0; plans what it plans without the hostile file, less "
            "anything in the hostile checkpoint",
        ], test="test_every_bounded_input_is_one_problem_on_its_file_and_the_rest_judged_as_without_it")
    cases = _bounded_case_list()
    picks = cycled(rng, range(len(cases)), runs_wanted())
    baselines: dict[tuple[str, int], tuple[dict, dict, set]] = {}
    for i, k in enumerate(picks):
        name, template, spoil, rel, code = cases[k]
        length = rng.randint(3, 5)
        middle = length // 2
        key = (template, length)
        if key not in baselines:
            clean = tmp_path / f"clean-{len(baselines)}" / "run"
            for j in range(length):
                copy_checkpoint(results, template, clean / f"checkpoint-{j + 1}")
            got = _bounded_children(clean)
            baselines[key] = (_record(got["audit"].json()), _record(got["validate"].json()),
                              {d["path"] for d in (got["prune --dry-run"].json() or {})
                               .get("deleted", [])})
        base_audit, base_validate, base_plan = baselines[key]
        run = tmp_path / f"b{i}" / "run"
        for j in range(length):
            copy_checkpoint(results, template, run / f"checkpoint-{j + 1}")
        hostile = f"checkpoint-{middle + 1}"
        detail = spoil(run / hostile, rng)
        if isinstance(detail, tuple):
            detail, rel = detail
        got = _bounded_children(run)
        failures = [f for what, child in got.items() for f in child.guard_failures(what)]
        for what in ("audit", "validate"):
            child = got[what]
            found = _record(child.json())
            base = base_audit if what == "audit" else base_validate
            if child.rc != 1 or not found:
                failures.append(f"{what} exited {child.rc}, expected 1: {child.stderr[-300:]}")
                continue
            status, problems = found.get(hostile, ("absent", []))
            path = f"{hostile}/{rel}"
            if status != "broken" or not any(c == code and p == path and s == "error"
                                             for c, p, s, _ in problems):
                failures.append(f"{what}: {hostile} {status} {problems[:4]}; expected {code} on {path}")
            if any("\n" in m for *_, m in problems):
                failures.append(f"{what}: a problem message of more than one line")
            others = {p: r for p, r in found.items() if p != hostile}
            if others != {p: r for p, r in base.items() if p != hostile}:
                failures.append(f"{what}: the sound checkpoints are judged otherwise than without "
                                f"the hostile file: {others} vs {base}")
        plan = got["prune --dry-run"]
        planned = {d["path"] for d in (plan.json() or {}).get("deleted", [])}
        if plan.rc != 0 or plan.json() is None:
            failures.append(f"prune --dry-run exited {plan.rc}: {plan.stderr[-300:]}")
        elif planned != {p for p in base_plan if not p.startswith(f"{hostile}/")}:
            failures.append(f"prune --dry-run plans {sorted(planned)}; without the hostile file "
                            f"{sorted(base_plan)}")
        runs.add(f"{name} ({detail})", failures, file=rel, expected_code=code, checkpoints=length,
                 seconds={w: c.seconds for w, c in got.items()},
                 peak_rss_mb={w: c.peak_rss_mb for w, c in got.items()})
    worst = max((r for r in runs.records), key=lambda r: max(r["seconds"].values()))
    runs.note(f"seed {seed}; {len(set(picks))} of {len(cases)} cases run. Slowest child: "
              f"{max(worst['seconds'].values()):.1f} s ({worst['name']}); largest peak RSS: "
              f"{max(max(r['peak_rss_mb'].values()) for r in runs.records):.0f} MB.")
    finish(runs, seed)


# --- 11. names -----------------------------------------------------------------------------------

NAME_PIECES = ["\x1b[2J", "\x1b[31m", "\x1b]0;pwned\x07", "\x1b]8;;x\x1b\\", "\x9b31m",
               "\nerror: forged", "\nckpt-tools: error: forged", "\r", "\t", "\x07", "\x7f",
               "\x01", "\x08", "\u2028", "\u2029", "ï", "日本", " ", "-", "_", "."]


def random_name(rng: random.Random) -> str:
    """A directory name of control characters, escapes, newlines, undecodable bytes and text."""
    parts = ["r"]
    for _ in range(rng.randint(2, 7)):
        roll = rng.random()
        if roll < 0.25:
            parts.append(os.fsdecode(bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 3)))))
        elif roll < 0.35:
            parts.append(chr(rng.choice([*range(1, 32), 127])))
        elif roll < 0.8:
            parts.append(rng.choice(NAME_PIECES))
        else:
            parts.append("".join(rng.choice("abcxyz019") for _ in range(rng.randint(1, 4))))
    # as a listing gives it back: undecodable bytes drawn apart may join into a UTF-8 sequence
    return os.fsdecode(os.fsencode("".join(parts)))


def _names_json(doc, root: Path, expected: set[bytes]):
    found = set()
    for c in doc["checkpoints"]:
        path = exact_bytes(c, "path")
        assert os.path.isdir(os.path.join(os.fsencode(str(root)), path)), c
        found.add(path)
    assert found == expected, (sorted(found), sorted(expected))


def test_odd_names_never_break_json_text_or_the_log(results_tree, tmp_path):
    results, _, _ = results_tree
    seed, rng, runs = scenario_entry(
        11, "redteam_names",
        title="Names with control characters, escape sequences, newlines and bytes that "
              "are not UTF-8 → strict, reversible JSON, inert text, `prune --log` prunes",
        checks=[
            "a root of 2-3 runs (copies of the fixture's Trainer run) named at random from "
            "those pieces, under a locale chosen at random (UTF-8 strict, C, POSIX)",
            "audit --json: exit 0, strict UTF-8 with no lone surrogate and no raw control "
            "character; every checkpoint's path (its _bytes_b64 field where it has one) "
            "leads back to its directory; exactly the checkpoints on disk",
            "text output (audit -v, prune --dry-run -v, or validate -v): no control "
            "character but the newline, no forged line, each name shown with visible escapes",
            "prune --yes --json --log: exit 0, strict JSON; deleted exactly every merged "
            "file (each path leads back to it); every --log line strict JSON, its "
            "deletions the same files",
        ], test="test_odd_names_never_break_json_text_or_the_log")
    for i in range(runs_wanted()):
        env = rng.choice(list(LOCALES))
        root = tmp_path / f"n{i}" / "results"
        names: list[str] = []
        count = rng.randint(2, 3)
        while len(names) < count:
            name = random_name(rng)
            if name not in names:
                names.append(name)
        for name in names:
            shutil.copytree(results / "run_trainer", root / name, symlinks=True)
        expected = {os.fsencode(n) + b"/checkpoint-" + s for n in names for s in (b"2", b"4")}
        failures: list[str] = []
        proc = cli_in_locale("audit", "--json", "--min-age", "0", root, env=env, timeout=GUARD_S)
        if proc.returncode != 0:
            failures.append(f"audit --json exited {proc.returncode}: {proc.stderr[-300:]!r}")
        doc = checked(failures, "audit --json", strict_json, proc.stdout, "audit --json")
        if doc is not None:
            checked(failures, "audit --json paths", _names_json, doc, root, expected)
        text_cmd = rng.choice([("audit", "-v"), ("prune", "--dry-run", "-v")]
                              + ([("validate", "-v")] if env == "utf-8" else []))
        proc = cli_in_locale(*text_cmd, "--min-age", "0", root, env=env, timeout=GUARD_S)
        if proc.returncode != 0:
            failures.append(f"{' '.join(text_cmd)} exited {proc.returncode}")
        out = checked(failures, f"{text_cmd[0]} stdout", assert_inert, proc.stdout, text_cmd[0])
        checked(failures, f"{text_cmd[0]} stderr", assert_inert, proc.stderr, text_cmd[0])
        for name in names:
            if out is not None and shown(name) not in out:
                failures.append(f"{' '.join(text_cmd)}: {shown(name)!r} not in its output")
        log = tmp_path / f"n{i}" / "prune.jsonl"
        proc = cli_in_locale("prune", "--yes", "--json", "--min-age", "0", "--log", log, root,
                             env=env, timeout=GUARD_S)
        if proc.returncode != 0:
            failures.append(f"prune --yes exited {proc.returncode}: {proc.stderr[-300:]!r}")
        merged = {p + b"/" + MERGED.encode() for p in expected}
        doc = checked(failures, "prune --json", strict_json, proc.stdout, "prune --json")
        if doc is not None:
            deleted = {exact_bytes(d, "path") for d in doc.get("deleted", [])}
            if deleted != merged:
                failures.append(f"prune deleted {sorted(deleted)}, expected {sorted(merged)}")
        left = [m for m in merged if os.path.lexists(os.path.join(os.fsencode(str(root)), m))]
        if left:
            failures.append(f"merged files still there: {left}")
        if not log.exists():
            failures.append("no --log written")
        else:
            logged = [checked(failures, "--log line", strict_json, line, "--log line")
                      for line in log.read_bytes().splitlines()]
            deleted_logged = {exact_bytes(e, "path") for e in logged
                              if e is not None and e.get("action") == "delete"}
            if deleted_logged != {os.path.join(os.fsencode(str(root)), m) for m in merged}:
                failures.append(f"--log deletions {sorted(deleted_logged)}")
        runs.add(" | ".join(shown(n) for n in names), failures, locale=env,
                 names_b64=[base64.b64encode(os.fsencode(n)).decode() for n in names],
                 text_command=" ".join(text_cmd))
    runs.note(f"seed {seed}; locales: " + ", ".join(
        f"{env} {sum(r['locale'] == env for r in runs.records)}" for env in LOCALES))
    finish(runs, seed)


# --- 12. operator inputs -------------------------------------------------------------------------

def bad_duration(rng: random.Random) -> str:
    """A value no duration option may take: NaN, an infinity, a negative, an overflow."""
    unit = rng.choice(["", "s", "m", "h", "d", "w"])
    kind = rng.choice(["nan", "inf", "negative", "overflow", "listed"])
    if kind == "nan":
        return rng.choice(["nan", "NaN", "-nan", "+nan", " nan "]) + unit
    if kind == "inf":
        return rng.choice(["inf", "+inf", "-inf", "Infinity", "-Infinity", "INF"]) + unit
    if kind == "negative":
        return f"-{rng.choice([1, 0.5, 1e-9, 3600, 10**rng.randint(1, 300)])}{unit}"
    if kind == "overflow":   # past the largest float, or past it once the unit multiplies
        return f"1e{rng.randint(309, 4000)}{unit}" if unit in ("", "s") else f"1.7e308{unit}"
    return rng.choice(BAD_DURATIONS)


@contextlib.contextmanager
def released(writer: BlockedWriter | None, sock: socket.socket | None):
    """Whatever the command inside does, the FIFO's blocked writer is let go and the socket
    closed at the end."""
    try:
        yield
    finally:
        if writer:
            writer.release()
        if sock:
            sock.close()


def _op_duration(results, case_dir: Path, rng) -> tuple[str, list[str]]:
    """Every duration option of every command, each given a bad value of its own."""
    tree = case_dir / "tree"
    shutil.copytree(results / "run_trainer", tree / "run_trainer", symlinks=True)
    before = file_state(case_dir)
    failures, tried = [], []
    for cmd, option in DURATION_OPTIONS:
        value = bad_duration(rng)
        tried.append(f"{cmd} {option}={value!r}")
        child = run_limited(*_command(cmd, option, value, tree, case_dir), timeout=GUARD_S)
        failures += child.guard_failures(tried[-1])
        if child.rc != 2 or option not in child.stderr or child.stdout:
            failures.append(f"{tried[-1]}: exit {child.rc}, stdout {child.stdout[:200]!r}, "
                            f"stderr {child.stderr[-300:]!r}")
    failures += diff_states(before, file_state(case_dir))
    if (case_dir / "dst").exists():
        failures.append("migrate made DST")
    return "; ".join(tried), failures


def _op_log_or_lock(results, case_dir: Path, rng) -> tuple[str, list[str]]:
    kind = rng.choice(["fifo", "socket", "device"])
    option = rng.choice(["--log", "--lock"])
    mode = rng.choice(["--yes", "--dry-run"])
    root = case_dir / "results"
    shutil.copytree(results / "run_trainer", root / "run_trainer", symlinks=True)
    before = file_state(root)
    writer = None
    with _special(kind, case_dir / f"special-{kind}") as path:
        if kind == "fifo":
            writer = BlockedWriter(Path(path))
        with released(writer, None):
            child = run_limited("prune", mode, "--no-progress", option, path, root, timeout=GUARD_S)
            opened = writer.was_opened_by_someone() if writer else False
    failures = child.guard_failures("prune")
    lines = child.stderr.strip().splitlines()
    if child.rc != 2 or len(lines) != 1 or path not in lines[0] or "not a regular file" not in lines[0]:
        failures.append(f"exit {child.rc}, stderr {child.stderr[-300:]!r}")
    if opened:
        failures.append("the FIFO was opened")
    failures += diff_states(before, file_state(root), lock_ok=True)
    return f"prune {mode} {option} <{kind}>", failures


def _op_migrate_config(results, case_dir: Path, rng) -> tuple[str, list[str]]:
    kind = rng.choice(["fifo", "socket"])
    step = rng.choice([100, 200, 300, 400])
    src = case_dir / "src"
    run = src / "legacy_v1"
    shutil.copytree(results / "legacy_v1", run, symlinks=True)
    config = run / f"checkpoint-{step}" / "config.json"
    config.unlink(missing_ok=True)
    writer, sock = None, None
    if kind == "fifo":
        os.mkfifo(config)
        writer = BlockedWriter(config)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(config))
    set_old(config, run / f"checkpoint-{step}" / "trainer_state.json")
    with released(writer, sock):
        child = run_limited("migrate", "--json", "--min-age", "0", "--no-progress", src,
                            case_dir / "dst", timeout=GUARD_S)
        opened = writer.was_opened_by_someone() if writer else False
    failures = child.guard_failures("migrate")
    doc = child.json()
    if child.rc != 0 or doc is None:
        return f"migrate, checkpoint-{step}/config.json a {kind}", failures + [
            f"migrate exited {child.rc}: {child.stderr[-300:]}"]
    want = sorted(f"legacy_v1/checkpoint-{s}" for s in (100, 200, 300, 400) if s != step)
    if sorted(m["source"] for m in doc["migrated"]) != want or doc["failed"]:
        failures.append(f"migrated {[m['source'] for m in doc['migrated']]}, failed {doc['failed']}")
    skipped = [(s["source"], s["reason"]) for s in doc["skipped"]]
    name = "a FIFO" if kind == "fifo" else "a socket"
    if len(skipped) != 1 or skipped[0][0] != f"legacy_v1/checkpoint-{step}" \
            or f"not a regular file ({name})" not in skipped[0][1] or "config.json" not in skipped[0][1]:
        failures.append(f"skipped {skipped}")
    if (case_dir / "dst" / "legacy_v1" / f"checkpoint-{step}").exists():
        failures.append("a target was written for the skipped checkpoint")
    if opened:
        failures.append("the FIFO was opened")
    return f"migrate, checkpoint-{step}/config.json a {kind}", failures


def _op_deep(results, case_dir: Path, rng) -> tuple[str, list[str]]:
    run = case_dir / "run"
    shutil.copytree(results / "run canonical", run, symlinks=True)
    ckpt = run / "checkpoint-100"
    where = rng.choice(["", "peft_adapters/", "dylo_moe_state/", "peft_adapters/expert_1/"])
    name = where + rng.choice(["notes", "adapter_model.bin.tmp", "events.out", "x" * rng.randint(1, 40)])
    kind = rng.choice(["fifo", "socket", "device"])
    path = ckpt / name
    writer, sock = None, None
    if kind == "device" and os.geteuid() != 0:
        kind = "fifo"        # only root may make a device node
    if kind == "fifo":
        os.mkfifo(path)
        writer = BlockedWriter(path)
    elif kind == "socket":   # bound where its path fits in sun_path, then moved into place
        sock = socket.socket(socket.AF_UNIX)
        short = tempfile.mkdtemp(prefix="s", dir="/tmp")
        sock.bind(os.path.join(short, "s"))
        os.rename(os.path.join(short, "s"), path)
        os.rmdir(short)
    else:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))   # /dev/zero's numbers
    set_old(path, ckpt / "config.json")
    with released(writer, sock):
        child = run_limited("validate", "--deep", "--json", "--min-age", "0", run, timeout=GUARD_S)
        opened = writer.was_opened_by_someone() if writer else False
    failures = child.guard_failures("validate --deep")
    doc = child.json()
    described = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}[kind]
    if child.rc != 1 or doc is None:
        return f"validate --deep, {name} a {kind}", failures + [
            f"validate --deep exited {child.rc}: {child.stderr[-300:]}"]
    found = {c["path"]: c for c in doc["checkpoints"]}
    problems = [(p["code"], p["path"], p["message"]) for p in found["checkpoint-100"]["problems"]]
    if problems != [("unreadable", f"checkpoint-100/{name}", f"not a regular file ({described})")]:
        failures.append(f"problems {problems}")
    if found["checkpoint-200"]["problems"]:
        failures.append(f"the sound checkpoint-200: {found['checkpoint-200']['problems']}")
    if opened:
        failures.append("the FIFO was opened")
    return f"validate --deep, {name} a {kind}", failures


EMPTY_PATH_ARGS = [("audit", ""), ("validate", ""), ("prune", "--dry-run", ""), ("prune", "--yes", ""),
                   ("migrate", "", "dst"), ("migrate", "run_trainer", ""), ("audit", "run_trainer", ""),
                   ("prune", "--yes", "run_trainer", ""), ("validate", "--deep", "")]


def _op_empty_path(results, case_dir: Path, rng) -> tuple[str, list[str]]:
    args = rng.choice(EMPTY_PATH_ARGS)
    cwd = case_dir / "cwd"
    shutil.copytree(results / "run_trainer", cwd / "run_trainer", symlinks=True)
    before = file_state(cwd)
    proc = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *args], capture_output=True,
                          text=True, timeout=GUARD_S, cwd=cwd, stdin=subprocess.DEVNULL)
    failures = []
    if proc.returncode != 2 or proc.stdout or "empty path" not in proc.stderr \
            or "Traceback" in proc.stderr:
        failures.append(f"exit {proc.returncode}, stderr {proc.stderr[-300:]!r}")
    failures += diff_states(before, file_state(cwd))
    return " ".join(repr(a) if a == "" else a for a in args), failures


OPERATOR_CASES = {"duration": _op_duration, "--log/--lock not a file": _op_log_or_lock,
                  "migrate: a sibling's config.json not a file": _op_migrate_config,
                  "validate --deep: a special file": _op_deep, "empty path": _op_empty_path}


def test_operator_inputs_are_refused_without_a_hang_or_a_change(results_tree, tmp_path):
    results, _, _ = results_tree
    seed, rng, runs = scenario_entry(
        12, "redteam_operator_inputs",
        title="Operator inputs: NaN, infinite, negative or overflowing durations; FIFOs, "
              "sockets and devices where a file is read; empty paths → refused, no hang, "
              "nothing changed",
        checks=[
            "every child under a 120 s guard (a FIFO is held open for writing by the test: "
            "a reader's open would release it, and is reported), no traceback",
            "a bad duration (generated: NaN, an infinity, a negative or an overflow, with "
            "or without a unit) for each duration option of each command in turn: exit 2 "
            "naming the option, nothing on stdout, no file changed or created (no lock "
            "file, no DST)",
            "a FIFO, socket or device as prune's --log or --lock (--yes or --dry-run): exit "
            "2, one line naming it and 'not a regular file', nothing changed",
            "a FIFO or socket as a legacy sibling's config.json: migrate exits 0, skips that "
            "checkpoint naming the file and its kind, migrates the other three",
            "a FIFO, socket or device node under a random name in a checkpoint: validate "
            "--deep exits 1 with one unreadable problem on it ('not a regular file'); the "
            "sibling has no problem",
            "an empty path argument: exit 2 ('empty path'), nothing changed in the working "
            "directory",
        ], test="test_operator_inputs_are_refused_without_a_hang_or_a_change")
    kinds = cycled(rng, OPERATOR_CASES, runs_wanted())
    for i, kind in enumerate(kinds):
        case_dir = tmp_path / f"o{i}"
        case_dir.mkdir()
        name, failures = OPERATOR_CASES[kind](results, case_dir, rng)
        runs.add(name, failures, kind=kind)
    runs.note(f"seed {seed}; cases: " + ", ".join(f"{k} {kinds.count(k)}" for k in OPERATOR_CASES))
    finish(runs, seed)


# --- 13. the Trainer's rotation ------------------------------------------------------------------

# The real CLI, with os.unlink wrapped to note which process unlinks each merged file (the
# forked workers inherit the wrapper): so that a --jobs 2 run is known to have used workers.
UNLINKS_BY_PID = textwrap.dedent("""
    import os, sys
    report, real = sys.argv[1], os.unlink
    def unlink(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if os.fsdecode(path).endswith("model.safetensors"):
            with open(report, "a") as fh:
                fh.write(f"{os.getpid()}\\n")
    os.unlink = unlink
    with open(report, "a") as fh:
        fh.write(f"main {os.getpid()}\\n")
    from ckpt_tools.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def build_trainer_run(results: Path, run: Path, rng: random.Random, many: bool) -> dict:
    """A Trainer run: random steps; a random subset redundant, the others healthy (merged file
    gone) or broken (an adapter cut short); directory mtimes of successive saves two days ago
    (in step order, or shuffled as a resumed run leaves them), and perhaps a last save a
    minute ago (in progress for prune's 1 h --min-age)."""
    count = rng.randint(105, 130) if many else rng.randint(3, 9)
    steps = sorted(rng.sample(range(1, 50 * count), count))
    names = build_run(results, run, steps, rng)
    kinds = {}
    redundant_at_least = 100 if many else 0
    for k, name in enumerate(names):
        ck = run / name
        roll = rng.random()
        if k < redundant_at_least or roll < 0.55:
            kinds[name] = "redundant"
        elif roll < 0.8:
            (ck / MERGED).unlink()
            kinds[name] = "healthy"
        else:
            adapter = ck / ADAPTER.format(rng.randrange(3))
            with keep_mtime(adapter), open(adapter, "r+b") as fh:
                fh.truncate(adapter.stat().st_size - 64)
            kinds[name] = "broken"
    young = rng.random() < 0.5
    now_ns = time.time_ns()
    order = list(names)
    if rng.random() < 0.3:
        rng.shuffle(order)
    saved = now_ns - 2 * DAY_NS
    for k, name in enumerate(order):
        saved += rng.randint(30, 3600) * 10**9 + rng.randrange(10**9)
        os.utime(run / name, ns=(saved, saved))
    if young:
        name = f"checkpoint-{steps[-1] + 1}"
        copy_checkpoint(results, rng.choice(TEMPLATES), run / name)
        fresh = now_ns - 60 * 10**9
        for dirpath, dirs, files in os.walk(run / name):
            for entry in files + dirs:
                os.utime(os.path.join(dirpath, entry), ns=(fresh, fresh), follow_symlinks=False)
        os.utime(run / name, ns=(fresh, fresh))
        kinds[name] = "in-progress"
    return kinds


def trainer_choice(run: Path, limit: int, best: str | None) -> tuple[list[str], list[str]]:
    """transformers' own mtime order of ``run`` and what its rotation keeps (on a copy)."""
    from transformers.trainer_utils import rotate_checkpoints, sort_checkpoints

    order = [os.path.basename(p) for p in sort_checkpoints(
        str(run), use_mtime=True, best_model_checkpoint=str(run / best) if best else None)]
    scratch = Path(tempfile.mkdtemp(dir=run.parent.parent))
    try:
        copy = scratch / run.name
        shutil.copytree(run, copy, symlinks=True)   # copystat keeps every directory's mtime
        rotate_checkpoints(str(copy), save_total_limit=limit, use_mtime=True,
                           best_model_checkpoint=str(copy / best) if best else None)
        kept = sorted(os.listdir(copy))
    finally:
        shutil.rmtree(scratch)
    return order, kept


def dir_mtimes(run: Path) -> dict[str, int]:
    return {p.name: os.lstat(p).st_mtime_ns for p in run.iterdir()}


def test_the_trainers_rotation_chooses_as_on_an_untouched_copy(results_tree, tmp_path):
    results, _, _ = results_tree
    seed, rng, runs = scenario_entry(
        13, "redteam_rotation",
        title="Trainer rotation after `prune --yes` (one process or two workers): "
              "transformers' `rotate_checkpoints(use_mtime=True)` chooses as on an "
              "untouched copy",
        checks=[
            "a run of 3-9 checkpoints at random steps (105-130 for --jobs 2: prune forks "
            "workers only for 50 checkpoints each), each redundant, healthy or broken at "
            "random; directory mtimes of saves two days ago, in step order or shuffled (a "
            "resumed run); in half the runs a save of a minute ago (in progress)",
            "prune --yes --json (default --min-age 1h) under a 120 s guard: exit 0, deleted "
            "exactly the redundant checkpoints' merged files; with --jobs 2 (105-130 "
            "checkpoints, at least 100 redundant) the unlinks were made by two worker "
            "processes, with --jobs 1 by the prune process itself",
            "every checkpoint directory's mtime (and the run directory's) as before the prune",
            "transformers.trainer_utils.sort_checkpoints(use_mtime=True, a random "
            "best_model_checkpoint or none) gives the same order as on an untouched copy, "
            "and rotate_checkpoints(save_total_limit random) keeps the same checkpoints",
        ], test="test_the_trainers_rotation_chooses_as_on_an_untouched_copy")
    for i in range(runs_wanted()):
        jobs = 2 if i % 2 else 1
        root = tmp_path / f"t{i}" / "results"
        run = root / "run"
        kinds = build_trainer_run(results, run, rng, many=jobs == 2)
        untouched = tmp_path / f"t{i}" / "untouched" / "run"
        shutil.copytree(run, untouched, symlinks=True)
        os.utime(untouched, ns=(os.lstat(run).st_atime_ns, os.lstat(run).st_mtime_ns))
        before = dir_mtimes(run)
        run_mtime = os.lstat(run).st_mtime_ns
        report = tmp_path / f"t{i}" / "unlinks"
        proc = subprocess.run([sys.executable, "-c", UNLINKS_BY_PID, str(report), "prune", "--yes",
                               "--json", "--no-progress", "--jobs", str(jobs), str(root)],
                              capture_output=True, text=True, timeout=GUARD_S, cwd=REPO,
                              stdin=subprocess.DEVNULL)
        failures = []
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            failures.append(f"prune exited {proc.returncode}: {proc.stderr[-400:]}")
        expected = {f"run/{n}/{MERGED}" for n, k in kinds.items() if k == "redundant"}
        try:
            deleted = {d["path"] for d in json.loads(proc.stdout)["deleted"]}
        except (ValueError, KeyError):
            deleted = set()
            failures.append(f"no JSON document: {proc.stdout[-200:]!r}")
        if deleted != expected:
            failures.append(f"deleted {len(deleted)} files, expected the {len(expected)} redundant "
                            f"merged files; differ: {sorted(deleted ^ expected)[:6]}")
        lines = report.read_text().split() if report.exists() else []
        main_pid = lines[1] if len(lines) > 1 and lines[0] == "main" else None
        pids = [p for p in lines[2:]]
        by = {p for p in pids if p != main_pid}
        if jobs == 2 and (len(by) != 2 or main_pid in pids):
            failures.append(f"--jobs 2: unlinks by {len(by)} worker processes, "
                            f"{pids.count(main_pid)} by the prune process")
        if jobs == 1 and by:
            failures.append(f"--jobs 1: unlinks by other processes {sorted(by)}")
        if dir_mtimes(run) != before:
            moved = sorted(k for k in before if dir_mtimes(run).get(k) != before[k])
            failures.append(f"directory mtimes moved: {moved[:8]}")
        if os.lstat(run).st_mtime_ns != run_mtime:
            failures.append("the run directory's mtime moved")
        names = sorted(kinds)
        limit = rng.randint(1, len(names))
        best = rng.choice([None, rng.choice(names)])
        want = trainer_choice(untouched, limit, best)
        got = trainer_choice(run, limit, best)
        if got[0] != want[0]:
            failures.append(f"rotation order {got[0][:8]}..., untouched {want[0][:8]}...")
        if got[1] != want[1]:
            failures.append(f"rotation keeps {got[1][:8]}, untouched keeps {want[1][:8]}")
        counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
        runs.add(f"--jobs {jobs}: {len(names)} checkpoints {counts}", failures, jobs=jobs,
                 checkpoints=len(names), kinds=counts, deleted=len(deleted), save_total_limit=limit,
                 best_model_checkpoint=best, kept=len(want[1]), unlinking_workers=len(by))
    rotated = sum(r["kept"] < r["checkpoints"] for r in runs.records)
    runs.note(f"seed {seed}; runs with --jobs 2: {sum(r['jobs'] == 2 for r in runs.records)}; runs "
              f"whose rotation deletes checkpoints (save_total_limit below their count): {rotated}")
    finish(runs, seed)
