"""Bytes read and peak memory of ``migrate`` on large V1 checkpoints.

    .venv/bin/python bench/migrate_bytes.py [--sizes 0.25,0.5,1,2,4] [--bin-sizes 0.5,1,2]
                                            [--workdir /tmp/ckpt-bench] [--keep]

For each size a V1 checkpoint is generated (the DyLoRA-MoE state dict of a Llama-shaped model:
large base weights, 4 LoRA experts of r=16 on q_proj/v_proj, a router; ``model.safetensors``,
or ``pytorch_model.bin`` for ``--bin-sizes``), written straight to disk without holding
it in memory, fsynced and dropped from the page cache. It is then migrated by
``ckpt-tools``' library in a child process, after a warm-up run that puts Python's own files in
the page cache. Reported, from ``/proc/<pid>/io`` and ``wait4``:

- ``read_bytes``: bytes the child made the kernel fetch from storage (the source is cold, so
  this is what the migration read of it: headers, the LoRA/router tensors, filesystem metadata);
- ``rchar``: bytes passed through read syscalls, page cache or not: it also counts the headers
  read at plan and execute time, the re-read of the written adapters (the verify step) and
  Python's own imports (reported apart: the ``rchar`` of the migration alone is measured
  inside the child around plan+execute);
- ``maxrss``: the child's peak resident memory (``VmHWM`` of its own process image);

against the bytes of the tensors extracted (LoRA + router) and the file size. Results go to
``bench/out/migrate_bytes.json``, ``bench/out/migrate_bytes.md`` and, when matplotlib is
there, ``bench/out/migrate_bytes.png`` (peak RSS and bytes read against the file's size).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"

HIDDEN = 1024
INTERMEDIATE = 2816
VOCAB = 16000
EXPERTS = 4
RANK = 16
TARGETS = ("q_proj", "v_proj")
V1 = "foundation_model.base_model.model."


def _layer_tensors(i: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_extracted) of one decoder layer, V1 keys."""
    p = f"{V1}model.layers.{i}."
    out = []
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if proj in TARGETS:
            out.append((f"{p}self_attn.{proj}.base_layer.weight", (HIDDEN, HIDDEN), False))
            for e in range(EXPERTS):
                out.append((f"{p}self_attn.{proj}.lora_A.expert_{e}.weight", (RANK, HIDDEN), True))
                out.append((f"{p}self_attn.{proj}.lora_B.expert_{e}.weight", (HIDDEN, RANK), True))
        else:
            out.append((f"{p}self_attn.{proj}.weight", (HIDDEN, HIDDEN), False))
    out.append((f"{p}mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), False))
    out.append((f"{p}mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), False))
    out.append((f"{p}mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), False))
    out.append((f"{p}input_layernorm.weight", (HIDDEN,), False))
    out.append((f"{p}post_attention_layernorm.weight", (HIDDEN,), False))
    return out


def state_dict_spec(target_bytes: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """Enough layers to reach ``target_bytes`` of fp32 tensors."""
    fixed = [(f"{V1}model.embed_tokens.weight", (VOCAB, HIDDEN), False),
             (f"{V1}lm_head.weight", (VOCAB, HIDDEN), False),
             (f"{V1}model.norm.weight", (HIDDEN,), False),
             ("router.gate.weight", (EXPERTS, HIDDEN), True),
             ("router.gate.bias", (EXPERTS,), True)]
    spec = list(fixed)
    i = 0
    while _nbytes(spec) < target_bytes:
        spec.extend(_layer_tensors(i))
        i += 1
    return spec


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(spec) -> int:
    return sum(4 * _numel(s) for _, s, _ in spec)


def _tensor(name: str, shape, extracted: bool):
    import torch
    if extracted:   # random, so that a wrong byte could not pass for a right one
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen)
    return torch.full(shape, 0.01)


def write_safetensors(path: Path, spec) -> None:
    """A valid safetensors file written tensor by tensor (never all of it in memory)."""
    header, offset = {}, 0
    for name, shape, _ in sorted(spec):
        n = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape, extracted in sorted(spec):
            fh.write(_tensor(name, shape, extracted).numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def write_bin(path: Path, spec) -> None:
    import torch
    torch.save({name: _tensor(name, shape, ex) for name, shape, ex in spec}, path)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _io(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


# --- the child: one migration, with its own io counters around it ---------------------------

def child(src: str, dst: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import peft  # noqa: F401 - imported before the measurement: its reads are not migrate's
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    from ckpt_tools.migrate import MigrateOptions, execute_migrate, plan_migrate
    io0 = _io()
    plan = plan_migrate(src, dst, MigrateOptions(min_age_s=0))
    io1 = _io()
    result = execute_migrate(plan)
    io2 = _io()
    doc = result.to_dict()
    print(json.dumps({"imports": io0, "after_plan": io1, "after_execute": io2,
                      "vm_hwm": _vm_hwm(), "failed": doc["failed"], "migrated": doc["migrated"]}))


def _vm_hwm() -> int:
    """Peak RSS of this process image. (wait4's ru_maxrss also counts the parent's memory
    that the child inherited between fork and exec, so it is not used.)"""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child_rusage(src: Path, dst: Path) -> tuple[dict, int]:
    """Run the child and return (its report, its peak RSS in bytes) via wait4."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(src), str(dst)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []
    import threading

    def pump(stream, into):
        for line in stream:
            into.append(line)
    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks)),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    last_io = None
    while True:
        try:
            last_io = _io(proc.pid)
        except OSError:
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {''.join(err_chunks)[-2000:]}")
    doc = json.loads("".join(out_chunks).strip().splitlines()[-1])
    doc["whole_process_io_last_sample"] = last_io
    return doc, usage.ru_maxrss * 1024


def measure(workdir: Path, label: str, size_gb: float, fmt: str, keep: bool) -> dict:
    import shutil
    spec = state_dict_spec(int(size_gb * 1e9))
    extracted = sum(4 * _numel(s) for _, s, ex in spec if ex)
    run = workdir / f"{label}"
    if run.exists():
        shutil.rmtree(run)
    ckpt = run / "src" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    t0 = time.time()
    merged = ckpt / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    (write_safetensors if fmt == "safetensors" else write_bin)(merged, spec)
    write_s = time.time() - t0
    file_size = merged.stat().st_size
    # warm-up: Python, torch and peft files into the page cache; a throwaway target
    run_child_rusage(run / "src", run / "warm")
    drop_cache(merged)
    t0 = time.time()
    doc, maxrss = run_child_rusage(run / "src", run / "dst")
    wall = time.time() - t0
    if doc["failed"] or len(doc["migrated"]) != 1 or doc["migrated"][0]["method"] != "exact":
        raise RuntimeError(f"expected one exact migration: {doc}")
    imp, plan, exe = doc["imports"], doc["after_plan"], doc["after_execute"]
    row = {
        "label": label, "format": fmt, "file_bytes": file_size, "tensors": len(spec),
        "extracted_bytes": extracted,
        "read_bytes_migration": exe["read_bytes"] - imp["read_bytes"],
        "read_bytes_process": exe["read_bytes"],
        "rchar_migration": exe["rchar"] - imp["rchar"],
        "rchar_plan": plan["rchar"] - imp["rchar"],
        "rchar_imports": imp["rchar"],
        "maxrss_bytes": doc["vm_hwm"], "wait4_maxrss_bytes": maxrss,
        "write_seconds": round(write_s, 1),
        "migrate_wall_seconds": round(wall, 1),
    }
    row["read_ratio"] = row["read_bytes_migration"] / extracted
    row["read_ratio_process"] = row["read_bytes_process"] / extracted
    row["rchar_ratio"] = row["rchar_migration"] / extracted
    if not keep:
        shutil.rmtree(run)
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(rows: list[dict]) -> str:
    lines = ["# migrate: bytes read and peak memory (V1 checkpoints)", "",
             f"Model: Llama-shaped, hidden {HIDDEN}, {EXPERTS} experts, r={RANK} on "
             f"{'/'.join(TARGETS)}, fp32; source dropped from the page cache before each run.", "",
             "| file | format | file size | tensors extracted | read_bytes (migration) | ratio "
             "| read_bytes (whole process) | rchar (migration) | rchar ratio | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['format']} | {_mb(r['file_bytes'])} | "
                     f"{_mb(r['extracted_bytes'])} | {_mb(r['read_bytes_migration'])} | "
                     f"{r['read_ratio']:.3f} | {_mb(r['read_bytes_process'])} | "
                     f"{_mb(r['rchar_migration'])} | {r['rchar_ratio']:.2f} | "
                     f"{_mb(r['maxrss_bytes'])} |")
    lines += ["", "read_bytes counts what the kernel fetched from storage (page-granular); rchar "
              "counts every byte through read(2)/pread(2), page cache or not, including the "
              "plan's and the execute step's header reads and the re-read of the written "
              "adapters that verifies them before the rename."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return False
    fig, (ax_rss, ax_read) = plt.subplots(1, 2, figsize=(11, 4))
    for fmt, marker in (("safetensors", "o"), ("bin", "s")):
        pts = sorted((r["file_bytes"] / 1e9, r) for r in rows if r["format"] == fmt)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        label = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin (zip)"
        ax_rss.plot(xs, [r["maxrss_bytes"] / 1e6 for _, r in pts], marker=marker,
                    label=f"peak RSS, {label}")
        if fmt == "safetensors":
            ax_rss.plot(xs, [x * 1e3 for x in xs], ":", color="gray",
                        label="the merged file's size (for scale)")
        ax_read.plot(xs, [r["read_bytes_migration"] / 1e6 for _, r in pts], marker=marker,
                     label=f"read from storage, {label}")
        if fmt == "safetensors":
            ax_read.plot(xs, [r["extracted_bytes"] / 1e6 for _, r in pts], "k:",
                         label="tensors extracted")
            ax_read.plot(xs, [1.2 * r["extracted_bytes"] / 1e6 for _, r in pts], "r--", lw=0.8,
                         label="1.2 x tensors extracted")
    ax_rss.set_xlabel("merged file size (GB)")
    ax_rss.set_ylabel("peak RSS of the migration (MB)")
    ax_rss.set_ylim(bottom=0)
    ax_rss.set_title("peak memory against the merged file's size")
    ax_read.set_xlabel("merged file size (GB)")
    ax_read.set_ylabel("MB")
    ax_read.set_title("bytes read from storage (cold cache)")
    for ax in (ax_rss, ax_read):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.25,0.5,1,2,4", help="safetensors sizes in GB")
    ap.add_argument("--bin-sizes", default="0.5,1,2", help="pytorch_model.bin sizes in GB "
                    "(empty: none)")
    ap.add_argument("--render", action="store_true",
                    help="only redraw the table and chart from bench/out/migrate_bytes.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ckpt-bench-migrate"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.render:
        rows = json.loads((OUT / "migrate_bytes.json").read_text())
        (OUT / "migrate_bytes.md").write_text(render(rows))
        chart(rows, OUT / "migrate_bytes.png")
        print(render(rows))
        return 0
    sys.path.insert(0, str(REPO))
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [float(s) for s in args.sizes.split(",") if s]:
        rows.append(measure(args.workdir, f"v1-{size:g}GB.safetensors", size, "safetensors",
                            args.keep))
        print(json.dumps(rows[-1]), flush=True)
    for size in [float(s) for s in args.bin_sizes.split(",") if s]:
        rows.append(measure(args.workdir, f"v1-{size:g}GB.bin", size, "bin", args.keep))
        print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "migrate_bytes.json").write_text(json.dumps(rows, indent=2) + "\n")
    (OUT / "migrate_bytes.md").write_text(render(rows))
    chart(rows, OUT / "migrate_bytes.png")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
