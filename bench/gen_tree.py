"""Generate a large synthetic results tree for benchmarks: real file formats, real LoRA bytes.

Every checkpoint is canonical (4 experts, real safetensors adapters and torch.save
router/optimizer files); every third one also holds a Trainer-style merged
``model.safetensors`` (V1 keys: each module's ``base_layer.weight`` and every expert's
``lora_A`` / ``lora_B``, the router's ``gate.weight`` / ``gate.bias``). The LoRA and router
tensors hold real, non-zero float32 values, distinct in every checkpoint, and those inside a
merged file are byte for byte its PEFT tree's, so a redundant checkpoint really is one and
prune's content proof has every byte to compare. Only the merged files' base weights are
sparse (their header is real, their bytes are holes), so the tree is as many files as a real
one without gigabytes of base weights.

    python bench/gen_tree.py DEST --checkpoints 3000

``--mix ordinary`` writes ordinary Trainer runs instead, in turn a PEFT LoRA adapter run
(``adapter_model.safetensors`` with real values, ``adapter_config.json``, the Trainer's
state), a full-model run (a ``model.safetensors`` of plain keys whose data are holes, the
model's ``config.json``) and a sharded full-model run (four shards and their index);
``--mix both`` alternates DyLoRA-MoE and ordinary runs.

``--evals`` gives each checkpoint the ``trainer_state.json`` the Trainer would have written at
its step (``global_step`` its step, a ``log_history`` with a training loss and an ``eval_loss``
every 100 steps so far, ``best_model_checkpoint`` / ``best_metric`` by eval_loss, the best
checkpoint under a training-time path the tree does not have), so that retention's
``--keep-best`` ranks by real metrics. Without it every trainer_state.json is the one
placeholder as before, byte for byte.
"""

from __future__ import annotations

import argparse
import io
import json
import math
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


def lora_names() -> list[tuple[str, str]]:
    """(module path, part) of every LoRA tensor of an adapter, in its file's order."""
    return [(f"model.layers.{layer}.self_attn.{m}", part)
            for layer in range(LAYERS) for m in MODULES for part in ("lora_A", "lora_B")]


TENSOR_BYTES = RANK * HIDDEN * 4            # one lora_A [r, hidden] or lora_B [hidden, r], F32
ADAPTER_BYTES = len(lora_names()) * TENSOR_BYTES
ROUTER_BYTES = (EXPERTS * HIDDEN + EXPERTS) * 4   # gate.weight [E, hidden], gate.bias [E], F32
VALUES_BYTES = EXPERTS * ADAPTER_BYTES + ROUTER_BYTES
_SPREAD = 1 << 20      # the values of checkpoint i start at byte (i * 4 * 7919) mod this of a pool


def values_pool() -> bytes:
    """Random normal float32 bytes (seeded): every checkpoint takes a window of its own."""
    import torch
    gen = torch.Generator().manual_seed(1234)
    pool = torch.randn((VALUES_BYTES + _SPREAD) // 4, generator=gen)
    return pool.numpy().tobytes()


def checkpoint_values(pool: bytes, i: int) -> bytes:
    """The LoRA and router bytes of checkpoint ``i``: experts' adapter data sections, then the
    router's gate.weight and gate.bias. 7919 is odd, so windows differ up to 2**18 checkpoints."""
    at = (i * 4 * 7919) % _SPREAD
    return pool[at:at + VALUES_BYTES]


def template(base_side: int = HIDDEN * 16) -> dict[str, object]:
    """relpath → bytes for one checkpoint, with the headers and offsets of the files whose
    data differ per checkpoint under the keys ``adapter_header``, ``merged`` (its header, data
    size and the offset of each block of LoRA tensors) and ``merged_router`` (offset). Each
    base weight of the merged file is ``base_side`` square (BF16)."""
    import torch
    files: dict[str, object] = {}
    lora = {}
    for module, part in lora_names():
        shape = [RANK, HIDDEN] if part == "lora_A" else [HIDDEN, RANK]
        lora[f"base_model.model.{module}.{part}.weight"] = ("F32", shape)
    head, size = safetensors_bytes(lora)
    assert size == ADAPTER_BYTES
    files["adapter_header"] = head
    cfg = json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.05,
                      "target_modules": list(MODULES), "base_model_name_or_path": "tiny",
                      "task_type": "CAUSAL_LM"}).encode()
    for e in range(EXPERTS):
        files[f"peft_adapters/expert_{e}/adapter_config.json"] = cfg
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
    # per module: its base weight (a hole), then lora_A of every expert, then lora_B of every expert
    merged = {}
    prefix = "foundation_model.base_model.model."
    modules = list(dict.fromkeys(m for m, _ in lora_names()))
    for module in modules:
        merged[f"{prefix}{module}.base_layer.weight"] = ("BF16", [base_side, base_side])
        for part in ("lora_A", "lora_B"):
            shape = [RANK, HIDDEN] if part == "lora_A" else [HIDDEN, RANK]
            for e in range(EXPERTS):
                merged[f"{prefix}{module}.{part}.expert_{e}.weight"] = ("F32", shape)
    merged["router.gate.weight"] = ("F32", [EXPERTS, HIDDEN])
    merged["router.gate.bias"] = ("F32", [EXPERTS])
    head, size = safetensors_bytes(merged)
    offsets = json.loads(head[8:])
    blocks = [len(head) + offsets[f"{prefix}{m}.lora_A.expert_0.weight"]["data_offsets"][0]
              for m in modules]
    files["merged"] = (head, size, blocks)
    files["merged_router"] = len(head) + offsets["router.gate.weight"]["data_offsets"][0]
    return files


def router_bytes(values: bytes) -> bytes:
    import torch
    raw = bytearray(values[EXPERTS * ADAPTER_BYTES:])
    weight = torch.frombuffer(raw, dtype=torch.float32, count=EXPERTS * HIDDEN).view(EXPERTS, HIDDEN)
    bias = torch.frombuffer(raw, dtype=torch.float32, offset=EXPERTS * HIDDEN * 4)
    buf = io.BytesIO()
    torch.save({"gate.weight": weight.clone(), "gate.bias": bias.clone()}, buf)
    return buf.getvalue()


def merged_blocks(values: bytes) -> list[bytes]:
    """Each module's LoRA block of the merged file: lora_A of experts 0..E-1, then lora_B."""
    out = []
    for k in range(len(lora_names()) // 2):     # module k: its lora_A, lora_B in each adapter
        a = [values[e * ADAPTER_BYTES + 2 * k * TENSOR_BYTES:][:TENSOR_BYTES] for e in range(EXPERTS)]
        b = [values[e * ADAPTER_BYTES + (2 * k + 1) * TENSOR_BYTES:][:TENSOR_BYTES]
             for e in range(EXPERTS)]
        out.append(b"".join(a + b))
    return out


def run_trainer_states(run_index: int, count: int = PER_RUN) -> list[bytes]:
    """The trainer_state.json of each checkpoint of run ``run_index`` (step 100, 200, ...), as
    the Trainer writes it (indent 2, sorted keys): each repeats the log history so far, and the
    eval_loss curve falls, then rises (overfitting), with noise of its own per run, so the
    best checkpoint is seldom the newest. Deterministic: the same run gets the same bytes."""
    history: list[dict] = []
    best_loss, best_step = math.inf, None
    out = []
    for k in range(1, count + 1):
        step = k * 100
        epoch = round(step / (count * 100), 4)
        train_loss = round(1.4 + 2.6 * math.exp(-k / 20) + 0.05 * math.sin(0.9 * k + run_index), 4)
        # falls, then rises again as the run overfits: the best is near k = 70, not the newest
        eval_loss = round(1.5 + 2.5 * math.exp(-k / 15) + 0.0015 * k
                          + 0.03 * math.sin(1.3 * k + run_index), 4)
        history.append({"epoch": epoch, "grad_norm": round(0.8 + 0.1 * math.cos(k), 4),
                        "learning_rate": round(5e-5 * (1 - (k - 1) / count), 10),
                        "loss": train_loss, "step": step})
        history.append({"epoch": epoch, "eval_loss": eval_loss, "eval_runtime": 1.234,
                        "eval_samples_per_second": 81.04, "eval_steps_per_second": 10.13,
                        "step": step})
        if eval_loss < best_loss:
            best_loss, best_step = eval_loss, step
        state = {"best_global_step": best_step, "best_metric": best_loss,
                 "best_model_checkpoint": f"/scratch/train/run_{run_index:04d}/checkpoint-{best_step}",
                 "epoch": epoch, "eval_steps": 100, "global_step": step,
                 "is_hyper_param_search": False, "is_local_process_zero": True,
                 "is_world_process_zero": True, "log_history": list(history),
                 "logging_steps": 100, "max_steps": count * 100, "num_input_tokens_seen": 0,
                 "num_train_epochs": 1, "save_steps": 100, "stateful_callbacks": {},
                 "total_flos": 0.0, "train_batch_size": 8, "trial_name": None,
                 "trial_params": None}
        out.append((json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    return out


def _write(path: Path, data: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, (mtime, mtime))


MIXES = ("dylora", "ordinary", "both")
SHARDS = 4


def ordinary_template() -> dict[str, object]:
    """relpath → bytes of what every ordinary checkpoint holds, and the headers of its weights:
    ``adapter_header`` (one LoRA adapter, PEFT's keys), ``model`` (a plain model's header and
    data size) and ``shards`` ([(name, header, size)], with ``index`` their index's bytes)."""
    files = template()
    out: dict[str, object] = {rel: files[rel] for rel in (
        "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")}
    out["adapter_header"] = files["adapter_header"]
    out["adapter_config.json"] = files["peft_adapters/expert_0/adapter_config.json"]
    out["config.json"] = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                     "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}).encode()
    modules = list(dict.fromkeys(m for m, _ in lora_names()))
    plain = {f"{m}.weight": ("BF16", [HIDDEN * 16, HIDDEN * 16]) for m in modules}
    out["model"] = safetensors_bytes(plain)
    names = list(plain)
    shards, weight_map = [], {}
    for k in range(SHARDS):
        name = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {n: plain[n] for n in names[k::SHARDS]}
        shards.append((name, *safetensors_bytes(part)))
        weight_map.update(dict.fromkeys(part, name))
    out["shards"] = shards
    out["index"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return out


def _write_sparse(path: Path, head: bytes, size: int, mtime: float) -> None:
    """A safetensors file of ``head`` whose ``size`` data bytes are a hole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + size)
    os.utime(path, (mtime, mtime))


def _ordinary_checkpoint(ckpt: Path, kind: int, files: dict, values: bytes, mtime: float,
                         trainer_state: bytes | None = None) -> int:
    """Write one ordinary checkpoint (kind 0: adapter, 1: full model, 2: shards); its file count."""
    static = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
    for rel in static:
        data = trainer_state if rel == "trainer_state.json" and trainer_state is not None else files[rel]
        _write(ckpt / rel, data, mtime)
    if kind == 0:
        _write(ckpt / "adapter_config.json", files["adapter_config.json"], mtime)
        _write(ckpt / "adapter_model.safetensors", files["adapter_header"] + values[:ADAPTER_BYTES], mtime)
        return len(static) + 2
    _write(ckpt / "config.json", files["config.json"], mtime)
    if kind == 1:
        _write_sparse(ckpt / "model.safetensors", *files["model"], mtime)
        return len(static) + 2
    for name, head, size in files["shards"]:
        _write_sparse(ckpt / name, head, size, mtime)
    _write(ckpt / "model.safetensors.index.json", files["index"], mtime)
    return len(static) + 2 + SHARDS


def generate(dest: Path, checkpoints: int, mtime: float | None = None, mix: str = "dylora",
             evals: bool = False, base_side: int = HIDDEN * 16) -> dict:
    """``base_side`` sizes the merged files' base weights (128 MiB in all by default, as holes;
    an upload to a bucket writes every byte, so the bucket benchmark passes a smaller one)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}")
    files = template(base_side)
    ordinary = ordinary_template() if mix != "dylora" else None
    pool = values_pool()
    dest.mkdir(parents=True, exist_ok=True)
    mtime = mtime if mtime is not None else time.time() - 2 * 86400
    static = {rel: v for rel, v in files.items()
              if rel not in ("adapter_header", "merged", "merged_router")}
    n_files = 0
    states: list[bytes] = []
    for i in range(checkpoints):
        run = dest / f"run_{i // PER_RUN:04d}"
        ckpt = run / f"checkpoint-{(i % PER_RUN + 1) * 100}"
        values = checkpoint_values(pool, i)
        run_index = i // PER_RUN
        if evals and i % PER_RUN == 0:
            states = run_trainer_states(run_index)
        state = states[i % PER_RUN] if evals else None
        if mix == "ordinary" or (mix == "both" and run_index % 2 == 1):
            kind = run_index % 3 if mix == "ordinary" else (run_index // 2) % 3
            n_files += _ordinary_checkpoint(ckpt, kind, ordinary, values, mtime, state)
            continue
        for rel, content in static.items():
            _write(ckpt / rel, state if rel == "trainer_state.json" and state is not None else content,
                   mtime)
        for e in range(EXPERTS):
            _write(ckpt / f"peft_adapters/expert_{e}/adapter_model.safetensors",
                   files["adapter_header"] + values[e * ADAPTER_BYTES:(e + 1) * ADAPTER_BYTES], mtime)
        _write(ckpt / "dylo_moe_state/router.pt", router_bytes(values), mtime)
        n_files += len(static) + EXPERTS + 1
        if i % 3 == 0:
            head, size, blocks = files["merged"]
            path = ckpt / "model.safetensors"
            with open(path, "wb") as fh:
                fh.write(head)
                fh.truncate(len(head) + size)       # the base weights stay holes
                for at, block in zip(blocks, merged_blocks(values)):
                    os.pwrite(fh.fileno(), block, at)
                os.pwrite(fh.fileno(), values[EXPERTS * ADAPTER_BYTES:], files["merged_router"])
            os.utime(path, (mtime, mtime))
            n_files += 1
    return {"checkpoints": checkpoints, "files": n_files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--checkpoints", type=int, default=3000)
    ap.add_argument("--mix", choices=MIXES, default="dylora")
    ap.add_argument("--evals", action="store_true",
                    help="each checkpoint's trainer_state.json with its run's eval_loss history")
    args = ap.parse_args(argv)
    if args.dest.exists() and any(args.dest.iterdir()):
        print(f"{args.dest}: not empty", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = generate(args.dest, args.checkpoints, mix=args.mix, evals=args.evals)
    print(f"{info['checkpoints']} checkpoints, {info['files']} files in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
