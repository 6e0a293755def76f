"""Reliability, hostile files: every malformed or malicious file, in the place it would have in an
otherwise sound run, read by the real CLI in a child process held to 1.5 GB of address space
and 300 s (a guard against a hang: each child takes seconds).

Each case is a run directory of three copies of a redundant checkpoint (the Trainer's merged
weights beside a complete PEFT tree) whose middle one, ``checkpoint-2``, holds the hostile file.
Per case ``audit`` runs in its own process (its wall time and peak RSS are the case's);
``validate`` reads every hostile checkpoint in one process (the heavy cases in a second one), as
it imports peft and torch once per process; ``prune --dry-run`` plans over the whole tree once;
``migrate`` converts a selection. ``CKPT_TOOLS_HOSTILE_EACH=1`` also runs ``validate`` and
``prune --dry-run`` once per case.

Checked per case: the documented exit code, the expected problem code on the expected file, no
traceback, no payload ever run (each writes a sentinel file; none may appear, while the same
payloads do run when unpickled for real), the two sound checkpoints beside it unaffected, and no
deletion planned in the hostile checkpoint unless its PEFT tree is sound.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from reliability import REPO, cli_env, json_document
from scorecard import Runs
from test_formats_safetensors import HOSTILE
from test_formats_torchsave import _rezip, _set_declared_size

from ckpt_tools.problems import (BAD_ARCHIVE, BAD_CONFIG, BAD_HEADER, BAD_JSON, TRUNCATED,
                                 UNSAFE_PICKLE)

SCENARIO = 7
AS_LIMIT = 1536 * 1024 * 1024        # RLIMIT_AS of every child: a guard, not a measurement
TIME_LIMIT = 300.0                   # seconds per child: a guard too, far beyond any child's time
EACH_ENV = "CKPT_TOOLS_HOSTILE_EACH"
HOSTILE_CK = "checkpoint-2"
SIBLINGS = ("checkpoint-1", "checkpoint-3")
ADAPTER = "peft_adapters/expert_1/adapter_model.safetensors"
ADAPTER_CONFIG = "peft_adapters/expert_1/adapter_config.json"
ROUTER = "dylo_moe_state/router.pt"
MERGED = "model.safetensors"


# --- the children --------------------------------------------------------------------------------

@dataclass
class Child:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float
    timed_out: bool

    def json(self) -> dict | None:
        return json_document(self.stdout)

    def guard_failures(self, what: str) -> list[str]:
        out = []
        if self.timed_out:
            out.append(f"{what}: killed after {TIME_LIMIT:.0f} s")
        elif self.rc < 0 or self.rc > 2 and self.rc != 75:
            out.append(f"{what}: exit {self.rc} (killed, or an undocumented code): {self.stderr[-400:]}")
        if "Traceback" in self.stdout + self.stderr:
            out.append(f"{what}: a traceback: {self.stderr[-600:]}")
        if re.search(r"MemoryError|RecursionError", self.stderr):
            out.append(f"{what}: {self.stderr.strip().splitlines()[-1][:200]}")
        return out


# A small launcher between the test and each child: the child is forked from it, not from the
# test process, whose resident size (torch loaded) Linux would otherwise count in the child's
# peak RSS (ru_maxrss keeps the pre-exec image's high-water mark). It sets RLIMIT_AS in the
# child, waits for it, and writes the child's exit status and ru_maxrss to a file.
LAUNCH = textwrap.dedent("""
    import json, os, resource, sys
    limit, report = int(sys.argv[1]), sys.argv[2]
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.execv(sys.argv[3], sys.argv[3:])
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(report, "w") as fh:
        json.dump({"rc": code, "maxrss_kb": usage.ru_maxrss}, fh)
    sys.exit(code if code >= 0 else 128 - code)
""")


def run_limited(*args, timeout: float = TIME_LIMIT) -> Child:
    """``python -m ckpt_tools.cli ARGS`` under RLIMIT_AS and a timeout, with its own peak RSS."""
    env = cli_env()
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "rusage.json")
        cmd = [sys.executable, "-c", LAUNCH, str(AS_LIMIT), report,
               sys.executable, "-m", "ckpt_tools.cli", *map(str, args)]
        with open(os.path.join(d, "out"), "w+b") as out, open(os.path.join(d, "err"), "w+b") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                    env=env, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)    # the launcher and the command
                proc.wait()
                timed_out = True
            seconds = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = (f.read().decode("utf-8", "replace") for f in (out, err))
        try:
            with open(report) as fh:
                usage = json.load(fh)
        except (OSError, ValueError):
            usage = {"rc": proc.returncode, "maxrss_kb": 0}
    return Child(list(map(str, args)), usage["rc"], stdout, stderr, round(seconds, 3),
                 round(usage["maxrss_kb"] / 1024, 1), timed_out)


# --- hostile contents ----------------------------------------------------------------------------

class _Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint would run on load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _str_op(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def payload_pickles(sentinel: Path) -> dict[str, bytes]:
    """data.pkl bytes of each malicious pickle, every one aimed at ``sentinel``."""
    s = str(sentinel)
    wrap = lambda obj: pickle.dumps({"gate.weight": obj}, protocol=2)   # noqa: E731
    return {
        "os.system": b"\x80\x02}X\x0b\x00\x00\x00gate.weightcos\nsystem\n" + _str_op(f"touch {s}")
                     + b"\x85Rs.",
        "posix.system": wrap(_Payload(os.system, (f"touch {s}",))),
        "builtins.eval": wrap(_Payload(builtins.eval, (f"open({s!r}, 'w').close()",))),
        "subprocess.Popen": wrap(_Payload(subprocess.Popen, (["touch", s],))),
        "GLOBAL+REDUCE of an arbitrary class": wrap(_Payload(logging.FileHandler, (s,))),
    }


def zip_archive(data_pkl: bytes, prefix: str = "router") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def _zeros_deflated(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``mib`` MiB of zero bytes (about 1 KiB per MiB) and its CRC-32."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)   # self-contained
    crc, zero = 0, b"\0" * (1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zero, crc)
    return block * mib + c.flush(), crc


def deflated_zip(record: str, stream: bytes, crc: int, size: int) -> bytes:
    """A torch-style archive whose ``record`` is the given deflate stream, declaring ``size``."""
    out = io.BytesIO()
    entries = []
    for name, method, data, crc_, usize in ((f"router/{record}", 8, stream, crc, size),
                                            ("router/version", 0, b"3\n", zlib.crc32(b"3\n"), 2)):
        raw = name.encode()
        entries.append((raw, method, crc_, len(data), usize, out.tell()))
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc_, len(data),
                              usize, len(raw), 0) + raw + data)
    cd = out.tell()
    for raw, method, crc_, csize, usize, offset in entries:
        out.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc_,
                              csize, usize, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    end = out.tell()
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 2, 2, end - cd, cd, 0))
    return out.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    rel: str                  # where the hostile file sits in the checkpoint
    code: str | None          # the problem code it must get there; None: it is accepted as it is
    level: str = "headers"    # "headers": audit, prune and validate see it; "full": validate only
    template: str = "canonical"
    heavy: bool = False       # large: validated apart from the others
    payload: bool = False     # a pickle meant to run code (a sentinel that must never appear)
    migrate: bool = False     # also migrated

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")[:60]


def build_cases(tmp: Path, template: Path):
    """[(Case, bytes builder)]: each builder returns the file's bytes for a sentinel path."""
    import torch

    cases: list[tuple[Case, object]] = []

    def add(case: Case, content) -> None:
        cases.append((case, content))

    # safetensors headers: every case of the parser's own hostile table, as an expert's adapter
    for name, (blob, code, _) in HOSTILE.items():
        add(Case(f"adapter safetensors: {name}", ADAPTER, code), blob)
    # the same kinds as the Trainer's merged weights
    for name in ("length over 100 MB", "duplicate key", "not JSON", "deeply nested",
                 "overlapping offsets", "truncated data"):
        blob, code, _ = HOSTILE[name]
        add(Case(f"merged safetensors: {name}", MERGED, code, migrate=name == "duplicate key"), blob)
    add(Case("merged safetensors: header claims 99 MB, file of 1 KiB", MERGED, TRUNCATED),
        struct.pack("<Q", 99_000_000) + b"{" + b" " * 1015)
    junk = b'{"__metadata__": {"junk": "' + b"x" * (100_000_000 - 40)
    junk += b" " * (-len(junk) % 8)
    add(Case("merged safetensors: a real header of 100 MB of junk", MERGED, BAD_HEADER, heavy=True),
        struct.pack("<Q", len(junk)) + junk)

    # pickles that would run code: in the router (PEFT tree), a flat expert (v3), the merged
    # dylo_moe_weights.pt, the optimizer and RNG state (validate only), training_args.bin
    for name in ("os.system", "posix.system", "builtins.eval", "subprocess.Popen",
                 "GLOBAL+REDUCE of an arbitrary class"):
        add(Case(f"router.pt pickle: {name}", ROUTER, UNSAFE_PICKLE, payload=True,
                 migrate=name == "os.system"),
            lambda s, n=name: zip_archive(payload_pickles(s)[n]))
    add(Case("router.pt pickle: NEWOBJ + BUILD of an arbitrary object", ROUTER, UNSAFE_PICKLE),
        zip_archive(b"\x80\x02}X\x0b\x00\x00\x00gate.weightclogging\nFileHandler\n)\x81}"
                    + _str_op("baseFilename") + _str_op("/tmp/x") + b"sbs."))
    add(Case("router.pt pickle: BUILD on a list", ROUTER, BAD_ARCHIVE),
        zip_archive(b"\x80\x02}X\x0b\x00\x00\x00gate.weight]}bs."))
    add(Case("router.pt pickle: BUILD state smuggling a global", ROUTER, UNSAFE_PICKLE),
        zip_archive(b"\x80\x02ccollections\nOrderedDict\n)RN}X\x09\x00\x00\x00__class__cposix\n"
                    b"system\ns\x86b."))

    def legacy_payload(s: Path) -> bytes:
        buf = io.BytesIO()
        torch.save({"gate.weight": _Payload(os.system, (f"touch {s}",))}, buf,
                   _use_new_zipfile_serialization=False)
        return buf.getvalue()

    add(Case("router.pt legacy format: os.system", ROUTER, UNSAFE_PICKLE, payload=True), legacy_payload)
    add(Case("expert_1.pt (v3) pickle: subprocess.Popen", "peft_adapters/expert_1.pt", UNSAFE_PICKLE,
             template="v3", payload=True, migrate=True),
        lambda s: zip_archive(pickle.dumps({"w": _Payload(subprocess.Popen, (["touch", str(s)],))},
                                           protocol=2), prefix="expert_1"))
    add(Case("dylo_moe_weights.pt pickle: builtins.eval", "dylo_moe_weights.pt", UNSAFE_PICKLE,
             payload=True, migrate=True),
        lambda s: zip_archive(payload_pickles(s)["builtins.eval"], prefix="dylo_moe_weights"))
    add(Case("optimizer.pt pickle: os.system", "optimizer.pt", UNSAFE_PICKLE, level="full",
             payload=True, migrate=True),
        lambda s: zip_archive(payload_pickles(s)["os.system"], prefix="optimizer"))
    # rng_state*.pth is judged as the Trainer loads it on resume (weights_only, numpy's array
    # allowed); training_args.bin (a pickled TrainingArguments) names arbitrary classes by
    # design: checked as an archive only and never unpickled, so a payload in it is no problem
    # (and never runs)
    add(Case("rng_state.pth pickle: subprocess.Popen", "rng_state.pth", UNSAFE_PICKLE,
             level="full", payload=True),
        lambda s: zip_archive(payload_pickles(s)["subprocess.Popen"], prefix="rng_state"))
    add(Case("training_args.bin pickle: os.system (never unpickled)", "training_args.bin", None,
             level="full", payload=True, migrate=True),
        lambda s: zip_archive(payload_pickles(s)["os.system"], prefix="training_args"))

    # damaged archives
    router = (template / ROUTER).read_bytes()
    add(Case("router.pt zip truncated", ROUTER, BAD_ARCHIVE), router[:len(router) // 2])
    legacy = io.BytesIO()
    torch.save(torch.load(template / ROUTER, weights_only=True), legacy,
               _use_new_zipfile_serialization=False)
    add(Case("router.pt legacy truncated", ROUTER, TRUNCATED), legacy.getvalue()[:len(legacy.getvalue()) // 2])
    add(Case("training_args.bin zip truncated", "training_args.bin", BAD_ARCHIVE, level="full"),
        (template / "training_args.bin").read_bytes()[:3000])
    add(Case("rng_state.pth zip truncated", "rng_state.pth", BAD_ARCHIVE, level="full"),
        (template / "rng_state.pth").read_bytes()[:5000])
    small, crc = _zeros_deflated(1)
    add(Case("zip bomb: data.pkl claims 4 GiB from 1 KiB", ROUTER, BAD_ARCHIVE, migrate=True),
        deflated_zip("data.pkl", small, crc, 0xFFFFFFF0))
    add(Case("zip bomb: data.pkl inflates to 1 GiB (1 MiB compressed)", ROUTER, BAD_ARCHIVE),
        deflated_zip("data.pkl", *_zeros_deflated(1024), 1 << 30))
    add(Case("zip bomb: data.pkl inflates to 128 MiB (under the pickle limit)", ROUTER, BAD_ARCHIVE,
             heavy=True),
        deflated_zip("data.pkl", *_zeros_deflated(128), 128 << 20))
    (tmp / "router-src.pt").write_bytes(router)
    bomb = bytearray(_rezip(tmp / "router-src.pt", tmp / "router-bomb.pt", compress={"data/0"}).read_bytes())
    _set_declared_size(bomb, tmp / "router-bomb.pt", "data/0", 0xFFFFFFF0)
    add(Case("zip bomb: a tensor storage claims 4 GiB", ROUTER, BAD_ARCHIVE), bytes(bomb))
    add(Case("optimizer.pt zip bomb: data.pkl claims 4 GiB", "optimizer.pt", BAD_ARCHIVE,
             level="full"), deflated_zip("data.pkl", small, crc, 0xFFFFFFF0))

    # JSON
    cfg = json.loads((template / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    text = json.dumps(cfg, indent=2)

    def cfg_with(key: str, literal: str) -> bytes:
        return re.sub(rf'"{key}": [^,\n]+', f'"{key}": {literal}', text, count=1).encode()

    nested = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    add(Case("adapter_config.json nested 100k deep", ADAPTER_CONFIG, BAD_JSON), nested)
    add(Case("adapter_config.json lora_alpha NaN", ADAPTER_CONFIG, BAD_CONFIG, migrate=True),
        cfg_with("lora_alpha", "NaN"))
    add(Case("adapter_config.json lora_alpha Infinity", ADAPTER_CONFIG, BAD_CONFIG),
        cfg_with("lora_alpha", "Infinity"))
    add(Case("adapter_config.json lora_alpha 1e999", ADAPTER_CONFIG, BAD_CONFIG),
        cfg_with("lora_alpha", "1e999"))
    add(Case("adapter_config.json lora_alpha of 4000 digits", ADAPTER_CONFIG, BAD_CONFIG),
        cfg_with("lora_alpha", "9" * 4000))
    add(Case("adapter_config.json r of 5000 digits", ADAPTER_CONFIG, BAD_JSON),
        cfg_with("r", "9" * 5000))
    add(Case("adapter_config.json lora_dropout NaN", ADAPTER_CONFIG, BAD_CONFIG),
        cfg_with("lora_dropout", "NaN"))
    add(Case("adapter_config.json lora_dropout 5", ADAPTER_CONFIG, BAD_CONFIG),
        cfg_with("lora_dropout", "5"))
    add(Case("adapter_config.json in Latin-1", ADAPTER_CONFIG, BAD_JSON),
        json.dumps({**cfg, "base_model_name_or_path": "modèle-à-é"}, ensure_ascii=False).encode("latin-1"))
    add(Case("adapter_config.json in UTF-16", ADAPTER_CONFIG, BAD_JSON), text.encode("utf-16"))
    add(Case("config.json nested 100k deep", "config.json", BAD_JSON), nested)
    add(Case("dylo_moe_state/config.json of 50 MB", "dylo_moe_state/config.json", BAD_JSON, heavy=True),
        b'{"num_experts": 3, "pad": "' + b"x" * (50 << 20) + b'"}')
    add(Case("trainer_state.json nested 100k deep", "trainer_state.json", BAD_JSON, level="full"),
        b'{"log_history": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    # the Trainer itself writes NaN (a diverged loss) into trainer_state.json: accepted
    add(Case("trainer_state.json with NaN and a 4000-digit int", "trainer_state.json", None,
             level="full"),
        b'{"best_metric": NaN, "global_step": ' + b"7" * 4000 + b', "log_history": [{"loss": NaN}]}')
    return cases


# --- the test ------------------------------------------------------------------------------------

def _problems(ck: dict, code: str, path: str) -> bool:
    return any(p["code"] == code and p["path"] == path and p["severity"] == "error"
               for p in ck.get("problems", []))


def _errors(ck: dict) -> list[str]:
    return [f"{p['code']} {p['path']}" for p in ck.get("problems", []) if p["severity"] == "error"]


LIVENESS = textwrap.dedent("""
    import os, pickle, sys, zipfile
    for path in sys.argv[1:]:
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        try:
            pickle.loads(data)
        except Exception:
            pass
    while True:                 # a payload's Popen runs on: wait for every child to exit
        try:
            os.wait()
        except ChildProcessError:
            break
""")


def _check_case(case: Case, run: Path, audit: Child, validate: dict | None, planned: set[str],
                sentinels: Path) -> list[str]:
    failures = audit.guard_failures("audit")
    hostile_rel = f"{HOSTILE_CK}/{case.rel}"
    seen_by_audit = case.code is not None and case.level == "headers"
    doc = audit.json()
    if audit.rc != (1 if seen_by_audit else 0):
        failures.append(f"audit exited {audit.rc}, expected {1 if seen_by_audit else 0}")
    cks = {c["path"]: c for c in (doc or {}).get("checkpoints", [])}
    if doc is None or set(cks) != {*SIBLINGS, HOSTILE_CK}:
        failures.append(f"audit: checkpoints {sorted(cks)} ({audit.stdout[-200:]})")
    else:
        hostile = cks[HOSTILE_CK]
        if seen_by_audit:
            if hostile["status"] != "broken" or not _problems(hostile, case.code, hostile_rel):
                failures.append(f"audit: {hostile['status']}, errors {_errors(hostile)}; expected "
                                f"{case.code} on {hostile_rel}")
        elif hostile["status"] != "redundant" or _errors(hostile):
            failures.append(f"audit: {hostile['status']} {_errors(hostile)}; expected redundant "
                            "(audit does not read this file)")
        for s in SIBLINGS:
            if cks[s]["status"] != "redundant" or cks[s]["problems"]:
                failures.append(f"audit: the sound {s} is {cks[s]['status']} {cks[s]['problems']}")
    if validate is None:
        failures.append("validate reported nothing for it")
    elif case.code is not None:
        if validate["status"] != "broken" or not _problems(validate, case.code, case.rel):
            failures.append(f"validate: {validate['status']}, errors {_errors(validate)}; "
                            f"expected {case.code} on {case.rel}")
    elif validate["status"] != "redundant" or _errors(validate):
        failures.append(f"validate: {validate['status']} {_errors(validate)}; expected redundant "
                        "with no error")
    in_hostile = sorted(p for p in planned if p.startswith(f"{run.name}/{HOSTILE_CK}/"))
    if seen_by_audit and in_hostile:
        failures.append(f"prune plans deletions in a checkpoint with a hostile PEFT tree: {in_hostile}")
    if not seen_by_audit and f"{run.name}/{HOSTILE_CK}/{MERGED}" not in planned:
        failures.append("prune does not plan the merged weights of a checkpoint whose PEFT tree "
                        "audit finds sound")
    for s in SIBLINGS:
        if f"{run.name}/{s}/{MERGED}" not in planned:
            failures.append(f"prune does not plan the sound {s}'s merged weights")
    if (sentinels / case.slug).exists():
        failures.append("THE PAYLOAD RAN: its sentinel file exists")
    return failures


def _check_migrate(mig: Child, chosen: list[tuple[Case, Path]], mdst: Path) -> list[str]:
    failures = mig.guard_failures("migrate")
    doc = mig.json()
    if mig.rc != 0 or doc is None:
        return failures + [f"migrate exited {mig.rc}: {mig.stderr[-500:]}"]
    if doc["failed"]:
        failures.append(f"migrate failed: {doc['failed']}")
    skipped = {s["source"]: s["reason"] for s in doc["skipped"]}
    migrated = {m["source"] for m in doc["migrated"]}
    for case, run in chosen:
        source = f"{run.name}/{HOSTILE_CK}"
        if case.code is not None and case.level == "headers":
            if not skipped.get(source, "").startswith(f"broken: {case.code}"):
                failures.append(f"{case.name}: not skipped as broken ({case.code}): "
                                f"{skipped.get(source) or 'migrated'}")
        elif source not in migrated:
            failures.append(f"{case.name}: not migrated ({skipped.get(source)})")
    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", mdst)
    failures += audit.guard_failures("audit of DST")
    found = {c["path"]: c for c in (audit.json() or {}).get("checkpoints", [])}
    if set(found) != {m["target"] for m in doc["migrated"]}:
        failures.append(f"DST holds {sorted(found)}, migrate reports {sorted(migrated)}")
    for path, c in found.items():
        if c["status"] != "healthy" or _errors(c):
            failures.append(f"target {path}: {c['status']} {_errors(c)}")
    return failures


def test_hostile_files_get_a_problem_code_and_run_nothing(results_tree, tmp_path):
    src, _, _ = results_tree
    templates = {"canonical": src / "run_trainer" / "checkpoint-2",
                 "v3": src / "seed_v3" / "checkpoint-100"}
    sentinels = tmp_path / "sentinels"
    sentinels.mkdir()
    runs = Runs("hostile", scenario=SCENARIO,
                title="Hostile files in an otherwise sound run: malformed safetensors headers, "
                      "zip bombs, truncated archives, pickles that run code, hostile JSON",
                checks=[
                    "every child (python -m ckpt_tools.cli ...) runs under RLIMIT_AS 1.5 GB and a "
                    f"{TIME_LIMIT:.0f} s timeout: none is killed, none exits with an undocumented code, no "
                    "traceback, no MemoryError or RecursionError",
                    "audit (one process per case): exit 1 and the expected error code on the "
                    "hostile file when audit reads that file, else exit 0 and the checkpoint "
                    "redundant; the two sound checkpoints beside it redundant with no problem",
                    "validate: the hostile checkpoint broken with the expected code on the "
                    "expected file (accepted cases: redundant with no error); exit 1",
                    "prune --dry-run: no deletion planned in the hostile checkpoint unless audit "
                    "finds its PEFT tree sound; the sound checkpoints' merged files planned",
                    "migrate of a selection: exit 0, broken sources skipped naming the code, the "
                    "others migrated to targets that audit healthy with no error",
                    "no pickle payload ever ran (each aims at its own sentinel file; none exists "
                    "at the end), while the same payloads do run when unpickled for real",
                ], test="test_hostile_files_get_a_problem_code_and_run_nothing")

    t0 = time.monotonic()
    cases = build_cases(tmp_path, templates["canonical"])
    root = tmp_path / "hostile"
    placed: list[tuple[Case, Path]] = []
    for i, (case, content) in enumerate(cases):
        run = root / f"{i:02d}-{case.slug}"
        for ck in (*SIBLINGS, HOSTILE_CK):
            shutil.copytree(templates[case.template], run / ck, symlinks=True)
        data = content(sentinels / case.slug) if callable(content) else content
        target = run / HOSTILE_CK / case.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        placed.append((case, run))
    msrc, mdst = tmp_path / "migrate-src", tmp_path / "migrate-dst"
    chosen = [(c, r) for c, r in placed if c.migrate]
    for case, run in chosen:
        shutil.copytree(run / HOSTILE_CK, msrc / run.name / HOSTILE_CK, symlinks=True)
    runs.note(f"{len(placed)} cases built in {time.monotonic() - t0:.1f} s.")
    each = bool(os.environ.get(EACH_ENV))
    groups = {"light": [r for c, r in placed if not c.heavy], "heavy": [r for c, r in placed if c.heavy]}

    # every child, two at a time (the machine's two cores); the heavy ones first
    with ThreadPoolExecutor(max_workers=2) as pool:
        v_jobs = {name: pool.submit(run_limited, "validate", "--json", "--min-age", "0",
                                    *(d / HOSTILE_CK for d in dirs))
                  for name, dirs in groups.items()}
        prune_job = pool.submit(run_limited, "prune", "--dry-run", "--json", "--min-age", "0", root)
        mig_job = pool.submit(lambda: (lambda m: (m, _check_migrate(m, chosen, mdst)))(
            run_limited("migrate", "--json", "--min-age", "0", "--no-progress", msrc, mdst,
                        timeout=max(TIME_LIMIT, 180))))
        audit_jobs = [pool.submit(run_limited, "audit", "--json", "--min-age", "0", "--no-progress", run)
                      for _, run in placed]
        each_jobs = [(pool.submit(run_limited, "validate", "--json", "--min-age", "0", run / HOSTILE_CK),
                      pool.submit(run_limited, "prune", "--dry-run", "--json", "--min-age", "0", run))
                     for _, run in placed] if each else []

    validated: dict[str, dict] = {}
    batch_of: dict[str, Child] = {}
    for name, job in v_jobs.items():
        child = job.result()
        doc = child.json()
        failures = child.guard_failures(f"validate ({name})")
        if child.rc != 1:
            failures.append(f"validate ({name}) exited {child.rc}, expected 1: {child.stderr[-300:]}")
        if doc is None:
            failures.append(f"validate ({name}): no JSON document: {child.stdout[-300:]}")
        else:
            for ck in doc["checkpoints"]:
                validated[str(Path(ck["root"]).parent)] = ck
        for d in groups[name]:
            batch_of[str(d)] = child
        runs.add(f"validate: the {len(groups[name])} {name} hostile checkpoints in one process",
                 failures, seconds=child.seconds, peak_rss_mb=child.peak_rss_mb, command="validate")
    prune = prune_job.result()
    planned = {d["path"] for d in (prune.json() or {}).get("deleted", [])}
    failures = prune.guard_failures("prune --dry-run")
    if prune.rc != 0 or prune.json() is None:
        failures.append(f"prune --dry-run exited {prune.rc}: {prune.stderr[-400:]}")
    runs.add(f"prune --dry-run over all {len(placed)} cases in one process", failures,
             seconds=prune.seconds, peak_rss_mb=prune.peak_rss_mb, command="prune --dry-run",
             planned=len(planned))

    worst = {"seconds": 0.0, "peak_rss_mb": 0.0}
    for k, ((case, run), job) in enumerate(zip(placed, audit_jobs)):
        audit = job.result()
        vchild = batch_of[str(run)]
        v = validated.get(str(run))
        mine = planned
        extra: list[str] = []
        if each:
            vchild, own = (j.result() for j in each_jobs[k])
            extra = vchild.guard_failures("validate") + own.guard_failures("prune --dry-run")
            if vchild.rc != (1 if case.code else 0):
                extra.append(f"validate exited {vchild.rc}, expected {1 if case.code else 0}")
            v = ((vchild.json() or {}).get("checkpoints") or [None])[0]
            mine = {f"{run.name}/{d['path']}" for d in (own.json() or {}).get("deleted", [])}
        failures = extra + _check_case(case, run, audit, v, mine, sentinels)
        worst["seconds"] = max(worst["seconds"], audit.seconds)
        worst["peak_rss_mb"] = max(worst["peak_rss_mb"], audit.peak_rss_mb)
        runs.add(case.name, failures, seconds=audit.seconds, peak_rss_mb=audit.peak_rss_mb,
                 file=case.rel, bytes=(run / HOSTILE_CK / case.rel).stat().st_size,
                 expected_code=case.code, payload=case.payload,
                 found_by=("audit, validate, prune" if case.code and case.level == "headers"
                           else "validate" if case.code else "accepted"),
                 audit_exit=audit.rc,
                 validate_process={"seconds": vchild.seconds, "peak_rss_mb": vchild.peak_rss_mb,
                                   "checkpoints": 1 if each else len(groups["heavy" if case.heavy else "light"])})

    mig, failures = mig_job.result()
    runs.add(f"migrate of {len(chosen)} hostile checkpoints", failures, seconds=mig.seconds,
             peak_rss_mb=mig.peak_rss_mb, command="migrate", cases=[c.name for c, _ in chosen])

    # the payloads are live: unpickled for real (in a child, against other sentinels) they run
    probes, live_dir = tmp_path / "probes", tmp_path / "live"
    probes.mkdir()
    live_dir.mkdir()
    paths = []
    for name in payload_pickles(live_dir):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        (probes / f"{slug}.pt").write_bytes(zip_archive(payload_pickles(live_dir / slug)[name]))
        paths.append(probes / f"{slug}.pt")
    # LIVENESS returns once every process a payload started has exited: then all have run
    subprocess.run([sys.executable, "-c", LIVENESS, *map(str, paths)], cwd=tmp_path,
                   timeout=TIME_LIMIT, capture_output=True)
    ran = sorted(p.name for p in live_dir.iterdir())
    failures = [] if len(ran) == len(paths) else [f"only {ran} of {len(paths)} payloads ran when unpickled"]
    left = sorted(p.name for p in sentinels.iterdir())     # the last word: none ran in ckpt-tools
    if left:
        failures.append(f"sentinel files exist: {left}")
    runs.add("payloads: live when unpickled, never run by ckpt-tools", failures, payloads=len(paths))
    heavy = [r for r in runs.records if r["name"] in {c.name for c, _ in placed if c.heavy}]
    runs.note(f"Largest audit child: {worst['seconds']:.2f} s, {worst['peak_rss_mb']:.0f} MB peak "
              "RSS (" + "; ".join(f"{r['name']}: {r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB"
                                  for r in heavy) + "). validate imports peft (and torch) once per "
              "process, so the hostile checkpoints are validated together: the light ones in one "
              f"process, the heavy ones in another; {EACH_ENV}=1 runs validate and prune --dry-run "
              "once per case too. Children run two at a time.")
    runs.finish(max_case_seconds=worst["seconds"], max_case_peak_rss_mb=worst["peak_rss_mb"])
