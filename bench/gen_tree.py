"""Generate a large synthetic results tree for benchmarks: real file formats, cheap bytes.

Every checkpoint is canonical (4 experts, real safetensors adapters and torch.save
router/optimizer files); every third one also holds a Trainer-style merged
``model.safetensors`` whose data section is sparse (its header is real, its bytes are
holes), so the tree is as many files as a real one without gigabytes of writes.

    python bench/gen_tree.py DEST --checkpoints 3000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import time
from pathlib import Path

EXPERTS = 4
HIDDEN = 128
RANK = 8
LAYERS = 4
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
PER_RUN = 100


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], sparse_data: bool = False):
    """A valid safetensors file: header bytes and the data size (zeros)."""
    sizes = {"F32": 4, "BF16": 2}
    header = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def template() -> dict[str, bytes | tuple[bytes, int]]:
    """relpath → bytes (or (header, sparse data size)) for one checkpoint."""
    import torch
    files: dict[str, object] = {}
    lora = {}
    for layer in range(LAYERS):
        for m in MODULES:
            base = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            lora[f"{base}.lora_A.weight"] = ("F32", [RANK, HIDDEN])
            lora[f"{base}.lora_B.weight"] = ("F32", [HIDDEN, RANK])
    head, size = safetensors_bytes(lora)
    adapter = head + b"\0" * size
    cfg = json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.05,
                      "target_modules": list(MODULES), "base_model_name_or_path": "tiny",
                      "task_type": "CAUSAL_LM"}).encode()
    for e in range(EXPERTS):
        files[f"peft_adapters/expert_{e}/adapter_config.json"] = cfg
        files[f"peft_adapters/expert_{e}/adapter_model.safetensors"] = adapter
    buf = io.BytesIO()
    torch.save({"gate.weight": torch.zeros(EXPERTS, HIDDEN), "gate.bias": torch.zeros(EXPERTS)}, buf)
    files["dylo_moe_state/router.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({}, buf)
    files["dylo_moe_state/skill_library.pt"] = buf.getvalue()
    files["dylo_moe_state/config.json"] = json.dumps(
        {"num_experts": EXPERTS, "lora_r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.05,
         "base_model_name_or_path": "tiny"}).encode()
    files["config.json"] = json.dumps({"model_type": "dylora-moe", "checkpoint_type": "peft_only",
                                       "num_experts": EXPERTS}).encode()
    files["trainer_state.json"] = json.dumps({"global_step": 0, "log_history": []}).encode()
    buf = io.BytesIO()
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": [{"lr": 1e-4}]}, buf)
    files["optimizer.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"last_epoch": 1}, buf)
    files["scheduler.pt"] = buf.getvalue()
    files["rng_state.pth"] = buf.getvalue()
    files["training_args.bin"] = buf.getvalue()
    merged = {}
    for layer in range(LAYERS):
        for m in MODULES:
            merged[f"foundation_model.base_model.model.model.layers.{layer}.self_attn.{m}.base_layer.weight"] = ("BF16", [HIDDEN * 16, HIDDEN * 16])
            for e in range(EXPERTS):
                merged[f"foundation_model.base_model.model.model.layers.{layer}.self_attn.{m}.lora_A.expert_{e}.weight"] = ("F32", [RANK, HIDDEN])
    merged["router.gate.weight"] = ("F32", [EXPERTS, HIDDEN])
    files["model.safetensors"] = safetensors_bytes(merged)
    return files


def generate(dest: Path, checkpoints: int, mtime: float | None = None) -> dict:
    files = template()
    dest.mkdir(parents=True, exist_ok=True)
    mtime = mtime if mtime is not None else time.time() - 2 * 86400
    n_files = 0
    for i in range(checkpoints):
        run = dest / f"run_{i // PER_RUN:04d}"
        ckpt = run / f"checkpoint-{(i % PER_RUN + 1) * 100}"
        for rel, content in files.items():
            if rel == "model.safetensors" and i % 3:
                continue
            path = ckpt / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                if isinstance(content, tuple):
                    head, size = content
                    fh.write(head)
                    fh.truncate(len(head) + size)
                else:
                    fh.write(content)
            os.utime(path, (mtime, mtime))
            n_files += 1
    return {"checkpoints": checkpoints, "files": n_files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--checkpoints", type=int, default=3000)
    args = ap.parse_args(argv)
    if args.dest.exists() and any(args.dest.iterdir()):
        print(f"{args.dest}: not empty", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = generate(args.dest, args.checkpoints)
    print(f"{info['checkpoints']} checkpoints, {info['files']} files in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
