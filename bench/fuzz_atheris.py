"""Coverage-guided fuzzing of the format readers with atheris (libFuzzer), outside the tests.

    .venv/bin/python -m pip install atheris
    .venv/bin/python bench/fuzz_atheris.py [--targets safetensors torchsave pickle]
                                           [--seconds 300] [--workdir bench/out/fuzz]
                                           [--out bench/out/fuzz_atheris.md]

Targets (each gets ``--seconds`` of fuzzing, in one or more libFuzzer processes):

- ``safetensors``: ``parse_header(blob, len(blob))`` gives a header whose offsets tile the data
  section exactly, or a ``FormatError`` (truncated / bad-header / dtype-unknown) with a one-line
  message; ``read_header`` of the same bytes in a file, with the default first read and with a
  16-byte one, gives the same header or error code.
- ``torchsave``: ``inspect_torch_file`` on the bytes in a file, with and without ``check_pickle``,
  gives a result (whose tree ``flatten_tensors`` walks) or a ``FormatError`` (bad-archive /
  truncated / unsafe-pickle) with a one-line message; reading through 64-byte windows, as large
  files are read, gives what the one whole-file read gives; for an input of a seed's size, so
  does a read after the seed's (the reader's memo of whole small archives must not answer for it).
- ``pickle``: the symbolic VM and the checks after it, as a zip archive's data.pkl is evaluated
  (strict and not), then as a legacy file's object pickle: a value or bad-archive / unsafe-pickle.

A finding is any other exception or a disagreement (caught, recorded with its input and the
fuzzing goes on), an input that runs longer than ``--input-timeout`` seconds or a process that
grows past ``--rss-limit-mb`` (libFuzzer stops; the input is kept and a new process resumes from
the corpus). Seeds are real files: a tiny DyLoRA-MoE built by the test fixtures, saved by PEFT
(adapter safetensors), by ``torch.save`` in both containers (router, skill library, expert
state dicts, an AdamW state, a scheduler, RNG states, ``TrainingArguments``), plus small
``safetensors`` files of every dtype and each zip's data.pkl. Nothing here is imported by the tests.

Results: ``bench/out/fuzz_atheris.md`` (and ``.json``); corpora, logs and findings under
``--workdir``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
TARGETS = ("safetensors", "torchsave", "pickle")
MAX_SEED_BYTES = 64 * 1024
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


# --- seeds (parent process: torch, safetensors, peft) --------------------------------------------

def _legacy_object_pickle(blob: bytes) -> bytes:
    """The fourth pickle of a legacy torch.save file (magic, protocol, sys_info, object)."""
    import pickletools

    pos = 0
    for index in range(4):
        for op, _, at in pickletools.genops(io.BytesIO(blob[pos:])):
            if op.name == "STOP":
                end = pos + at + 1
                break
        if index == 3:
            return blob[pos:end]
        pos = end
    raise AssertionError("unreachable")


def _zip_pickle(blob: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _deflated(blob: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            method = zipfile.ZIP_DEFLATED if name.endswith("data.pkl") else zipfile.ZIP_STORED
            dst.writestr(name, src.read(name), method)
    return buf.getvalue()


def make_seeds(workdir: Path) -> dict[str, list[Path]]:
    """Write the seed files of every target under ``workdir/<target>/seeds``."""
    import tempfile

    import torch
    from safetensors.torch import save as st_save

    sys.path.insert(0, str(REPO))
    from fixtures.dylora import build_moe
    from fixtures.layouts import (
        router_legacy_dict, router_state_dict, skill_library, write_canonical_adapters,
        write_trainer_state)

    seeds: dict[str, dict[str, bytes]] = {t: {} for t in TARGETS}
    moe = build_moe(num_experts=2)
    with tempfile.TemporaryDirectory(prefix="ckpt-fuzz-seeds-") as tmp:
        ckpt = Path(tmp) / "checkpoint-10"
        write_canonical_adapters(moe, ckpt)
        write_trainer_state(moe, ckpt, 10)
        for path in sorted(ckpt.rglob("*")):
            if path.suffix == ".safetensors":
                seeds["safetensors"][path.parent.name + "-" + path.name] = path.read_bytes()
            elif path.suffix in (".pt", ".pth", ".bin"):
                seeds["torchsave"][path.name] = path.read_bytes()

    objects = {
        "router": router_state_dict(moe),
        "router_legacy": router_legacy_dict(moe),
        "skill_library": skill_library(moe),
        "expert_0": {k: v.detach().clone() for k, v in moe.expert_raw_state_dict(0).items()},
    }
    for name, obj in objects.items():
        for fmt in ("zip", "legacy"):
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=(fmt == "zip"))
            seeds["torchsave"][f"{name}.{fmt}.pt"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_protocol=4)
        seeds["torchsave"][f"{name}.p4.pt"] = buf.getvalue()
    seeds["torchsave"]["router.deflated.pt"] = _deflated(seeds["torchsave"]["router.zip.pt"])

    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
              torch.int32, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]
    seeds["safetensors"]["dtypes.safetensors"] = st_save(
        {str(d): torch.zeros(2, 3).to(d) for d in dtypes}, metadata={"format": "pt"})
    seeds["safetensors"]["router.safetensors"] = st_save(router_state_dict(moe))
    seeds["safetensors"]["empty.safetensors"] = st_save({})
    seeds["safetensors"]["zero-sized.safetensors"] = st_save(
        {"e": torch.zeros(0, 4), "s": torch.tensor(1.5)})

    for name, blob in seeds["torchsave"].items():
        if blob[:4] == b"PK\x03\x04":
            seeds["pickle"][name + ".data.pkl"] = _zip_pickle(blob)
        else:
            seeds["pickle"][name + ".object.pkl"] = _legacy_object_pickle(blob)

    written: dict[str, list[Path]] = {}
    for target, files in seeds.items():
        folder = workdir / target / "seeds"
        folder.mkdir(parents=True, exist_ok=True)
        written[target] = []
        for name, blob in sorted(files.items()):
            if len(blob) > MAX_SEED_BYTES:
                continue
            (folder / name).write_bytes(blob)
            written[target].append(folder / name)
    return written


def _dict_line(token: bytes) -> str:
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}"
                         for b in token) + '"'


DICTIONARIES = {
    "safetensors": [b'{"', b'":', b'"dtype"', b'"shape"', b'"data_offsets"', b'"__metadata__"',
                    b'"F32"', b'"BF16"', b'"F16"', b'"I64"', b'"BOOL"', b'"U8"', b'"F4"',
                    b'"F8_E4M3"', b"[0,", b"]", b"}", b"null", b"18446744073709551615",
                    b"\\u0000", b"\x00\x00\x00\x00\x00\x00\x00"],
    "torchsave": [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07",
                  b"/data.pkl", b"/data/0", b"/version", b"/byteorder", b"\xff\xff\xff\xff",
                  b"\x01\x00\x10\x00", b"ctorch\nFloatStorage\n",
                  # the legacy container's magic-number pickle
                  b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little"),
                  b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n"],
    "pickle": [b"\x80\x02", b"\x80\x04\x95", b"ctorch._utils\n_rebuild_tensor_v2\n",
               b"ctorch\nFloatStorage\n", b"ctorch\nBFloat16Storage\n",
               b"ccollections\nOrderedDict\n",
               b"ctorch\nSize\n", b"ctorch\ndevice\n", b"c__builtin__\nset\n", b"cos\nsystem\n",
               b"\x8c\x0ccollections\x94\x8c\x0bOrderedDict\x94\x93", b"X\x07\x00\x00\x00storage",
               b"X\x03\x00\x00\x00cpu", b"(X", b"tQ", b"\x85R", b"\x86R", b"u}", b"h\x00", b"q\x00",
               b"\x94", b"\x8a\x08", b"J\xff\xff\xff\x7f", b"\x95\x00\x00\x00\x00\x00\x00\x00"],
}


# --- targets (child process: atheris, no torch) --------------------------------------------------

def _record_finding(workdir: Path, target: str, data: bytes, exc: BaseException,
                    seen: set) -> None:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "ckpt_tools" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    key = f"{type(exc).__name__} at {where}"
    if not any("ckpt_tools" in f.filename for f in frames):
        key += f": {first[:50]}"  # raised by a check of this script: told apart by its message
    if key in seen:
        return
    seen.add(key)
    digest = hashlib.sha1(data).hexdigest()[:16]
    folder = workdir / target / "findings"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"finding-{digest}").write_bytes(data)
    with open(workdir / target / "findings.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"key": key, "type": type(exc).__name__, "where": where,
                             "message": first, "input": str(folder / f"finding-{digest}"),
                             "size": len(data),
                             "traceback": traceback.format_exception(exc)[-6:]}) + "\n")


def _one_line(exc, codes) -> None:
    if exc.code not in codes:
        raise AssertionError(f"FormatError code {exc.code!r} not in {sorted(codes)}")
    if not exc.message or "\n" in exc.message:
        raise AssertionError(f"FormatError message is not one line: {exc.message!r}")


def safetensors_target():
    from ckpt_tools.formats import safetensors_header as sh
    from ckpt_tools.problems import BAD_HEADER, DTYPE_UNKNOWN, TRUNCATED, FormatError

    codes = {BAD_HEADER, DTYPE_UNKNOWN, TRUNCATED}
    path = SCRATCH / f"ckpt-fuzz-{os.getpid()}.safetensors"

    def one(data: bytes) -> None:
        try:
            header = sh.parse_header(data, len(data))
        except FormatError as exc:
            _one_line(exc, codes)
            expected = exc.code
        else:
            position = 0
            for begin, end in sorted((t.begin, t.end) for t in header.tensors):
                if begin != position:
                    raise AssertionError("accepted offsets that do not tile the data")
                position = end
            if header.data_start + position != len(data):
                raise AssertionError("accepted a data section of the wrong size")
            for t in header.tensors:
                if t.end - t.begin != t.nbytes or t.dtype not in sh.DTYPE_BITS:
                    raise AssertionError(f"accepted an inconsistent entry {t!r}")
            expected = header
        path.write_bytes(data)
        for first_read in (sh.FIRST_READ_BYTES, 16):
            try:
                got = sh.read_header(path, first_read=first_read)
            except FormatError as exc:
                _one_line(exc, codes)
                got = exc.code
            if got != expected:
                raise AssertionError(f"read_header(first_read={first_read}) gave {got!r}, "
                                     f"parse_header {expected!r}")
    return one


def torchsave_target(seeds: Path):
    from ckpt_tools.formats import torchsave as ts
    from ckpt_tools.problems import BAD_ARCHIVE, TRUNCATED, UNSAFE_PICKLE, FormatError

    codes = {BAD_ARCHIVE, TRUNCATED, UNSAFE_PICKLE}
    path = SCRATCH / f"ckpt-fuzz-{os.getpid()}.pt"
    same_size: dict[int, list[Path]] = {}
    for seed in sorted(seeds.iterdir()):
        same_size.setdefault(seed.stat().st_size, []).append(seed)
    windows = dict(_SMALL_FILE=0, _HEAD_READ=64, _TAIL_READ=64, _READ_AHEAD=64, _INFLATE_CHUNK=16)
    # each knob is read by the module that defines it: the package, or its zip reader
    holder = {name: ts if name in vars(ts) else ts.zip_archive for name in windows}
    defaults = {name: getattr(holder[name], name) for name in windows}

    from ckpt_tools.read_cache import ReadCache

    def outcome(check: bool, cache=None):
        try:
            info = ts.inspect_torch_file(path, check_pickle=check, cache=cache)
        except FormatError as exc:
            _one_line(exc, codes)
            return exc.code, exc.message
        if info.format not in ("zip", "legacy"):
            raise AssertionError(f"format {info.format!r}")
        if check:
            ts.flatten_tensors(info.obj)
        return info

    def one(data: bytes) -> None:
        path.write_bytes(data)
        for check in (True, False):
            whole = outcome(check)
            for name, value in windows.items():
                setattr(holder[name], name, value)
            try:
                windowed = outcome(check)
            finally:
                for name, value in defaults.items():
                    setattr(holder[name], name, value)
            if windowed != whole:
                raise AssertionError(f"check_pickle={check}: windowed reads gave "
                                     f"{windowed!r:.200}, one read {whole!r:.200}")
            # A seed of the same size read first: what the reader remembers of it must not
            # change the answer for these bytes.
            if len(data) in same_size:
                cache = ReadCache()
                for seed in same_size[len(data)]:
                    try:
                        ts.inspect_torch_file(seed, check_pickle=check, cache=cache)
                    except FormatError:
                        pass
                after_seed = outcome(check, cache)
                if after_seed != whole:
                    raise AssertionError(f"check_pickle={check}: after reading a seed of the same "
                                         f"size: {after_seed!r:.200}, fresh: {whole!r:.200}")
    return one


def pickle_target():
    from ckpt_tools.formats import torchsave as ts
    from ckpt_tools.problems import BAD_ARCHIVE, UNSAFE_PICKLE, FormatError

    codes = {BAD_ARCHIVE, UNSAFE_PICKLE}

    def one(data: bytes) -> None:
        for strict in (True, False):
            (early, obj, _, late), _ = ts._evaluate_afresh(data, strict)
            for error in (early, late):
                if error is not None:
                    _one_line(FormatError(*error), codes)
            if strict and early is None and late is None:
                ts.flatten_tensors(ts._fresh(obj))
        try:
            ts._run_pickle(data, 0, strict=True, pid_len=6)
        except FormatError as exc:
            _one_line(exc, codes)
        except ts._Short:
            pass
    return one


def child(target: str, workdir: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["ckpt_tools"]):
        import ckpt_tools.formats.safetensors_header  # noqa: F401
        import ckpt_tools.formats.torchsave  # noqa: F401
    one = {"safetensors": safetensors_target,
           "torchsave": lambda: torchsave_target(workdir / "torchsave" / "seeds"),
           "pickle": pickle_target}[target]()
    seen = {json.loads(line)["key"] for line in _lines(workdir / target / "findings.jsonl")}

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except Exception as exc:  # a finding: recorded, and the fuzzing goes on
            _record_finding(workdir, target, data, exc, seen)

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


# --- driver --------------------------------------------------------------------------------------

_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_FINAL = re.compile(r"^stat::(\w+):\s+(\d+)")
_STOPS = (("libFuzzer: timeout", "hang"), ("out-of-memory", "memory"),
          ("libFuzzer: deadly signal", "signal"), ("Uncaught Python exception", "uncaught"),
          ("libFuzzer: fuzz target exited", "exit"))


def fuzz_target(target: str, workdir: Path, seconds: float, args) -> dict:
    folder = workdir / target
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (folder / "artifacts").mkdir(exist_ok=True)
    dict_path = folder / f"{target}.dict"
    dict_path.write_text("\n".join(_dict_line(t) for t in DICTIONARIES[target]) + "\n")
    max_len = max([p.stat().st_size for p in (folder / "seeds").iterdir()] + [4096])
    log = folder / "libfuzzer.log"
    log.write_text("")
    (folder / "findings.jsonl").unlink(missing_ok=True)  # this run's findings only
    result = {"target": target, "seconds": 0.0, "executions": 0, "processes": 0, "stops": [],
              "cov": None, "ft": None, "corpus": None, "new_units": 0, "peak_rss_mb": 0,
              "seeds": len(list((folder / "seeds").iterdir())), "max_len": max_len}
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 5 and result["processes"] < 50:
        cmd = [sys.executable, __file__, "--child", target, "--workdir", str(workdir), "--",
               f"-max_total_time={int(left)}", f"-timeout={args.input_timeout}",
               f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={max_len}",
               f"-dict={dict_path}", "-print_final_stats=1", "-print_pcs=0",
               f"-artifact_prefix={folder / 'artifacts'}/", str(corpus), str(folder / "seeds")]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, errors="replace",
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0"))
        result["processes"] += 1
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"=== process {result['processes']}: exit {proc.returncode}, "
                     f"{time.monotonic() - t0:.0f} s\n{proc.stderr}\n")
        executions = 0
        for line in proc.stderr.splitlines():
            if m := _PROGRESS.match(line):
                executions = int(m[1])
                result["cov"], result["ft"], result["corpus"] = int(m[2]), int(m[3]), int(m[4])
            elif m := _FINAL.match(line):
                if m[1] == "number_of_executed_units":
                    executions = int(m[2])
                elif m[1] == "new_units_added":
                    result["new_units"] += int(m[2])
                elif m[1] == "peak_rss_mb":
                    result["peak_rss_mb"] = max(result["peak_rss_mb"], int(m[2]))
        result["executions"] += executions
        if proc.returncode != 0:
            kind = next((k for text, k in _STOPS if text in proc.stderr), f"exit {proc.returncode}")
            artifact = re.findall(r"Test unit written to (\S+)", proc.stderr)
            result["stops"].append({"kind": kind, "artifact": artifact[-1] if artifact else None,
                                    "after_s": round(time.monotonic() - start, 1)})
            if executions == 0 and time.monotonic() - t0 < 30:
                break  # it does not even start: do not loop on it
    result["seconds"] = round(time.monotonic() - start, 1)
    result["findings"] = [json.loads(line) for line in _lines(folder / "findings.jsonl")]
    return result


def render(results: list[dict], started: str) -> str:
    from importlib.metadata import version

    rows = []
    for r in results:
        rate = r["executions"] / r["seconds"] if r["seconds"] else 0
        hangs = sum(1 for s in r["stops"] if s["kind"] == "hang")
        memory = sum(1 for s in r["stops"] if s["kind"] == "memory")
        other = len(r["stops"]) - hangs - memory
        rows.append(f"| {r['target']} | {r['seconds']:.0f} | {r['executions']:,} | {rate:,.0f} | "
                    f"{r['seeds']} | {r['corpus']} | {r['cov']} / {r['ft']} | "
                    f"{len(r['findings'])} | {hangs} | {memory} | {other} |")
    lines = [
        "# Coverage-guided fuzzing of the format readers (atheris)",
        "",
        f"`bench/fuzz_atheris.py`, started {started}; atheris {version('atheris')}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs (shared). Per target: seconds of "
        "fuzzing, inputs executed, seed files, corpus at the end, libFuzzer's coverage "
        "(edges / features), distinct findings (an exception other than the module's "
        "`FormatError` with one of its codes, or a disagreement), inputs that hung, memory "
        "limit hits and other stops.",
        "",
        "| target | s | executions | exec/s | seeds | corpus | cov / ft | findings | hangs "
        "| memory | other stops |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    for r in results:
        for f in r["findings"]:
            lines.append(f"- {r['target']}: `{f['key']}`: {f['message']} (input `{f['input']}`, "
                         f"{f['size']} bytes)")
        for s in r["stops"]:
            lines.append(f"- {r['target']}: libFuzzer stopped ({s['kind']}) after "
                         f"{s['after_s']} s, input `{s['artifact']}`")
    if not any(r["findings"] or r["stops"] for r in results):
        lines.append("No finding, hang or memory blow-up.")
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--child" in sys.argv:
        split = sys.argv.index("--")
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", choices=TARGETS)
        ap.add_argument("--workdir", type=Path)
        a = ap.parse_args(sys.argv[1:split])
        child(a.child, a.workdir, sys.argv[split + 1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    ap.add_argument("--seconds", type=float, default=300, help="fuzzing time per target")
    ap.add_argument("--input-timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=OUT / "fuzz")
    ap.add_argument("--out", type=Path, default=OUT / "fuzz_atheris.md")
    args = ap.parse_args()
    if importlib.util.find_spec("atheris") is None:
        print("atheris is not installed: .venv/bin/python -m pip install atheris", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.workdir.mkdir(parents=True, exist_ok=True)
    seeds = make_seeds(args.workdir)
    print("seeds: " + ", ".join(f"{t} {len(p)}" for t, p in seeds.items()), flush=True)
    results = []
    for target in args.targets:
        results.append(fuzz_target(target, args.workdir, args.seconds, args))
        r = results[-1]
        print(f"{target}: {r['executions']} executions in {r['seconds']} s, "
              f"{len(r['findings'])} findings, {len(r['stops'])} stops", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, started), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 1 if any(r["findings"] or r["stops"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
