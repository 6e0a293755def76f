"""Low-rank extraction: ckpt-tools against mergekit-extract-lora on the same models and rank.

Builds a base model and a fine-tune from a transformers config (random base weights; the
fine-tune adds a rank-r LoRA delta B·A to every linear layer, like ``merge_and_unload``, plus
a little Gaussian noise so the truncation error is not at float32 rounding level), saves both
as safetensors model directories, then times in ONE run, alternating the order, N whole-process
runs of each tool: wall time, peak RSS (``wait4`` rusage of the child), adapter size, and the
per-module reconstruction error of both adapters, measured here in the same way (each adapter's
A/B, with its own scale, against the true delta; optionally the exact SVD's error too).

    python bench/lowrank_vs_mergekit.py                    # 119M-parameter Llama, CPU
    python bench/lowrank_vs_mergekit.py --size 2b --device cuda   # codegemma-2b-like Gemma

mergekit-extract-lora 0.1.5 runs from its own venv, ``bench/.venv-mergekit`` (made here when
missing: ``python3.11 -m venv``, ``pip install mergekit==0.1.5 torch==2.13.0 matplotlib``), or
from ``--mergekit-python``. Results go to ``bench/out/``: JSON, a markdown table and a PNG when
matplotlib is in that venv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
MERGEKIT_VENV = HERE / ".venv-mergekit"
MERGEKIT_PINS = ["mergekit==0.1.5", "torch==2.13.0", "matplotlib"]

SIZES = {
    # ~119M parameters in the decoder layers' linear weights + a 32k vocabulary
    "119m": dict(model_type="llama", hidden_size=1024, intermediate_size=2816,
                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                 vocab_size=32000, tie_word_embeddings=False),
    # codegemma-2b-like
    "2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384,
               num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
               vocab_size=256000, tie_word_embeddings=True),
    # for a quick try of the script itself
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                 tie_word_embeddings=False),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- models

def build_models(work: Path, size: str, rank: int, dtype_name: str, noise: float,
                 seed: int, device: str) -> tuple[Path, Path]:
    """base/ and merged/ under ``work`` (kept between runs when the recipe is unchanged)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = dict(size=size, rank=rank, dtype=dtype_name, noise=noise, seed=seed, v=1)
    base_dir, merged_dir = work / "base", work / "merged"
    stamp = work / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return base_dir, merged_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    params = dict(SIZES[size])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    dtype = getattr(torch, dtype_name)
    gen_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(seed)
    base, merged = {}, {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w0 = torch.ones(shape, device=gen_device)
        else:
            w0 = torch.randn(shape, generator=g, device=gen_device) * 0.02
        w = w0
        leaf = name.split(".")[-2]
        if leaf in LINEAR and name.endswith(".weight"):
            out_f, in_f = shape
            a = torch.randn(rank, in_f, generator=g, device=gen_device) / math.sqrt(in_f)
            b = torch.randn(out_f, rank, generator=g, device=gen_device) * 0.01
            delta = b @ a
            if noise:
                rms = float(delta.pow(2).mean().sqrt())
                delta += torch.randn(shape, generator=g, device=gen_device) * (noise * rms)
            w = w0 + delta
        base[name] = w0.to(dtype).cpu().contiguous()
        merged[name] = w.to(dtype).cpu().contiguous()
    for d, tensors in ((base_dir, base), (merged_dir, merged)):
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(d)
    stamp.write_text(json.dumps(recipe))
    return base_dir, merged_dir


# ----------------------------------------------------------------------------- tools

def ensure_mergekit(python: str | None) -> str:
    """The Python that has mergekit: the given one, or the bench venv (made when missing)."""
    if python:
        return python
    exe = MERGEKIT_VENV / "bin" / "python"
    if not (MERGEKIT_VENV / "bin" / "mergekit-extract-lora").exists():
        print(f"creating {MERGEKIT_VENV} ({' '.join(MERGEKIT_PINS)})", file=sys.stderr)
        subprocess.run(["python3.11", "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", *MERGEKIT_PINS], check=True)
    return str(exe)


# Runs one command and reports its wall time and rusage. It is a small process of its own:
# a child started straight from this (large) process would inherit its peak RSS at exec.
LAUNCHER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
json.dump({"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "rc": rc,
           "cpu_s": usage.ru_utime + usage.ru_stime,
           "tail": out.decode(errors="replace")[-4000:] if rc else ""}, open(sys.argv[1], "w"))
"""


def run_timed(cmd: list[str], env: dict, scratch: Path) -> dict:
    """Run ``cmd`` once: wall seconds, CPU seconds and the peak RSS of that process alone."""
    report = scratch / "run.json"
    subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *cmd], env=env, check=True)
    result = json.loads(report.read_text())
    if result.pop("rc") != 0:
        sys.stderr.write(result["tail"])
        raise SystemExit(f"{cmd[0]} failed")
    result.pop("tail")
    return result


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- accuracy

def adapter_errors(base_dir: Path, merged_dir: Path, adapter_dir: Path, device: str,
                   with_exact: bool) -> dict[str, dict]:
    """Per linear module: ‖D − scale·B·A‖_F / ‖D‖_F for this adapter (and the exact SVD's)."""
    import torch
    from safetensors import safe_open

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def pattern(patterns, module, default):
        for key, value in patterns.items():
            if module == key or module.endswith("." + key):
                return value
        return default

    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    errors = {}
    with safe_open(str(base_dir / "model.safetensors"), "pt") as fb, \
            safe_open(str(merged_dir / "model.safetensors"), "pt") as fm, \
            safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fa:
        keys = set(fa.keys())
        for name in fm.keys():
            module = name.rsplit(".", 1)[0]
            if module.split(".")[-1] not in LINEAR or not name.endswith(".weight"):
                continue
            d = fm.get_tensor(name).to(dev, torch.float32) - fb.get_tensor(name).to(dev, torch.float32)
            ka = f"base_model.model.{module}.lora_A.weight"
            kb = f"base_model.model.{module}.lora_B.weight"
            norm = float(torch.linalg.vector_norm(d.double()))
            if ka in keys:
                a = fa.get_tensor(ka).to(dev, torch.float32)
                b = fa.get_tensor(kb).to(dev, torch.float32)
                r = pattern(rank_pattern, module, r0)
                scale = pattern(alpha_pattern, module, alpha0) / r
                err = float(torch.linalg.vector_norm((d - scale * (b @ a)).double())) / norm
            else:
                err = 1.0
            row = {"rel_error": err}
            if with_exact:
                s = torch.linalg.svdvals(d.double()).cpu()
                rk = a.shape[0] if ka in keys else 0
                row["exact_rel_error"] = math.sqrt(float((s[rk:] ** 2).sum())) / norm
            errors[module] = row
    return errors


# ----------------------------------------------------------------------------- report

# The floor: a process that only starts torch (and CUDA) and reads every tensor of both models
# onto the device once, with as many reader threads as ckpt-tools uses; no arithmetic, no output.
FLOOR = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import torch
from safetensors import safe_open
dev = torch.device(sys.argv[3])
if dev.type == "cuda":
    torch.empty(1, device=dev)
    torch.cuda.synchronize()
t1 = time.perf_counter()
files = [safe_open(p, "pt", device="cpu") for p in sys.argv[1:3]]
keys = list(files[0].keys())
def read(key):
    n = 0
    for f in files:
        t = f.get_tensor(key).to(dev)
        n += t.numel() * t.element_size()
    return n
workers = int(sys.argv[4])
with ThreadPoolExecutor(max_workers=workers) as pool:
    total = sum(pool.map(read, keys))
if dev.type == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"start_s": t1 - t0, "read_s": t2 - t1, "bytes": total, "workers": workers}))
"""


def summarize(samples: list[dict]) -> dict:
    walls = [s["wall_s"] for s in samples]
    return {"wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
            "wall_s_max": max(walls), "wall_s": walls,
            "peak_rss_mb_median": statistics.median(s["peak_rss_mb"] for s in samples),
            "cpu_s_median": statistics.median(s["cpu_s"] for s in samples)}


def markdown(result: dict) -> str:
    ck, mk = result["ckpt_tools"], result["mergekit"]
    err_ratio = result["error_ratio"]
    lines = [
        f"# Low-rank extraction: ckpt-tools vs mergekit-extract-lora {result['mergekit_version']}",
        "",
        f"Model: `{result['size']}` ({result['params_m']:.0f}M parameters, "
        f"{result['linear_modules']} linear modules, {result['dtype']}), rank {result['rank']}, "
        f"noise {result['noise']}; device `{result['device']}`; {result['reps']} alternating "
        f"whole-process runs each; {result['machine']}.",
        "",
        "| | ckpt-tools | mergekit | ratio (ckpt-tools / mergekit) |",
        "|---|---:|---:|---:|",
        f"| wall time, median [min–max] (s) | {ck['wall_s_median']:.2f} "
        f"[{ck['wall_s_min']:.2f}–{ck['wall_s_max']:.2f}] | {mk['wall_s_median']:.2f} "
        f"[{mk['wall_s_min']:.2f}–{mk['wall_s_max']:.2f}] | "
        f"{ck['wall_s_median'] / mk['wall_s_median']:.3f} "
        f"({mk['wall_s_median'] / ck['wall_s_median']:.1f}× faster) |",
        f"| CPU time, median (s) | {ck['cpu_s_median']:.2f} | {mk['cpu_s_median']:.2f} | "
        f"{ck['cpu_s_median'] / mk['cpu_s_median']:.3f} |",
        f"| peak RSS, median (MB) | {ck['peak_rss_mb_median']:.0f} | "
        f"{mk['peak_rss_mb_median']:.0f} | "
        f"{ck['peak_rss_mb_median'] / mk['peak_rss_mb_median']:.3f} |",
        f"| adapter size (MB) | {ck['adapter_bytes'] / 1e6:.1f} | {mk['adapter_bytes'] / 1e6:.1f} "
        f"| {ck['adapter_bytes'] / mk['adapter_bytes']:.3f} |",
        f"| max per-module relative error | {ck['max_rel_error']:.6g} | {mk['max_rel_error']:.6g} "
        f"| {ck['max_rel_error'] / mk['max_rel_error']:.5f} |",
        f"| per-module error ratio, max / median / min | | | {err_ratio['max']:.5f} / "
        f"{err_ratio['median']:.5f} / {err_ratio['min']:.5f} |",
    ]
    if "vs_exact_max" in err_ratio:
        lines.append(f"| per-module error / exact SVD's, max | {err_ratio['vs_exact_max']:.5f} | "
                     f"{err_ratio['mergekit_vs_exact_max']:.5f} | |")
    fl = result.get("floor")
    if fl:
        inner, timings = fl["inner"], ck["internal_timings"]
        lines += [
            "", "Against the floor (a process that only starts torch and reads both models once "
            f"onto `{result['device']}`, {inner['workers']} reader threads, "
            f"{inner['bytes'] / 1e9:.2f} GB):", "",
            "| | ckpt-tools | floor | ratio (ckpt-tools / floor) |",
            "|---|---:|---:|---:|",
            f"| whole process, median [min–max] (s) | {ck['wall_s_median']:.2f} | "
            f"{fl['wall_s_median']:.2f} [{fl['wall_s_min']:.2f}–{fl['wall_s_max']:.2f}] | "
            f"{ck['wall_s_median'] / fl['wall_s_median']:.2f} |",
            f"| the work itself (s): extraction vs reading | {timings['total_s']:.2f} | "
            f"{inner['read_s']:.2f} | {timings['total_s'] / inner['read_s']:.2f} |",
            f"| start-up: interpreter, torch{', CUDA' if result['device'] == 'cuda' else ''} (s) | "
            f"| {inner['start_s']:.2f} | |",
        ]
    lines += ["", f"ckpt-tools exact-SVD fallbacks: {result.get('ckpt_fallbacks', 'n/a')}.", "",
              "Reproduce: `" + result["command"] + "`", ""]
    return "\n".join(lines)


CHART = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
names = ["ckpt-tools", "mergekit"]
ck, mk = r["ckpt_tools"], r["mergekit"]
axes[0].bar(names, [ck["wall_s_median"], mk["wall_s_median"]], color=["tab:green", "tab:gray"],
            yerr=[[ck["wall_s_median"] - ck["wall_s_min"], mk["wall_s_median"] - mk["wall_s_min"]],
                  [ck["wall_s_max"] - ck["wall_s_median"], mk["wall_s_max"] - mk["wall_s_median"]]])
axes[0].set_ylabel("wall time (s), median, min-max")
axes[1].bar(names, [ck["peak_rss_mb_median"], mk["peak_rss_mb_median"]],
            color=["tab:green", "tab:gray"])
axes[1].set_ylabel("peak RSS (MB)")
ratios = sorted(r["per_module_error_ratio"].values())
axes[2].plot(range(len(ratios)), ratios, ".", color="tab:green")
axes[2].axhline(1.01, color="tab:red", lw=0.8, ls="--", label="1.01")
axes[2].set_ylabel("error ratio ckpt-tools / mergekit")
axes[2].set_xlabel("module (sorted)")
axes[2].legend()
fig.suptitle(f"{r['size']} rank {r['rank']} on {r['device']}")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="119m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default=None, help="float32 (119m default) or bfloat16 (2b default)")
    p.add_argument("--noise", type=float, default=0.02,
                   help="Gaussian noise added to each delta, relative to its RMS")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="where models and adapters go")
    p.add_argument("--mergekit-python", default=None,
                   help="a Python with mergekit installed (default: bench/.venv-mergekit)")
    p.add_argument("--exact", action="store_true", help="also compute each module's exact SVD error")
    p.add_argument("--label", default="", help="suffix for the output file names")
    p.add_argument("--out-dir", type=Path, default=OUT, help="where the results go")
    p.add_argument("--floor", action="store_true",
                   help="also time a process that only reads both models onto the device")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed first run of each tool (the models were just written, "
                        "so they are in the page cache already)")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.size == "2b" else "float32")
    work = args.work or OUT / f"lowrank-work-{args.size}-{dtype}"
    work.mkdir(parents=True, exist_ok=True)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lowrank_vs_mergekit-{args.size}-{args.device}{('-' + args.label) if args.label else ''}"
    partial = out_dir / f"{stem}.samples.json"

    mergekit_py = ensure_mergekit(args.mergekit_python)
    t0 = time.perf_counter()
    base_dir, merged_dir = build_models(work, args.size, args.rank, dtype, args.noise, args.seed,
                                        args.device)
    print(f"models ready in {time.perf_counter() - t0:.1f} s: {base_dir}, {merged_dir}",
          file=sys.stderr)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out_ck, out_mk = work / "adapter-ckpt-tools", work / "adapter-mergekit"
    ck_cmd = [sys.executable, "-m", "ckpt_tools.migrate.lowrank", str(base_dir), str(merged_dir),
              str(out_ck), "--rank", str(args.rank), "--device", args.device, "--json"]
    mk_cmd = [mergekit_py, "-m", "mergekit.scripts.extract_lora", "--model", str(merged_dir), "--base-model", str(base_dir),
              "--out-path", str(out_mk), "--max-rank", str(args.rank), "--no-copy-tokenizer",
              "--quiet"] + (["--cuda"] if args.device == "cuda" else [])
    floor_workers = min(8, os.cpu_count() or 1) if args.device == "cuda" else (os.cpu_count() or 1)
    floor_cmd = [sys.executable, "-c", FLOOR, str(base_dir / "model.safetensors"),
                 str(merged_dir / "model.safetensors"), args.device, str(floor_workers)]
    tools = {"ckpt_tools": ck_cmd, "mergekit": mk_cmd}
    if args.floor:
        tools["floor"] = floor_cmd
    samples: dict[str, list] = {k: [] for k in tools}
    if not args.no_warmup:
        for name, cmd in tools.items():      # warm the page cache and the imports, untimed
            run_timed(cmd, env, work)
    for rep in range(args.reps):
        order = list(tools) if rep % 2 == 0 else list(reversed(tools))
        for name in order:
            s = run_timed(tools[name], env, work)
            samples[name].append(s)
            print(f"rep {rep} {name}: {s['wall_s']:.2f} s, {s['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
            partial.write_text(json.dumps(samples, indent=1))  # survives a timeout

    floor_inner = None
    if args.floor:
        floor_inner = json.loads(subprocess.run(floor_cmd, env=env, capture_output=True, text=True,
                                                check=True).stdout)
    ck_json = subprocess.run(ck_cmd, env=env, capture_output=True, text=True, check=True).stdout
    ck_summary = json.loads(ck_json)
    ck_err = adapter_errors(base_dir, merged_dir, out_ck, args.device, args.exact)
    mk_err = adapter_errors(base_dir, merged_dir, out_mk, args.device, args.exact)
    ratios = {m: ck_err[m]["rel_error"] / mk_err[m]["rel_error"] for m in ck_err}
    err_ratio = {"max": max(ratios.values()), "median": statistics.median(ratios.values()),
                 "min": min(ratios.values())}
    if args.exact:
        err_ratio["vs_exact_max"] = max(v["rel_error"] / v["exact_rel_error"]
                                        for v in ck_err.values())
        err_ratio["mergekit_vs_exact_max"] = max(v["rel_error"] / v["exact_rel_error"]
                                                 for v in mk_err.values())
    import torch
    mk_version = subprocess.run([mergekit_py, "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    params = sum(math.prod(shape) for shape in _shapes(merged_dir))
    result = {
        "size": args.size, "rank": args.rank, "dtype": dtype, "noise": args.noise,
        "device": args.device, "reps": args.reps, "params_m": params / 1e6,
        "linear_modules": len(ck_err), "mergekit_version": mk_version,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}"
                   + (f", {torch.cuda.get_device_name()}" if args.device == "cuda"
                      and torch.cuda.is_available() else ""),
        "command": "python bench/lowrank_vs_mergekit.py " + " ".join(argv or sys.argv[1:]),
        "ckpt_tools": {**summarize(samples["ckpt_tools"]), "adapter_bytes": dir_bytes(out_ck),
                       "max_rel_error": max(v["rel_error"] for v in ck_err.values()),
                       "internal_timings": ck_summary["timings"]},
        "mergekit": {**summarize(samples["mergekit"]), "adapter_bytes": dir_bytes(out_mk),
                     "max_rel_error": max(v["rel_error"] for v in mk_err.values())},
        "ckpt_fallbacks": ck_summary["exact_fallbacks"],
        "floor": ({**summarize(samples["floor"]), "inner": floor_inner} if args.floor else None),
        "error_ratio": err_ratio,
        "per_module_error_ratio": ratios,
        "per_module": {m: {"ckpt_tools": ck_err[m], "mergekit": mk_err[m]} for m in ck_err},
    }
    json_path, md_path, png_path = (out_dir / f"{stem}.json", out_dir / f"{stem}.md",
                                    out_dir / f"{stem}.png")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    chart = subprocess.run([mergekit_py, "-c", CHART, str(json_path),
                            str(png_path)], capture_output=True, text=True)
    if chart.returncode != 0:
        print("no chart (matplotlib not available next to mergekit)", file=sys.stderr)
    print(md_path.read_text())
    return 0


def _shapes(model_dir: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return [tuple(f.get_slice(k).get_shape()) for k in f.keys()]


if __name__ == "__main__":
    sys.exit(main())
