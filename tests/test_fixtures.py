"""The fixture tree is what its manifest says it is: checked on disk with the libraries that wrote it."""

from __future__ import annotations

import json
import os
import pickletools
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from fixtures import LAYOUTS, STATUSES, Manifest
from fixtures.__main__ import main as fixtures_main
from fixtures.dylora import build_base, expert_name

DOCUMENTED_CODES = frozenset({
    "missing-file", "truncated", "bad-header", "bad-json", "bad-archive", "unsafe-pickle", "shape-mismatch",
    "rank-mismatch", "expert-missing", "expert-count-mismatch", "target-mismatch", "dtype-unknown",
    "nan-or-inf", "permission-denied", "symlink-escape",
})
OLD_S = 2 * 24 * 3600
YOUNG_S = 60


@pytest.fixture(scope="module")
def tree(results_tree):
    root, manifest, now = results_tree
    return root, manifest, now


# ----------------------------------------------------------------------------- helpers

def st_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def merged_keys(root: Path, files: tuple[str, ...]) -> dict[str, tuple]:
    """Every tensor name of a checkpoint's merged files -> shape (index files resolve to their shards)."""
    keys: dict[str, tuple] = {}
    for rel in files:
        path = root / rel
        if path.name.endswith(".index.json"):
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    keys[k] = tuple(f.get_slice(k).get_shape())
        else:
            sd = torch.load(path, weights_only=True, mmap=True)
            keys.update({k: tuple(v.shape) for k, v in sd.items()})
    return keys


def load_merged(root: Path, files: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for rel in files:
        path = root / rel
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        elif not path.name.endswith(".json"):
            out.update(torch.load(path, weights_only=True, mmap=True))
    return out


def healthy(manifest: Manifest, *layouts: str):
    return [e for e in manifest.values() if e.layout in layouts and e.status != "broken"
            and "partial" not in e.flags and e.deep_status != "broken"]


# ----------------------------------------------------------------------------- coverage

def test_manifest_covers_every_layout_status_and_problem_code(tree):
    _, manifest, _ = tree
    # the ordinary Trainer layouts are fixtures.ordinary_runs' (tests/test_audit_ordinary.py); a plain
    # model directory marked DyLoRA-MoE (hf-merged) is built where it is tested (test_migrate_plain_models.py)
    ordinary = {"adapter", "adapters", "sharded", "deepspeed", "fsdp"}
    assert {e.layout for e in manifest.values()} >= set(LAYOUTS) - {"unknown", "hf-merged"} - ordinary
    assert {e.status for e in manifest.values()} == set(STATUSES)
    codes = set().union(*(e.problem_codes | e.deep_problem_codes for e in manifest.values()))
    assert codes == DOCUMENTED_CODES
    from ckpt_tools import problems

    assert DOCUMENTED_CODES <= set(problems.ALL_CODES)
    for code in DOCUMENTED_CODES:
        assert manifest.with_code(code), code
    assert any(" " in e.run for e in manifest.values())
    assert any(not e.run.isascii() for e in manifest.values())
    assert any(e.path.count("/") >= 3 for e in manifest.values())  # nested deeper than run/checkpoint


def test_manifest_json_round_trips(tree):
    _, manifest, _ = tree
    data = json.loads(manifest.to_json())
    assert set(data["checkpoints"]) == set(manifest)
    for rel, entry in data["checkpoints"].items():
        assert entry["status"] == manifest[rel].status and entry["layout"] == manifest[rel].layout


def test_expected_statuses_follow_the_layout_rules(tree):
    _, manifest, _ = tree
    expected = {"canonical": "healthy", "canonical+merged": "redundant", "v0": "legacy", "v1": "legacy",
                "v2": "legacy", "v3": "redundant", "v4": "healthy", "hf-merged": "legacy", "model": "healthy"}
    for e in manifest.values():
        if e.status in ("broken", "in-progress") or e.deep_status == "broken":
            continue
        if e.layout == "v5":
            assert e.status == ("redundant" if e.merged_files else "healthy")
        else:
            assert e.status == expected[e.layout], e.path
        assert bool(e.merged_files) == (e.status in ("redundant", "legacy") or e.layout == "model"), e.path
    for e in manifest.values():
        if e.name.startswith("tmp-checkpoint-"):
            assert e.status == "in-progress"
        if "young" in e.flags:   # complete (trainer_state.json names its step): judged by content
            assert e.status != "in-progress"


# ----------------------------------------------------------------------------- files on disk

def test_every_listed_path_exists_with_the_recorded_size(tree):
    root, manifest, _ = tree
    for e in manifest.values():
        assert (root / e.path).is_dir(), e.path
        assert sum((root / m).lstat().st_size for m in e.merged_files) == e.merged_bytes
        for m in e.merged_files:
            assert (root / m).is_file() and m.startswith(e.path + "/"), m
        for code, rel in e.problem_paths.items():
            if code != "expert-missing" and code != "missing-file":
                assert os.path.lexists(root / rel), rel
    assert manifest.base_model_dirs and all((d / "config.json").is_file() for d in manifest.base_model_dirs.values())
    for d in manifest.base_model_dirs.values():
        assert not d.is_relative_to(root)


def test_mtimes_are_relative_to_now(tree):
    root, manifest, now = tree
    young = {root / rel for rel in manifest.young_files}
    assert young
    for path in root.rglob("*"):
        mtime = path.lstat().st_mtime
        if path in young:
            assert mtime == pytest.approx(now - YOUNG_S, abs=1)
        else:
            assert mtime == pytest.approx(now - OLD_S, abs=1), path
    for rel in manifest.young_files:
        ckpt = next(e for e in manifest.values() if rel.startswith(e.path + "/"))
        assert "young" in ckpt.flags


def test_hard_links_share_an_inode(tree):
    root, manifest, _ = tree
    assert manifest.hardlinks
    for link, original in manifest.hardlinks:
        a, b = (root / link).stat(), (root / original).stat()
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink >= 2


# ----------------------------------------------------------------------------- merged weights

def test_v0_files_hold_raw_module_keys_with_tied_embeddings(tree):
    root, manifest, _ = tree
    entries = manifest.with_layout("v0")
    assert entries
    for e in entries:
        (rel,) = e.merged_files
        sd = torch.load(root / rel, weights_only=True, mmap=True)
        fm = [k for k in sd if not k.startswith("router.")]
        assert fm and all(k.startswith("foundation_model.model.") or k == "foundation_model.lm_head.weight"
                          for k in fm)
        assert not any(k.startswith("foundation_model.base_model.") for k in sd)
        assert {"router.gate.weight", "router.gate.bias"} <= set(sd)
        for i in range(e.num_experts):
            assert any(k.endswith(f".q_proj.lora_A.{expert_name(i)}.weight") for k in sd)
        assert any(k.endswith("q_proj.base_layer.weight") for k in sd)
        lm, emb = sd["foundation_model.lm_head.weight"], sd["foundation_model.model.embed_tokens.weight"]
        assert lm.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()


def test_v1_merged_files_hold_the_whole_moe_state_dict(tree):
    root, manifest, _ = tree
    entries = [e for e in manifest.values() if e.layout in ("v1", "v2", "v3", "canonical+merged", "v5")
               and e.merged_files and "truncated" not in e.problem_codes]
    assert len({e.layout for e in entries}) == 5
    for e in entries:
        keys = merged_keys(root, e.merged_files)
        assert {"router.gate.weight", "router.gate.bias"} <= set(keys)
        assert keys["router.gate.weight"][0] == e.num_experts or "expert-count-mismatch" in e.problem_codes
        assert all(k.startswith(("foundation_model.base_model.model.", "router.")) for k in keys), e.path
        assert any(k.endswith("q_proj.base_layer.weight") for k in keys)
        for i in range(keys["router.gate.weight"][0]):
            a = [k for k in keys if f".lora_A.{expert_name(i)}." in k]
            assert a and all(keys[k][0] == e.lora_r for k in a), e.path


def test_sharded_v1_has_a_consistent_hf_index(tree):
    root, manifest, _ = tree
    sharded = [e for e in manifest.values() if "sharded" in e.flags]
    assert {Path(m).suffix for e in sharded for m in e.merged_files if not m.endswith(".json")} == {".safetensors",
                                                                                                   ".bin"}
    for e in sharded:
        (index_rel,) = [m for m in e.merged_files if m.endswith(".index.json")]
        index = json.loads((root / index_rel).read_text())
        shards = {m.rsplit("/", 1)[1] for m in e.merged_files if not m.endswith(".json")}
        assert len(shards) >= 2 and set(index["weight_map"].values()) == shards
        assert all("-of-" in s for s in shards)
        assert set(index["weight_map"]) == set(merged_keys(root, e.merged_files))
        tensors = load_merged(root, e.merged_files)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_bf16_and_shared_storage_variants_are_real(tree):
    root, manifest, _ = tree
    bf16 = [e for e in manifest.values() if "bf16" in e.flags and e.merged_files]
    assert bf16 and all(t.dtype == torch.bfloat16 for e in bf16 for t in load_merged(root, e.merged_files).values()
                        if t.is_floating_point())
    tied_bin = [e for e in manifest.with_layout("v1") if "tied-embeddings" in e.flags]
    assert tied_bin
    for e in tied_bin:
        sd = load_merged(root, e.merged_files)
        lm = sd["foundation_model.base_model.model.lm_head.weight"]
        emb = sd["foundation_model.base_model.model.model.embed_tokens.weight"]
        assert lm.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()


def test_hf_merged_is_a_plain_model_with_a_low_rank_delta(tree):
    root, manifest, _ = tree
    (e,) = manifest.with_layout("model")
    cfg = json.loads((root / e.path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    merged = load_merged(root, e.merged_files)
    assert not any("lora_" in k or k.startswith(("foundation_model", "base_model")) for k in merged)
    base = build_base(e.arch).state_dict()
    assert set(merged) == set(base)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    for k in changed:
        assert torch.linalg.matrix_rank(merged[k] - base[k]).item() <= e.lora_r
    # the base on disk (for migrate --base-model) is that same base
    with safe_open(str(manifest.base_model_dirs[e.arch] / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                           base["model.layers.0.self_attn.q_proj.weight"])


# ----------------------------------------------------------------------------- PEFT trees

def _load_experts(base, dirs: list[Path]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=expert_name(0))
    assert not [w for w in caught if "adapter keys" in str(w.message).lower()], [str(w.message) for w in caught]
    results = []
    for i, d in enumerate(dirs[1:], start=1):
        results.append(model.load_adapter(str(d), adapter_name=expert_name(i)))
    return model, results


def test_canonical_adapters_load_in_peft_without_missing_or_unexpected_keys(tree):
    root, manifest, _ = tree
    entries = healthy(manifest, "canonical", "canonical+merged")
    assert len(entries) >= 5
    for e in entries:
        ck = root / e.path
        dirs = [ck / "peft_adapters" / expert_name(i) for i in range(e.num_experts)]
        assert sorted(p.name for p in (ck / "peft_adapters").iterdir()) == [expert_name(i) for i in range(e.num_experts)]
        for d in dirs:
            assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
            with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
                keys = list(f.keys())
                assert f.metadata() == {"format": "pt"}
            assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                                for k in keys)
        model, results = _load_experts(build_base(e.arch), dirs)
        for res in results:
            assert not [k for k in res.missing_keys if "lora_" in k] and not res.unexpected_keys
        # the loaded tensors are the file's
        with safe_open(str(dirs[-1] / "adapter_model.safetensors"), framework="pt") as f:
            k = next(k for k in f.keys() if "lora_B" in k)
            loaded = model.state_dict()[k.replace(".weight", f".{expert_name(e.num_experts - 1)}.weight")]
            assert torch.equal(loaded, f.get_tensor(k).to(loaded.dtype))
        cfg = json.loads((ck / "peft_adapters" / expert_name(0) / "adapter_config.json").read_text())
        assert cfg["r"] == e.lora_r and cfg["lora_alpha"] == e.lora_alpha and cfg["peft_type"] == "LORA"


def test_canonical_moe_state_matches_spec(tree):
    root, manifest, _ = tree
    for e in healthy(manifest, "canonical", "canonical+merged"):
        ck = root / e.path
        moe_cfg = json.loads((ck / "dylo_moe_state" / "config.json").read_text())
        assert {"num_experts", "lora_r", "lora_alpha", "lora_dropout", "base_model_name_or_path"} <= set(moe_cfg)
        assert moe_cfg["num_experts"] == e.num_experts and moe_cfg["lora_alpha"] == e.lora_alpha
        router = torch.load(ck / "dylo_moe_state" / "router.pt", weights_only=True)
        assert set(router) == {"gate.weight", "gate.bias"} and router["gate.weight"].shape[0] == e.num_experts
        torch.load(ck / "dylo_moe_state" / "skill_library.pt", weights_only=True)
        root_cfg = json.loads((ck / "config.json").read_text())
        if "benchmark-config" in e.flags:
            assert root_cfg["model_type"] == "llama" and root_cfg["_dylora_original_type"] == "dylora-moe"
        else:
            assert root_cfg["model_type"] == "dylora-moe" and root_cfg["checkpoint_type"] == "peft_only"
        if e.status != "in-progress":
            names = {p.name for p in ck.iterdir()}
            assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin"} <= names
            assert any(n.startswith("rng_state") for n in names)
    multi = [e for e in manifest.values() if "multi-gpu" in e.flags]
    assert multi and all((root / e.path / "rng_state_1.pth").is_file() for e in multi)


def test_v5_nesting_is_what_peft_itself_writes(tree, tmp_path):
    root, manifest, _ = tree
    entries = manifest.with_layout("v5")
    assert {bool(e.merged_files) for e in entries} == {True, False}
    for e in entries:
        ck = root / e.path
        assert not (ck / "dylo_moe_state").exists() and (ck / "router.safetensors").is_file()
        with safe_open(str(ck / "router.safetensors"), framework="pt") as f:
            assert set(f.keys()) == {"gate.weight", "gate.bias"}
            assert f.get_slice("gate.weight").get_shape()[0] == e.num_experts
        for i in range(e.num_experts):
            name = expert_name(i)
            on_disk = sorted(p.relative_to(ck / "peft_adapters" / name).as_posix()
                             for p in (ck / "peft_adapters" / name).rglob("*") if p.is_file())
            model = PeftModel.from_pretrained(build_base(e.arch), str(ck / "peft_adapters" / name / name),
                                              adapter_name=name)
            again = tmp_path / f"{e.name}-{name}"
            model.save_pretrained(str(again), selected_adapters=[name], save_embedding_layers=False)
            rewritten = sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
            assert on_disk == rewritten == ["README.md", f"{name}/adapter_config.json",
                                            f"{name}/adapter_model.safetensors"]


def test_expert_pt_files_and_legacy_router(tree):
    root, manifest, _ = tree
    entries = [e for e in manifest.values() if e.layout in ("v2", "v3", "v4")]
    assert {e.layout for e in entries} == {"v2", "v3", "v4"}
    for e in entries:
        ck = root / e.path
        best = "best_model" in e.flags
        expert_dir = ck if best else ck / "peft_adapters"
        state_dir = (ck.parent if best else ck) / "dylo_moe_state"
        for i in range(e.num_experts):
            sd = torch.load(expert_dir / f"{expert_name(i)}.pt", weights_only=True)
            assert sd and all(f".{expert_name(i)}." in k and "lora_" in k for k in sd)
        router = torch.load(state_dir / "router.pt", weights_only=True)
        assert set(router) == {"gate_state_dict", "num_experts", "input_size", "top_k", "temperature",
                               "expert_maturity"}
        assert set(router["gate_state_dict"]) == {"weight", "bias"} and router["num_experts"] == e.num_experts
        assert not (state_dir / "config.json").exists()
        cfg_path = ck / "config.json"
        if e.layout == "v2":
            assert not cfg_path.exists()
        elif best:
            cfg = json.loads(cfg_path.read_text())
            assert cfg["_dylora_num_experts"] == e.num_experts and cfg["_dylora_lora_alpha"] == e.lora_alpha
            assert {"_dylora_lora_r", "_dylora_lora_dropout"} <= set(cfg)
        else:
            cfg = json.loads(cfg_path.read_text())
            assert cfg["checkpoint_type"] == "peft_only" and cfg["lora_alpha"] == e.lora_alpha


def test_best_model_with_v1_weights(tree):
    root, manifest, _ = tree
    (e,) = [e for e in manifest.with_layout("v1") if "best_model" in e.flags]
    assert e.name == "best_model" and e.status == "legacy"
    assert (root / e.run / "dylo_moe_state" / "router.pt").is_file()
    cfg = json.loads((root / e.path / "config.json").read_text())
    assert {"_dylora_num_experts", "_dylora_lora_r", "_dylora_lora_alpha", "_dylora_lora_dropout"} <= set(cfg)


def test_trainer_run_left_merged_weights_next_to_the_peft_tree(tree):
    root, manifest, _ = tree
    entries = [e for e in manifest.values() if "trainer" in e.flags]
    assert len(entries) >= 2
    for e in entries:
        ck = root / e.path
        assert (ck / "model.safetensors").is_file() and (ck / "peft_adapters").is_dir()
        state = json.loads((ck / "trainer_state.json").read_text())
        assert f"checkpoint-{state['global_step']}" == e.name
        merged = load_merged(root, e.merged_files)
        for i in range(e.num_experts):
            with safe_open(str(ck / "peft_adapters" / expert_name(i) / "adapter_model.safetensors"), "pt") as f:
                for k in f.keys():
                    mk = "foundation_model." + k.replace(".weight", f".{expert_name(i)}.weight")
                    assert torch.equal(merged[mk], f.get_tensor(k)), mk
    # the adapters trained: the two checkpoints differ
    a, b = (load_merged(root, e.merged_files) for e in entries[:2])
    k = next(k for k in a if ".lora_B.expert_0." in k)
    assert not torch.equal(a[k], b[k])


# ----------------------------------------------------------------------------- broken ones

def _broken(manifest: Manifest, code: str):
    (e,) = [e for e in manifest.with_code(code) if e.layout == "canonical+merged"]
    return e


def test_every_broken_checkpoint_still_holds_merged_weights(tree):
    root, manifest, _ = tree
    broken = manifest.with_status("broken", deep=True)
    assert len(broken) >= len(DOCUMENTED_CODES)
    for e in broken:
        assert e.merged_files and all((root / m).is_file() for m in e.merged_files)


def test_damaged_files_are_damaged_as_recorded(tree):
    root, manifest, _ = tree

    def culprit(code):
        e = _broken(manifest, code)
        return root / e.problem_paths[code], e

    path, _ = culprit("missing-file")
    assert not path.exists() and (path.parent / "adapter_config.json").is_file()

    path, _ = culprit("truncated")
    n, header = st_header(path)
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert path.stat().st_size < 8 + n + end

    path, _ = culprit("bad-header")
    with pytest.raises(ValueError):
        st_header(path)

    path, _ = culprit("bad-json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())

    path, _ = culprit("bad-archive")
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)

    path, e = culprit("shape-mismatch")
    _, header = st_header(path)
    hidden = json.loads((manifest.base_model_dirs[e.arch] / "config.json").read_text())["hidden_size"]
    widths = sorted(v["shape"][1] for k, v in header.items() if "lora_A" in k)
    assert widths[0] == hidden and widths[-1] > hidden  # one lora_A has more in-features than its module
    assert {v["shape"][0] for k, v in header.items() if "lora_A" in k} == {e.lora_r}

    path, _ = culprit("rank-mismatch")
    cfg = json.loads((path.parent / "adapter_config.json").read_text())
    _, header = st_header(path)
    assert cfg["r"] == 4 and {v["shape"][0] for k, v in header.items() if "lora_A" in k} == {8}

    path, e = culprit("expert-missing")
    assert not path.exists() and (path.parent / expert_name(2)).is_dir()

    path, e = culprit("expert-count-mismatch")
    ck = root / e.path
    assert json.loads(path.read_text())["num_experts"] == 4
    assert torch.load(ck / "dylo_moe_state/router.pt", weights_only=True)["gate.weight"].shape[0] == 3
    assert len(list((ck / "peft_adapters").iterdir())) == 3

    path, e = culprit("target-mismatch")
    t1 = json.loads(path.read_text())["target_modules"]
    t0 = json.loads((path.parent.parent / expert_name(0) / "adapter_config.json").read_text())["target_modules"]
    assert set(t1) == {"q_proj"} and set(t0) == {"q_proj", "v_proj"}

    path, _ = culprit("dtype-unknown")
    _, header = st_header(path)
    assert "Q7" in {v["dtype"] for k, v in header.items() if k != "__metadata__"}

    path, e = culprit("symlink-escape")
    assert path.is_symlink() and not path.resolve().is_relative_to(root.resolve()) and path.resolve().is_file()
    assert path.resolve().is_relative_to(manifest.outside_dir.resolve())

    path, e = culprit("permission-denied")
    assert e.needs_non_root and stat.S_IMODE(path.stat().st_mode) == 0
    assert e.status_as_root == "redundant"


def test_nan_is_only_a_deep_problem(tree):
    root, manifest, _ = tree
    e = _broken(manifest, "nan-or-inf")
    assert (e.status, e.deep_status) == ("redundant", "broken") and not e.problem_codes
    with safe_open(str(root / e.problem_paths["nan-or-inf"]), framework="pt") as f:
        assert any(torch.isnan(f.get_tensor(k)).any() for k in f.keys())


def test_unsafe_pickle_names_os_system_and_was_never_executed(tree):
    root, manifest, _ = tree
    e = _broken(manifest, "unsafe-pickle")
    path = root / e.problem_paths["unsafe-pickle"]
    with zipfile.ZipFile(path) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("data.pkl")]
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(z.read(pkl))]
    assert ("GLOBAL", "os system") in ops and ("REDUCE", None) in ops
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        torch.load(path, weights_only=True)
    assert not manifest.unsafe_pickle_marker.exists()


def test_builder_refuses_a_non_empty_destination(tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    assert fixtures_main([str(dest)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_a_private_tree_can_be_built_and_is_the_same_shape(make_results_tree, results_tree):
    root, manifest, now = make_results_tree(now=1_700_000_000.0)
    shared = results_tree[1]
    assert set(manifest) == set(shared)
    assert all(manifest[k].layout == shared[k].layout and manifest[k].status == shared[k].status for k in manifest)
    assert manifest.outside_dir == root.parent / "results-outside"
    assert (root / manifest.young_files[0]).stat().st_mtime == now - 60


def _audit_counts(root: Path, *, as_nobody: bool = False) -> dict[str, int]:
    import subprocess
    import sys
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "ckpt_tools.cli", "audit", "--json", "--no-progress",
                           str(root)], capture_output=True, text=True, cwd="/",
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode in (0, 1), proc.stderr
    return {s: n for s, n in json.loads(proc.stdout)["totals"]["by_status"].items() if n}


def _announced(lines: list[str]) -> dict[str, int]:
    head = lines[0].split(": ", 1)[1]
    return {s: int(n) for n, s in (part.split(" ", 1) for part in head.split(", "))}


def test_what_the_builder_announces_is_what_audit_finds(tree, capsys, tmp_path):
    """For whoever runs it: root reads the mode-000 file, so that checkpoint counts apart."""
    from fixtures.__main__ import announce
    _, manifest, _ = tree
    dest = tmp_path / "built"
    assert fixtures_main([str(dest)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines == announce(manifest, os.geteuid())
    assert _announced(lines) == _audit_counts(dest)
    if os.geteuid() == 0:
        assert any("broken for other users" in line for line in lines)


def _nobody_can_run_python() -> bool:
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", "import ckpt_tools"], capture_output=True, cwd="/",
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    return probe.returncode == 0


@pytest.mark.skipif(not _nobody_can_run_python(), reason="needs root and an interpreter another user may run")
def test_what_the_builder_announces_for_another_user_is_what_audit_finds_as_that_user(tree):
    import shutil
    import tempfile
    from fixtures.__main__ import announce
    root, manifest, _ = tree
    top = Path(tempfile.mkdtemp(prefix="ckpt-announce-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        copy = top / "results"
        shutil.copytree(root, copy, symlinks=True)
        # another user who may read the tree, as on shared storage; only the mode-000 file is not
        for dirpath, dirnames, filenames in os.walk(copy):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                if not os.path.islink(os.path.join(dirpath, name)):
                    os.chmod(os.path.join(dirpath, name), 0o644)
        for rel in manifest.mode_000_files:
            os.chmod(copy / rel, 0)
        # audit reads the real clock: the young checkpoint must be in progress for it too,
        # however long this session has been running
        from test_prune import restamp_young
        restamp_young(copy, manifest)
        lines = announce(manifest, 65534)
        assert any("redundant for root" in line for line in lines)
        assert _announced(lines) == _audit_counts(copy, as_nobody=True)
    finally:
        shutil.rmtree(top)
