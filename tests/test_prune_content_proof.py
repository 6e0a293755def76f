"""prune proves by content that a checkpoint's merged weights are redundant before deleting them.

The LoRA and router tensors inside the merged weights must equal the PEFT tree's, byte for
byte, with the same dtype and shape, in the plan and again right before the unlink; a PEFT
tree reached through a symlink out of the checkpoint proves nothing. Every test works on a
private copy of some runs of the session's fixture tree.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from test_prune import REPO, execute, plan_of, run_cli, set_mtime_ns, small_root, trainer_root  # noqa: F401

TRAINER = "run_trainer"
CK2 = f"{TRAINER}/checkpoint-2"
CK4 = f"{TRAINER}/checkpoint-4"
ADAPTER0 = "peft_adapters/expert_0/adapter_model.safetensors"


def header_of(path: Path) -> tuple[int, dict]:
    """(where the data section starts, the header) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8:8 + n])


def overwrite_keeping_mtime(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` in place: same inode, same size, same mtime."""
    st = os.lstat(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    assert os.lstat(path).st_size == st.st_size
    set_mtime_ns(path, st.st_mtime_ns)


def zero_tensor_data(path: Path) -> None:
    """Every tensor byte of a safetensors file set to zero; its header, size and mtime kept."""
    start, _ = header_of(path)
    overwrite_keeping_mtime(path, start, bytes(path.stat().st_size - start))


def prune_json(root: Path, *extra) -> tuple[int, dict, str]:
    proc = run_cli("prune", "--yes", "--json", "--no-progress", *extra, root)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def skip_reasons(doc: dict) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in doc["skipped"]}


def audit_status(root: Path, path: str) -> str:
    proc = run_cli("audit", "--json", root)
    return {c["path"]: c["status"] for c in json.loads(proc.stdout)["checkpoints"]}[path]


# ------------------------------------------------------------------ the red-team cases

def test_zeroed_adapter_bytes_keep_the_merged_weights(results_tree, tmp_path):
    """Case 1: the adapter's header is intact, its tensors are zeros: the merged file is the only
    correct copy of expert 0's LoRA tensors."""
    root = small_root(results_tree, tmp_path, TRAINER)
    zero_tensor_data(root / CK4 / ADAPTER0)
    assert audit_status(root, CK4) == "redundant"      # audit stays structural

    code, doc, err = prune_json(root)
    assert code == 0, err
    assert (root / CK4 / "model.safetensors").exists()
    assert not (root / CK2 / "model.safetensors").exists()     # the healthy one is pruned
    assert [d["path"] for d in doc["deleted"]] == [f"{CK2}/model.safetensors"]
    reason = skip_reasons(doc)[CK4]
    assert reason.startswith("merged weights differ from the PEFT tree: expert_0 ")
    assert "lora_A.weight" in reason and ADAPTER0 in reason
    assert CK4 in err and "merged weights differ" in err      # said where cron mail shows it


def test_a_peft_tree_symlinked_to_another_checkpoint_proves_nothing(results_tree, tmp_path):
    """Case 2: checkpoint-4's adapters and router are symlinks (inside the root) to checkpoint-2's."""
    root = small_root(results_tree, tmp_path, TRAINER)
    ck4 = root / CK4
    linked = [f"peft_adapters/expert_{e}/adapter_model.safetensors" for e in range(3)]
    linked.append("dylo_moe_state/router.pt")
    for rel in linked:
        target = ck4 / rel
        mtime = os.lstat(target).st_mtime_ns
        target.unlink()
        os.symlink(os.path.relpath(root / CK2 / rel, target.parent), target)
        set_mtime_ns(target, mtime)                       # not young: only the proof can tell
    assert audit_status(root, CK4) == "redundant"

    code, doc, err = prune_json(root)
    assert code == 0, err
    assert (ck4 / "model.safetensors").exists()
    assert not (root / CK2 / "model.safetensors").exists()
    reason = skip_reasons(doc)[CK4]
    assert "symlink" in reason and "outside this checkpoint" in reason, reason


# ------------------------------------------------------------------ between plan and execute

def flip_first_tensor_byte(path: Path, name: str) -> None:
    """One byte of tensor ``name`` of a safetensors file changed in place; size and mtime kept."""
    start, header = header_of(path)
    at = start + header[name]["data_offsets"][0]
    with open(path, "rb") as fh:
        fh.seek(at)
        old = fh.read(1)
    overwrite_keeping_mtime(path, at, bytes([old[0] ^ 0x40]))


def test_a_byte_changed_between_plan_and_execute_is_refused_at_the_unlink(trainer_root):
    root, _, now = trainer_root
    plan = plan_of(root, now)
    assert {d.path for d in plan.deletions} == {f"{CK2}/model.safetensors", f"{CK4}/model.safetensors"}
    adapter = root / CK4 / "peft_adapters/expert_2/adapter_model.safetensors"
    flip_first_tensor_byte(adapter, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    result = execute(plan)
    assert (root / CK4 / "model.safetensors").exists()
    assert [d.path for d in result.deleted] == [f"{CK2}/model.safetensors"]
    assert [s.path for s in result.changed] == [f"{CK4}/model.safetensors"]
    assert result.changed[0].reason == (
        "no longer proven redundant: merged weights differ from the PEFT tree: expert_2 "
        "model.layers.1.self_attn.v_proj.lora_B.weight "
        "(peft_adapters/expert_2/adapter_model.safetensors)")
    assert not result.ok


# ------------------------------------------------------------------ what the proof compares

def test_a_router_that_differs_from_the_merged_router_keeps_the_merged_weights(results_tree, tmp_path):
    from ckpt_tools.tensor_bytes import locate_torch

    root = small_root(results_tree, tmp_path, TRAINER)
    router = root / CK4 / "dylo_moe_state/router.pt"
    loc = locate_torch(str(router))["gate.weight"]
    overwrite_keeping_mtime(router, loc.offset + 4, b"\x01\x02\x03\x04")   # torch.save data, not its pickle
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert (root / CK4 / "model.safetensors").exists()
    assert [d["path"] for d in doc["deleted"]] == [f"{CK2}/model.safetensors"]
    assert skip_reasons(doc)[CK4] == ("merged weights differ from the PEFT tree: router gate.weight "
                                      "(dylo_moe_state/router.pt)")


def test_a_dtype_that_differs_from_the_merged_tensor_keeps_the_merged_weights(results_tree, tmp_path):
    """The same bytes declared I32 in the adapter, F32 in the merged weights: not the same tensor."""
    root = small_root(results_tree, tmp_path, TRAINER)
    adapter = root / CK4 / ADAPTER0
    st = os.lstat(adapter)
    raw = adapter.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    overwrite_keeping_mtime(adapter, 8, text)
    assert os.lstat(adapter).st_ino == st.st_ino
    assert audit_status(root, CK4) == "redundant"
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert (root / CK4 / "model.safetensors").exists()
    assert skip_reasons(doc)[CK4] == (
        "merged weights differ from the PEFT tree: expert_0 model.layers.1.self_attn.q_proj.lora_B.weight "
        f"({ADAPTER0}): dtype float32 in model.safetensors, int32 in {ADAPTER0}")


def test_a_tensor_that_is_no_plain_slice_of_its_file_is_not_proven(results_tree, tmp_path):
    """A v3 expert file whose lora_A is stored transposed (same values, other strides)."""
    import torch

    root = small_root(results_tree, tmp_path, "seed_v3")
    ck = root / "seed_v3/checkpoint-100"
    flat = ck / "peft_adapters/expert_1.pt"
    mtime = os.lstat(flat).st_mtime_ns
    state = torch.load(flat, weights_only=True)
    key = next(k for k in state if ".lora_A." in k)
    state[key] = state[key].T.contiguous().T           # equal values, column-major storage
    assert not state[key].is_contiguous()
    torch.save(state, flat)
    set_mtime_ns(flat, mtime)
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert (ck / "model.safetensors").exists()
    reason = skip_reasons(doc)["seed_v3/checkpoint-100"]
    assert reason.startswith("merged weights not proven redundant: expert_1 ")
    assert "not a plain contiguous slice of peft_adapters/expert_1.pt" in reason


def test_a_v3_checkpoint_whose_expert_files_match_is_pruned(results_tree, tmp_path):
    """The flat expert_<i>.pt form and V2's legacy router dict are compared too."""
    root = small_root(results_tree, tmp_path, "seed_v3")
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert [d["path"] for d in doc["deleted"]] == ["seed_v3/checkpoint-100/model.safetensors"]


def test_a_merged_export_beside_the_peft_tree_is_not_redundant(results_tree, tmp_path):
    """merged weights with plain Hugging Face keys, no LoRA tensor: nothing to prove the tree by."""
    root = small_root(results_tree, tmp_path, TRAINER, "merged_hf")
    export = root / "merged_hf/merged_model/model.safetensors"
    target = root / CK4 / "model.safetensors"
    mtime = os.lstat(target).st_mtime_ns
    target.write_bytes(export.read_bytes())
    set_mtime_ns(target, mtime)
    audit = json.loads(run_cli("audit", "--json", root).stdout)
    entry = {c["path"]: c for c in audit["checkpoints"]}[CK4]
    assert entry["status"] == "healthy" and entry["reclaimable_bytes"] == 0
    assert [(p["code"], p["severity"], p["path"]) for p in entry["problems"]] == [
        ("merged-export", "warning", f"{CK4}/model.safetensors")]
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert target.exists()
    assert [d["path"] for d in doc["deleted"]] == [f"{CK2}/model.safetensors"]
    assert "merged export" in skip_reasons(doc)[CK4]


def split_into_shards(ck: Path) -> list[str]:
    """model.safetensors rewritten as two shards and their index, as save_pretrained shards it."""
    from safetensors.torch import load_file, save_file

    merged = ck / "model.safetensors"
    mtime = os.lstat(merged).st_mtime_ns
    tensors = load_file(merged)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ck / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = ck / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    merged.unlink()
    for name in [*shards, index.name]:
        set_mtime_ns(ck / name, mtime)
    return sorted([*shards, index.name])


def test_sharded_merged_weights_whose_lora_tensors_match_are_pruned(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, TRAINER)
    files = split_into_shards(root / CK4)
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert sorted(d["path"] for d in doc["deleted"]) == sorted(
        [f"{CK2}/model.safetensors"] + [f"{CK4}/{f}" for f in files])
    assert not any((root / CK4 / f).exists() for f in files)


def test_sharded_merged_weights_with_one_lora_tensor_changed_are_kept(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, TRAINER)
    files = split_into_shards(root / CK4)
    shard = root / CK4 / "model-00002-of-00002.safetensors"
    _, header = header_of(shard)
    name = next(k for k in sorted(header) if ".lora_B.expert_1." in k)
    flip_first_tensor_byte(shard, name)
    code, doc, err = prune_json(root)
    assert code == 0, err
    assert all((root / CK4 / f).exists() for f in files)
    assert skip_reasons(doc)[CK4].startswith("merged weights differ from the PEFT tree: expert_1 ")


# ------------------------------------------------------------------ the v2 weak spot

def test_v2_with_a_config_that_records_no_hyperparameters_is_legacy(results_tree, tmp_path):
    """expert_<i>.pt files do not record lora_alpha: a root config.json must, or the merged
    weights are the only record of it."""
    root = small_root(results_tree, tmp_path, "hybrid_v2")
    ck = root / "hybrid_v2/checkpoint-100"
    config = ck / "config.json"
    mtime = os.lstat(ck / "model.safetensors").st_mtime_ns
    minimal = {"model_type": "dylora-moe", "checkpoint_type": "peft_only", "num_experts": 3}
    config.write_text(json.dumps(minimal))
    set_mtime_ns(config, mtime)
    audit = json.loads(run_cli("audit", "--json", root).stdout)
    (entry,) = audit["checkpoints"]
    assert entry["status"] == "legacy" and entry["reclaimable_bytes"] == 0
    assert "bad-config" in {p["code"] for p in entry["problems"]}
    code, doc, err = prune_json(root)
    assert code == 0 and doc["deleted"] == [] and (ck / "model.safetensors").exists()

    config.write_text(json.dumps(minimal | {"lora_r": 4, "lora_alpha": 16}))   # now it does
    set_mtime_ns(config, mtime)
    assert audit_status(root, "hybrid_v2/checkpoint-100") == "redundant"


# ------------------------------------------------------------------ validate --deep, torch

def test_validate_deep_reports_merged_weights_that_differ(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, TRAINER)
    zero_tensor_data(root / CK4 / ADAPTER0)
    proc = run_cli("validate", "--deep", "--json", root / CK4, root / CK2)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    codes = {Path(c["root"]).name: {p["code"] for p in c["problems"]} for c in doc["checkpoints"]}
    assert codes == {"checkpoint-4": {"merged-mismatch"}, "checkpoint-2": set()}, codes


def test_prune_never_imports_torch(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, TRAINER, "seed_v3")
    guard = tmp_path / "guard"
    guard.mkdir()
    for mod in ("torch", "transformers", "peft", "numpy", "safetensors"):
        (guard / f"{mod}.py").write_text(f"raise ImportError('{mod} must not be imported here')\n")
    env = dict(os.environ, PYTHONPATH=f"{guard}{os.pathsep}{REPO}")
    proc = run_cli("prune", "--yes", "--json", "--jobs", "1", root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "must not be imported" not in proc.stderr
    assert {d["path"] for d in json.loads(proc.stdout)["deleted"]} == {
        f"{CK2}/model.safetensors", f"{CK4}/model.safetensors", "seed_v3/checkpoint-100/model.safetensors"}


# ------------------------------------------------------------------ one mapping of key forms

def test_v0_v1_and_peft_keys_of_one_lora_tensor_share_one_canonical_name():
    from ckpt_tools.tensor_bytes import TensorLocation, group_moe_lora, group_peft_lora

    def loc(key):
        return TensorLocation("f", key, "float32", (4, 32), None, 0, 512)

    module = "model.layers.0.self_attn.q_proj"
    v1 = f"foundation_model.base_model.model.{module}.lora_A.expert_2.weight"
    v0 = f"foundation_model.{module}.lora_A.expert_2.weight"
    flat = f"base_model.model.{module}.lora_A.expert_2.weight"
    peft = f"base_model.model.{module}.lora_A.weight"
    names = {k: set(group_moe_lora({k: loc(k)})[2]) for k in (v1, v0, flat)}
    assert names[v1] == names[v0] == names[flat] == set(group_peft_lora({peft: loc(peft)}))


def test_long_tensors_are_compared_piece_by_piece_in_bounded_reads(results_tree, tmp_path, monkeypatch):
    """Reads of at most 200 bytes, batches of at most 1000: the proof holds little memory and
    still finds the one byte that differs, at the end of a tensor, and names that tensor."""
    import ckpt_tools.prune.proof as content_proof
    from ckpt_tools import scan

    monkeypatch.setattr(content_proof, "_BLOCK", 200)
    monkeypatch.setattr(content_proof, "_GAP", 0)
    monkeypatch.setattr(content_proof, "_BATCH", 1000)
    root = small_root(results_tree, tmp_path, TRAINER)
    adapter = root / CK4 / "peft_adapters/expert_1/adapter_model.safetensors"
    start, header = header_of(adapter)
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    last = start + header[name]["data_offsets"][1] - 1
    overwrite_keeping_mtime(adapter, last, bytes([adapter.read_bytes()[last] ^ 0x01]))
    sizes = []
    real_read = content_proof._File.read

    def read(self, offset, nbytes):
        sizes.append(nbytes)
        return real_read(self, offset, nbytes)

    monkeypatch.setattr(content_proof._File, "read", read)
    proof = content_proof.ContentProof()
    found = {c.path: proof(c) for c in scan(str(root), min_age_s=0).checkpoints}
    assert found == {CK2: None, CK4: "merged weights differ from the PEFT tree: expert_1 "
                     "model.layers.1.self_attn.q_proj.lora_B.weight "
                     "(peft_adapters/expert_1/adapter_model.safetensors)"}
    assert sizes and max(sizes) <= 200     # the fixture's tensors are 512 bytes


def test_a_proof_that_breaks_plans_nothing_for_its_checkpoint(results_tree, tmp_path):
    from ckpt_tools.prune import ContentProof

    _, _, now = results_tree
    root = small_root(results_tree, tmp_path, TRAINER)
    real = ContentProof()

    def prove(c):
        if c.path == CK4:
            raise KeyError("a bug")
        return real(c)

    from ckpt_tools import plan_prune, scan
    plan = plan_prune(scan(str(root), now=now).checkpoints, prove=prove)
    assert [d.path for d in plan.deletions] == [f"{CK2}/model.safetensors"]
    assert [(s.path, s.reason) for s in plan.skipped] == [
        (CK4, "merged weights not proven redundant: KeyError: 'a bug'")]
